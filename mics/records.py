"""The shapes of what a run stores, as types: a question's record and the store's interface.

`QuestionRecord` is the dict the engine writes under a question id; `RunStore` is the part of
the store (`store.RunStore`, LMDB) that the search side needs, so code above the store can be
typed against it without importing it. Both describe what exists; neither adds behaviour.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable

from mics.types import Outcome, Question, QuestionStatus, StopReason


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


@runtime_checkable
class RunStore(Protocol):
    """What the search side reads and writes in a run store (see store/lmdb_store.py)."""

    run_dir: Path

    def get_meta(self, key: str) -> Any | None: ...

    def put_meta(self, key: str, value: Any) -> None: ...

    def memo_get(self, key: str) -> dict | None: ...

    def memo_put(self, key: str, reply: dict, log: dict) -> int: ...

    def iter_calls(self) -> list[dict]: ...

    def put_question(self, qid: str, rec: dict) -> None: ...

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


__all__ = ["QuestionRecord", "RunStore", "record_outcome", "record_question"]
