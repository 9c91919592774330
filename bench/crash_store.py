"""Crash injection for the chaos script: a run store that SIGKILLs its own process right after
the commit holding its Nth stored call, and a `mics` entry point that uses it.

    MICS_KILL_AFTER_CALLS=40 python -m bench.crash_store search DATA --run RUN --config CFG

runs the ordinary `mics` command line, except that every store it opens for writing is wrapped
in `KillAfterCalls`. The product (the call gate, the store, the CLI) has no test hook: the
wrapper is installed here only, so a killed run is the real code path up to the kill.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from store import RunStore

KILL_AFTER_ENV = "MICS_KILL_AFTER_CALLS"
MODULE = "bench.crash_store"  # `python -m MODULE ARGS` = `mics ARGS` with the kill hook


class KillAfterCalls:
    """A `RunStore` that SIGKILLs this process once `limit` memo replies are committed.

    Replies written inside a `transaction()` block count when the block commits (as the gate's
    grouped commits do), so the kill always lands after a whole commit, never inside one."""

    def __init__(self, inner: RunStore, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self._stored = 0  # replies committed through this wrapper
        self._depth = 0  # nested transaction() blocks open
        self._uncommitted = 0  # replies put inside the open transaction

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> KillAfterCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def memo_put(self, key: str, reply: dict, log: dict) -> int:
        """Store one reply; kill the process if it is the Nth committed one."""
        result = self._inner.memo_put(key, reply, log)
        if self._depth:
            self._uncommitted += 1
        else:
            self._committed(1)
        return result

    def memo_put_many(self, entries: list[tuple[str, dict, dict]]) -> list[int]:
        """Store several replies in one commit; they count together once it is made."""
        result = self._inner.memo_put_many(entries)
        if self._depth:
            self._uncommitted += len(entries)
        else:
            self._committed(len(entries))
        return result

    @contextmanager
    def transaction(self) -> Iterator[KillAfterCalls]:
        """The inner store's transaction; replies put inside it count once it commits."""
        self._depth += 1
        try:
            with self._inner.transaction():
                yield self
        except BaseException:
            if self._depth == 1:
                self._uncommitted = 0  # rolled back: nothing was stored
            raise
        finally:
            self._depth -= 1
        if self._depth == 0:
            count, self._uncommitted = self._uncommitted, 0
            self._committed(count)

    def _committed(self, count: int) -> None:
        self._stored += count
        if count and self._stored >= self._limit:
            os.kill(os.getpid(), signal.SIGKILL)


def install(limit: int) -> None:
    """Wrap every store this process opens for writing from now on in `KillAfterCalls`."""
    opener = RunStore.open.__func__  # type: ignore[attr-defined]

    def open_killable(cls: type[RunStore], run_dir: Any, *args: Any, **kwargs: Any) -> Any:
        store = opener(cls, run_dir, *args, **kwargs)
        return KillAfterCalls(store, limit) if store.writable else store

    RunStore.open = classmethod(open_killable)  # type: ignore[method-assign,assignment]


def main() -> None:
    """`mics ARGS`, with the kill hook when MICS_KILL_AFTER_CALLS is set."""
    limit = os.environ.get(KILL_AFTER_ENV)
    if limit:
        install(int(limit))
    from cli.app import main as mics_main

    mics_main()


if __name__ == "__main__":
    main()
