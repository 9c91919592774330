"""Ctrl-C for the command line: the only place mics installs signal handlers or exits at once.

The library is stopped by its owner through an `anyio.Event`; here SIGINT/SIGTERM set that
event. The first signal stops sending new calls (calls in flight finish and are stored); a
second one exits at once with status 128 + signal (every commit is atomic, so nothing stored
is lost).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


def run_until_signalled(body: Callable[[anyio.Event], Awaitable[T]],
                        on_signal: Callable[[int], None] | None = None) -> T:
    """`anyio.run` `body(stop)`, where the first SIGINT/SIGTERM sets `stop` (and is passed to
    `on_signal`), a second exits at once.

    An error from `body` comes out as itself, not wrapped in an ExceptionGroup."""

    async def main() -> T:
        stop = anyio.Event()
        results: list[T] = []
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop, on_signal)
            try:
                results.append(await body(stop))
            except Exception as e:  # re-raised below, outside the task group
                error = e
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return results[0]

    return anyio.run(main)


async def _watch_signals(stop: anyio.Event, on_signal: Callable[[int], None] | None) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if stop.is_set():
                os._exit(128 + int(signum))
            stop.set()
            if on_signal:
                on_signal(int(signum))
