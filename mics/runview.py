"""A read-only view of a run: typed questions, outcomes and tree nodes, graphs, exports.

Opening a run never blocks its writer: a search may be going on while you read it (you see
what it has committed so far). Close the view (or use it as a context manager) when done.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import networkx as nx

from mics.analysis import chosen_path, load_tree, run_summary
from mics.config import RunConfig
from mics.export import Filters, export
from mics.records import (
    QuestionRecord,
    RunStore,
    StoredQuestion,
    read_nodes,
    read_questions,
    record_outcome,
    record_question,
)
from mics.run import RunSummary, load_run, summarize
from mics.types import Node, Outcome, Question, StopReason
from store import RunStore as LMDBStore


class Run:
    """One stored run, read-only. Questions come in dataset order."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self.run_dir = Path(store.run_dir)
        self.config, self.dataset = self._load()

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        """Open `run_dir` for reading; StoreError if it holds no run."""
        store = LMDBStore.open(run_dir, write=False)
        try:
            return cls(store)
        except BaseException:
            store.close()
            raise

    def _load(self) -> tuple[RunConfig, dict[str, Any]]:
        return load_run(self._store)

    def close(self) -> None:
        """Release the store; safe to call twice."""
        self._store.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r})"

    # ---------------------------------------------------------------- questions and outcomes

    def records(self) -> Iterator[tuple[str, QuestionRecord]]:
        """`(qid, stored record)` of every question, bad records included."""
        for qid, rec in self._store.iter_questions():
            yield qid, cast(QuestionRecord, rec)

    def record(self, qid: str) -> QuestionRecord:
        """The stored record of one question; KeyError if the run has none."""
        rec = self._store.get_question(qid)
        if rec is None:
            raise KeyError(qid)
        return cast(QuestionRecord, rec)

    def stored(self) -> Iterator[StoredQuestion]:
        """Every stored question as a typed record (question, outcome, status), in dataset
        order, bad records included."""
        return read_questions(self._store)

    def question_ids(self) -> list[str]:
        """Every stored question id (a bad record's id ends with ``@line<n>``)."""
        return [qid for qid, _ in self.records()]

    def questions(self) -> Iterator[Question]:
        """Every readable question (records that failed validation have none)."""
        for _, rec in self.records():
            if (q := record_question(rec)) is not None:
                yield q

    def question(self, qid: str) -> Question | None:
        """One question, or None for a record that could not be read."""
        return record_question(self.record(qid))

    def outcome(self, qid: str) -> Outcome | None:
        """How one question's search ended; None while it is not finished."""
        return record_outcome(self.record(qid))

    def outcomes(self, stop_reason: StopReason | Sequence[StopReason] | None = None
                 ) -> Iterator[Outcome]:
        """Outcomes of finished questions, optionally only those with the given stop reason(s)
        (e.g. ``"full_score"`` for the chains every intern sample confirmed)."""
        wanted = {stop_reason} if isinstance(stop_reason, str) else stop_reason
        for _, rec in self.records():
            o = record_outcome(rec)
            if o is not None and (wanted is None or o.stop_reason in wanted):
                yield o

    def summary(self) -> RunSummary:
        """Counts by status and stop reason (no call counts: those belong to a session)."""
        return summarize(self._store)

    # ---------------------------------------------------------------- trees

    def nodes(self, qid: str) -> list[Node]:
        """Every node of a question's tree (all attempts; the root has depth -1)."""
        return read_nodes(self._store, qid)

    def path(self, qid: str) -> list[Node]:
        """The root, then the chosen node of each depth of the last attempt."""
        return chosen_path(self.nodes(qid))

    def graph(self, qid: str) -> nx.DiGraph:
        """A question's tree as a networkx DiGraph (see mics.analysis.question_graph)."""
        return load_tree(self._store, qid)

    def graphs(self) -> Iterator[nx.DiGraph]:
        """The tree of every question with a readable record, in dataset order."""
        for qid, rec in self.records():
            if rec.get("question") is not None:
                yield self.graph(qid)

    # ---------------------------------------------------------------- tables and exports

    def stats(self, prices: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
        """Run-level tables: usage and cost per model, interns, depths (mics inspect)."""
        return run_summary(self._store, prices)

    def export(self, out_dir: str | Path, formats: Sequence[str] = ("reference",), *,
               only_full_score: bool = False, min_score: float | None = None,
               max_depth: int | None = None, answer_in_target: bool = False,
               include_partial: bool = False, exclude_leaks: bool = False,
               image_root: str | Path | None = None, prm_label: str = "positive"
               ) -> dict[str, int]:
        """Write the export files into `out_dir` with `mics export`'s options and defaults
        (sft/sharegpt: only full-score chains unless `include_partial`); record counts per
        file, and ``partial``: the max-depth chains of sft/sharegpt."""
        filters = Filters(min_score=min_score, only_full_score=only_full_score,
                          max_depth=max_depth, exclude_leaks=exclude_leaks)
        return export(self._store, Path(out_dir), list(formats), filters, answer_in_target,
                      Path(image_root) if image_root is not None else None, prm_label,
                      include_partial)


def open_run(run_dir: str | Path) -> Run:
    """Open a run read-only (also while it is being searched): ``with open_run(d) as run:``."""
    return Run.open(run_dir)


__all__ = ["Run", "open_run"]
