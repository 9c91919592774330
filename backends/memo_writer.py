"""Group memo commits: replies that arrive together are stored in one write transaction.

`MemoWriter.put` returns only once its replies are committed, so the call gate still stores every
reply before the engine sees it. The first caller of a round lets the other tasks that are ready
in the same event-loop turn add theirs (one shielded checkpoint), then commits them all at once;
the others wait for that commit. A failed commit fails every reply of its round.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from mics.records import RunStore

Entry = tuple[str, dict, dict]  # memo key, reply dict, call-log entry


class _Round:
    __slots__ = ("entries", "done", "error")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.done: anyio.Event | None = None  # made only if a second caller joins
        self.error: BaseException | None = None


class MemoWriter:
    """Batches `store.memo_put` calls from concurrent tasks into one commit per loop turn."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.commits = 0
        self._open: _Round | None = None

    async def put(self, entries: Sequence[Entry]) -> None:
        """Store `entries` (memo reply + call-log entry each); return once they are committed."""
        if not entries:
            return
        rnd = self._open
        if rnd is not None:  # a commit is about to happen: join it
            rnd.entries.extend(entries)
            if rnd.done is None:
                rnd.done = anyio.Event()
            await rnd.done.wait()
            if rnd.error is not None:
                raise rnd.error
            return
        rnd = self._open = _Round()
        rnd.entries.extend(entries)
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0)  # let replies that arrived in this turn join the round
        finally:
            self._open = None
            try:
                grouped = getattr(self.store, "transaction", None)
                with grouped() if grouped is not None else nullcontext():
                    for key, reply, log in rnd.entries:
                        self.store.memo_put(key, reply, log)
                self.commits += 1
            except BaseException as e:
                rnd.error = e
                raise
            finally:
                if rnd.done is not None:
                    rnd.done.set()
