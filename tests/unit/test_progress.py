"""The progress counts: a question left deferred by a failed call is deferred, never failed."""

from __future__ import annotations

import io

from rich.console import Console

from cli.progress import RunProgress
from mics.types import Outcome


def test_deferred_and_infrastructure_stops_count_as_deferred_not_failed() -> None:
    progress = RunProgress(Console(file=io.StringIO()), live=False)
    for status, reason in [("succeeded", "full_score"), ("deferred", "deferred"),
                           ("failed", "no_mentor"), ("failed", "all_zero"),
                           ("failed", "bad_record")]:
        progress.on_done(Outcome(qid="q", status=status, stop_reason=reason))  # type: ignore[arg-type]
    assert (progress.done, progress.ok, progress.deferred, progress.failed) == (5, 1, 2, 2)
    assert progress.line().startswith("progress: 5/")
    assert "ok 1, failed 2, deferred 2" in progress.line()
