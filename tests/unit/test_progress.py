"""The progress counts: by status, as the closing summary counts (a question left deferred by a
failed call is deferred, never failed)."""

from __future__ import annotations

import io

from rich.console import Console

from cli.progress import RunProgress
from mics.types import Outcome


def test_progress_counts_questions_by_status_as_the_summary_does() -> None:
    progress = RunProgress(Console(file=io.StringIO()), live=False)
    for status, reason in [("succeeded", "full_score"), ("deferred", "deferred"),
                           ("failed", "no_mentor"), ("failed", "all_zero"),
                           ("failed", "bad_record")]:
        progress.on_done(Outcome(qid="q", status=status, stop_reason=reason))  # type: ignore[arg-type]
    # as the closing summary counts them: by status (no_mentor is a failed status)
    assert (progress.done, progress.ok, progress.deferred, progress.failed) == (5, 1, 1, 3)
    assert progress.line().startswith("progress: 5/")
    assert "ok 1, failed 3, deferred 1" in progress.line()
