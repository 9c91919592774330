"""The local backend's batching queue when a caller is cancelled mid-batch.

The engine's fan-outs cancel their tasks the asyncio way (`task.cancel()`), which passes through
the anyio shield of `anyio.to_thread.run_sync`: the caller stops waiting while the batch goes on
in its worker thread. The queue must still finish every other caller's calls from that batch,
never start a second batch beside a running one, and let `run_alone` (closing the model) wait
for it. The executor here is a plain function, the queue's own injection point (the real
transformers runner is exercised in tests/integration/test_local_backend.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import anyio
import pytest

from backends.base import BackendError, Call
from backends.local_queue import BatchQueue
from mics.types import Prompt, Reply, Sampling, Text

GREEDY = Sampling(temperature=0.0, max_tokens=8)


def _call(text: str) -> Call:
    return Call(Prompt(system="s", parts=(Text(text),)), GREEDY)


class GatedExecutor:
    """Echoes each prompt; blocks in its thread until released; records overlap."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.running = 0
        self.most_at_once = 0
        self.batches: list[list[str]] = []
        self._lock = threading.Lock()

    def __call__(self, calls: Sequence[Call], seeds: Sequence[int]) -> list[Reply | BackendError]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.batches.append([c.prompt.user_text() for c in calls])
        self.entered.set()
        self.release.wait(10)
        time.sleep(0.05)  # still busy a moment after the release
        with self._lock:
            self.running -= 1
        return [Reply(text=f"echo {c.prompt.user_text()}") for c in calls]


async def _until(flag: threading.Event) -> None:
    while not flag.is_set():
        await anyio.sleep(0.005)


async def _submit_task(queue: BatchQueue, texts: list[str]) -> asyncio.Task[list[Reply]]:
    return asyncio.get_running_loop().create_task(queue.submit([_call(t) for t in texts]))


async def _left_mid_batch() -> tuple[GatedExecutor, BatchQueue]:
    """A queue whose only caller is cancelled while its batch ("a1") runs in the executor."""
    ex = GatedExecutor()
    queue = BatchQueue("m", ex, max_batch=16, seed=0)
    a = await _submit_task(queue, ["a1"])
    await _until(ex.entered)
    a.cancel()
    await asyncio.sleep(0.01)
    return ex, queue


def test_a_batch_finishes_for_the_others_when_the_caller_running_it_is_cancelled() -> None:
    async def main() -> None:
        ex = GatedExecutor()
        queue = BatchQueue("m", ex, max_batch=16, seed=0)
        a = await _submit_task(queue, ["a1", "a2"])
        b = await _submit_task(queue, ["b1"])  # same tick: one batch with a's calls
        await _until(ex.entered)
        assert ex.batches == [["a1", "a2", "b1"]]
        a.cancel()
        await asyncio.sleep(0.01)
        ex.release.set()
        with anyio.fail_after(5):
            replies = await b
        assert [r.text for r in replies] == ["echo b1"]
        with pytest.raises(asyncio.CancelledError):
            await a
        assert ex.batches == [["a1", "a2", "b1"]]  # b's call was not generated twice

    anyio.run(main)


def test_no_second_batch_starts_beside_one_whose_caller_was_cancelled() -> None:
    async def main() -> None:
        ex, queue = await _left_mid_batch()
        b = await _submit_task(queue, ["b1"])
        await asyncio.sleep(0.05)
        assert len(ex.batches) == 1  # b waits for a's batch to leave the model
        ex.release.set()
        with anyio.fail_after(5):
            replies = await b
        assert [r.text for r in replies] == ["echo b1"]
        assert ex.batches == [["a1"], ["b1"]]
        assert ex.most_at_once == 1

    anyio.run(main)


def test_run_alone_waits_for_a_running_batch_even_after_its_caller_left() -> None:
    async def main() -> None:
        ex, queue = await _left_mid_batch()
        seen: list[int] = []
        closing = asyncio.get_running_loop().create_task(
            queue.run_alone(lambda: seen.append(ex.running)))
        await asyncio.sleep(0.05)
        assert not closing.done()
        ex.release.set()
        with anyio.fail_after(5):
            await closing
        assert seen == [0]  # the model was closed only once the batch had left it

    anyio.run(main)


def test_callers_in_one_tick_share_a_batch_and_errors_reach_their_own_callers() -> None:
    def executor(calls: Sequence[Call], seeds: Sequence[int]) -> list[Reply | BackendError]:
        from backends.base import PermanentError

        return [PermanentError("bad prompt") if c.prompt.user_text() == "bad"
                else Reply(text=c.prompt.user_text()) for c in calls]

    async def main() -> None:
        queue = BatchQueue("m", executor, max_batch=2, seed=0)
        ok1 = await _submit_task(queue, ["x", "y"])
        bad = await _submit_task(queue, ["bad"])
        ok2 = await _submit_task(queue, ["z"])
        assert [r.text for r in await ok1] == ["x", "y"]
        with pytest.raises(BackendError, match="bad prompt"):
            await bad
        assert [r.text for r in await ok2] == ["z"]

    anyio.run(main)
