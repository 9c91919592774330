"""Group memo commits: replies that arrive together are stored in one write transaction.

`MemoWriter.put` returns only once its replies are committed, so the call gate still stores every
reply before the engine sees it. The first caller of a round schedules the commit to run once
the tasks that are ready in the same event-loop turn have run (they add their replies to the
round), and every caller of the round waits for that commit. The commit runs as an event-loop
callback, so a caller cancelled while waiting does not stop it: what was delivered is stored.
A failed commit fails every reply of its round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mics.records import RunStore

Entry = tuple[str, dict, dict]  # memo key, reply dict, call-log entry


class _Round:
    __slots__ = ("entries", "waiters")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.waiters: list[asyncio.Future[None]] = []  # one per caller, resolved at commit


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
        loop = asyncio.get_running_loop()
        rnd = self._open
        if rnd is None:  # open a round; it commits after the tasks ready now have run
            rnd = self._open = _Round()
            loop.call_soon(self._flush, rnd)
        rnd.entries.extend(entries)
        done = loop.create_future()  # this caller's own: cancelling it cancels no commit
        rnd.waiters.append(done)
        await done

    def _flush(self, rnd: _Round) -> None:
        if self._open is rnd:
            self._open = None
        try:
            self.store.memo_put_many(rnd.entries)  # one write for the round
        except Exception as e:  # every caller of the round gets the error
            for done in rnd.waiters:
                if not done.done():
                    done.set_exception(e)
            return
        self.commits += 1
        for done in rnd.waiters:
            if not done.done():
                done.set_result(None)
