"""The `local` backend's async batching queue: concurrent `rollout()` calls share batches.

Callers queue their calls and wait. One worker task per queue takes the oldest group of calls
with the same `max_tokens` (up to `max_batch`) and runs it with the executor in a worker thread,
so the event loop never blocks; calls queued meanwhile form the next batch. A generation error
is transient once per call; the same call failing again is permanent.

The worker belongs to the queue, not to a caller: a caller cancelled mid-batch (the engine's
fan-outs cancel the asyncio way, which passes through anyio's thread shield) only stops waiting.
The batch still finishes, with every other caller's calls in it, no second batch starts beside
it, and `run_alone` (closing the model) waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from backends.base import BackendError, Call, PermanentError, TransientError
from backends.keys import call_key
from backends.local_options import call_seed
from mics.types import Reply, Sampling

Executor = Callable[[Sequence[Call], Sequence[int]], list[Reply | BackendError]]


def group_key(s: Sampling) -> int:
    """Calls with equal keys share a `generate`: rows sample with their own parameters, and stop
    strings are trimmed per call, so only the length budget must match."""
    return s.max_tokens


@dataclass(eq=False)
class _Job:
    call: Call
    digest: str
    seed: int
    done: asyncio.Future[None]  # resolved (never with an error) once reply or error is set
    reply: Reply | None = None
    error: BackendError | None = None


class BatchQueue:
    """Batches concurrent callers' calls for one blocking executor (one batch at a time)."""

    def __init__(self, name: str, execute: Executor, *, max_batch: int, seed: int) -> None:
        self.name = name
        self._execute = execute
        self._max_batch = max_batch
        self._seed = seed
        self._pending: list[_Job] = []
        self._model = asyncio.Lock()  # held while the executor (or `run_alone`) has the model
        self._worker: asyncio.Task[None] | None = None
        self._failed_once: set[str] = set()

    async def submit(self, calls: Sequence[Call]) -> list[Reply]:
        """One reply per call, in order; raises the first call's error if any call failed."""
        loop = asyncio.get_running_loop()
        jobs = [self._job(c, loop.create_future()) for c in calls]
        self._pending.extend(jobs)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        try:
            for j in jobs:
                await j.done
        finally:  # a cancelled caller's calls not yet taken are dropped
            mine = {id(j) for j in jobs}
            self._pending = [j for j in self._pending if id(j) not in mine]
        for j in jobs:
            if j.error is not None:
                raise type(j.error)(str(j.error))
        return [j.reply for j in jobs if j.reply is not None]

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """`fn()` in a worker thread once no batch is running (e.g. to unload the model)."""
        async with self._model:
            return await anyio.to_thread.run_sync(fn)

    async def _work(self) -> None:
        batch: list[_Job] = []
        try:
            await asyncio.sleep(0)  # let callers started in the same tick join the first batch
            while self._pending:
                batch = self._take_batch()
                async with self._model:
                    await self._run(batch)
        finally:  # the worker itself cancelled (its event loop closing): nobody waits forever
            stopped = TransientError(f"model {self.name!r}: not generated (the queue stopped)")
            for job in [*batch, *self._pending]:
                if not job.done.done():
                    job.error = stopped
                    job.done.set_result(None)

    def _job(self, call: Call, done: asyncio.Future[None]) -> _Job:
        digest = call_key(None, call)
        return _Job(call, digest, call_seed(self._seed, digest), done)

    def _take_batch(self) -> list[_Job]:
        if not self._pending:
            return []
        key = group_key(self._pending[0].call.sampling)
        batch = [j for j in self._pending if group_key(j.call.sampling) == key]
        batch = batch[: self._max_batch]
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        if not batch:
            return
        try:
            results = await anyio.to_thread.run_sync(
                self._execute, [j.call for j in batch], [j.seed for j in batch])
        except BackendError as e:  # loading failed
            results = [e] * len(batch)
        except Exception as e:  # never leave a job unfinished: its caller would wait forever
            results = [TransientError(f"model {self.name!r}: {type(e).__name__}: {e}")
                       ] * len(batch)
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Reply):
                job.reply = result
            else:
                job.error = self._escalate(job, result)
            if not job.done.done():  # a cancelled caller's future is cancelled already
                job.done.set_result(None)

    def _escalate(self, job: _Job, error: BackendError) -> BackendError:
        """A generation error is transient once per call; the same call failing again is not."""
        if not isinstance(error, TransientError) or getattr(error, "oom", False):
            return error
        if job.digest in self._failed_once:
            return PermanentError(f"{error} (failed again on retry)")
        self._failed_once.add(job.digest)
        return error
