"""Whole-run progress for `search` and `resume`: a bar on a terminal, lines in a log.

A resumed run starts where it was: the counts include what earlier sessions finished. When
the output is not a terminal (``mics search ... > log.txt``) a line is printed every
``every_s`` seconds, and once at the start and at the end.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RunProgress:
    """Counts a run's questions as they finish; renders a bar or periodic lines."""

    def __init__(self, out: Console, every_s: float = 30.0, live: bool | None = None) -> None:
        self.out, self.every_s = out, every_s
        self.live = out.is_terminal if live is None else live
        self.total: int | None = None
        self.done = self.ok = self.failed = self.deferred = 0
        self.session_done = 0
        self.started = time.monotonic()
        self.gate: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ---- callbacks for mics.run.search_run
    def on_start(self, total: int | None, ok: int, failed: int) -> None:
        self.total, self.ok, self.failed = total, ok, failed
        self.done = ok + failed
        self.started = time.monotonic()
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]searching"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.out, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("search", total=total, completed=self.done,
                                            counts=self._counts())
        else:
            self.print_line()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def on_done(self, outcome: Any) -> None:
        self.done += 1
        if not outcome.details.get("skipped"):  # finished in an earlier session: no rate
            self.session_done += 1
        if outcome.status == "succeeded":
            self.ok += 1
        elif outcome.status == "deferred":  # as the closing summary counts it
            self.deferred += 1
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, counts=self._counts())

    def on_gate(self, gate: Any) -> None:
        self.gate = gate

    def close(self) -> None:
        """Stop the bar or the ticker; a log gets a last line."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
            self.print_line()

    # ---- lines
    def _counts(self) -> str:
        text = f"ok {self.ok}  failed {self.failed}"
        return text + (f"  deferred {self.deferred}" if self.deferred else "")

    def line(self) -> str:
        """``progress: 120/2000 done, ok 100, failed 15, deferred 5, 3.2 calls/s, ...``"""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        sent = self.gate.counts.get("sent", 0) if self.gate is not None else 0
        tokens = self.gate.tokens if self.gate is not None else 0
        total = "?" if self.total is None else str(self.total)
        eta = None
        if self.total is not None and self.session_done:
            eta = max(0, self.total - self.done) * elapsed / self.session_done
        return (f"progress: {self.done}/{total} done, ok {self.ok}, failed {self.failed}, "
                f"deferred {self.deferred}, {sent / elapsed:.1f} calls/s, {tokens} tokens, "
                f"elapsed {_eta(elapsed)}, ETA {_eta(eta)}")

    def print_line(self) -> None:
        self.out.print(self.line(), markup=False, soft_wrap=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            self.print_line()
