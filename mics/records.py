"""The shapes of what a run stores, as types: a question's record and the store's interface.

`QuestionRecord` is the dict the engine writes under a question id; `StoredQuestion` is the same
record read back as a typed value (its `Question` and `Outcome`). `RunStore` is the part of the
store (`store.RunStore`, LMDB) that the engine, the call gate and the readers (export, analysis,
viz, the run view) use, so code above the store is typed against it without importing it. The
`read_*` functions are the one place where stored dicts become typed records. None of this adds
behaviour.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable

from mics.types import Node, Outcome, Question, QuestionStatus, StopReason


class QuestionRecord(TypedDict, total=False):
    """One stored question. `question` is `Question.to_dict()` (absent for a bad record),
    `outcome` is `Outcome.to_dict()` once finished; `retryable` marks a failure that
    `mics resume` searches again (no working mentor, intern or judge)."""

    status: QuestionStatus
    index: int
    question: dict[str, Any]
    stop_reason: StopReason
    retryable: bool
    outcome: dict[str, Any]


def record_question(rec: QuestionRecord) -> Question | None:
    """The typed question of a stored record; None for a record that could not be read."""
    q = rec.get("question")
    return Question.from_dict(q) if q is not None else None


def record_outcome(rec: QuestionRecord) -> Outcome | None:
    """The typed outcome of a stored record; None while the question is not finished."""
    o = rec.get("outcome")
    return Outcome.from_dict(o) if o is not None else None


@dataclass(frozen=True)
class StoredQuestion:
    """One stored question, typed. `qid` is its store key (a bad record's ends with
    ``@line<n>`` and has no `question`); `outcome` is None while it is running."""

    qid: str
    status: QuestionStatus
    index: int = 0
    stop_reason: StopReason | None = None
    question: Question | None = None
    outcome: Outcome | None = None
    retryable: bool = False

    @staticmethod
    def from_record(qid: str, rec: QuestionRecord | dict[str, Any]) -> StoredQuestion:
        """The typed form of the record stored under `qid`."""
        return StoredQuestion(qid=qid, status=rec["status"], index=rec.get("index", 0),
                              stop_reason=rec.get("stop_reason"),
                              question=record_question(rec),  # type: ignore[arg-type]
                              outcome=record_outcome(rec),  # type: ignore[arg-type]
                              retryable=bool(rec.get("retryable", False)))

    @property
    def finished(self) -> bool:
        """Searched to the end: succeeded or failed (not running, not deferred)."""
        return self.status in ("succeeded", "failed")

    def searched(self) -> tuple[Question, Outcome]:
        """The question and its outcome, for a readable question that has one (what every
        export row is made of); ValueError for a bad record or a running question."""
        if self.question is None or self.outcome is None:
            raise ValueError(f"question {self.qid}: no question or no outcome stored")
        return self.question, self.outcome


@runtime_checkable
class RunStore(Protocol):
    """What the engine, the call gate and the readers use of a run store (the LMDB
    `store.RunStore` is one; see store/lmdb_store.py)."""

    run_dir: Path

    def get_meta(self, key: str) -> Any | None: ...

    def put_meta(self, key: str, value: Any) -> None: ...

    def memo_get(self, key: str) -> dict | None: ...

    def memo_get_many(self, keys: Sequence[str]) -> list[dict | None]: ...

    def memo_put(self, key: str, reply: dict, log: dict) -> int: ...

    def memo_put_many(self, entries: Sequence[tuple[str, dict, dict]]) -> list[int]: ...

    def iter_calls(self) -> list[dict]: ...

    def put_question(self, qid: str, rec: dict) -> None: ...

    def delete_question(self, qid: str) -> None: ...

    def get_question(self, qid: str) -> dict | None: ...

    def iter_questions(self) -> list[tuple[str, dict]]: ...

    def question_statuses(self) -> list[tuple[str, str, str | None]]: ...

    def question_counts(self) -> dict[tuple[str, str | None], int]: ...

    def put_nodes(self, qid: str, nodes: list[tuple[str, dict]]) -> None: ...

    def get_nodes(self, qid: str) -> list[dict]: ...

    def delete_nodes(self, qid: str) -> None: ...

    def add_failure(self, entry: dict) -> int: ...

    def iter_failures(self) -> list[dict]: ...

    def transaction(self) -> AbstractContextManager[Any]: ...

    def close(self) -> None: ...


def read_question(store: RunStore, qid: str) -> StoredQuestion | None:
    """The typed record of one question; None if the run has no such question."""
    rec = store.get_question(qid)
    return StoredQuestion.from_record(qid, rec) if rec is not None else None


def read_questions(store: RunStore) -> Iterator[StoredQuestion]:
    """Every stored question, typed, in dataset order (bad records included)."""
    for qid, rec in store.iter_questions():
        yield StoredQuestion.from_record(qid, rec)


def read_nodes(store: RunStore, qid: str) -> list[Node]:
    """Every node of a question's tree, typed, in stored order (all attempts)."""
    return [Node.from_dict(n) for n in store.get_nodes(qid)]


__all__ = ["QuestionRecord", "RunStore", "StoredQuestion", "read_nodes", "read_question",
           "read_questions", "record_outcome", "record_question"]
