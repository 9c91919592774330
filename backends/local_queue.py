"""The `local` backend's async batching queue: concurrent `rollout()` calls share batches.

Calls are queued; whoever holds the queue's lock takes the oldest group of calls with the same
`max_tokens` (up to `max_batch`) and runs it with the executor in a worker thread, so the event
loop never blocks. A generation error is transient once per call; the same call failing again
is permanent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
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
    reply: Reply | None = None
    error: BackendError | None = None

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.error is not None


class BatchQueue:
    """Batches concurrent callers' calls for one blocking executor (one batch at a time)."""

    def __init__(self, name: str, execute: Executor, *, max_batch: int, seed: int) -> None:
        self.name = name
        self._execute = execute
        self._max_batch = max_batch
        self._seed = seed
        self._pending: list[_Job] = []
        self._lock = anyio.Lock()
        self._failed_once: set[str] = set()

    async def submit(self, calls: Sequence[Call]) -> list[Reply]:
        """One reply per call, in order; raises the first call's error if any call failed."""
        jobs = [self._job(c) for c in calls]
        self._pending.extend(jobs)
        try:
            await anyio.sleep(0)  # let callers started in the same tick join this batch
            while not all(j.finished for j in jobs):
                async with self._lock:
                    if all(j.finished for j in jobs):
                        break
                    await self._run(self._take_batch())
        finally:
            mine = {id(j) for j in jobs}
            self._pending = [j for j in self._pending if id(j) not in mine]
        for j in jobs:
            if j.error is not None:
                raise type(j.error)(str(j.error))
        return [j.reply for j in jobs if j.reply is not None]

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """`fn()` in a worker thread once no batch is running (e.g. to unload the model)."""
        async with self._lock:
            return await anyio.to_thread.run_sync(fn)

    def _job(self, call: Call) -> _Job:
        digest = call_key(None, call)
        return _Job(call, digest, call_seed(self._seed, digest))

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

    def _escalate(self, job: _Job, error: BackendError) -> BackendError:
        """A generation error is transient once per call; the same call failing again is not."""
        if not isinstance(error, TransientError) or getattr(error, "oom", False):
            return error
        if job.digest in self._failed_once:
            return PermanentError(f"{error} (failed again on retry)")
        self._failed_once.add(job.digest)
        return error
