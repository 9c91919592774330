"""The two protocols the engine sees models through, and the errors backends raise.

Mentors and the judge are `ChatModel`s (one prompt in, one reply out); interns are
`RolloutModel`s (a batch of prompts in, one reply each out, so shared prefixes can be reused).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from mics.config import ModelConfig
from mics.errors import (  # noqa: F401 - the error kinds backends raise, re-exported
    BackendError,
    FatalError,
    OutOfMemoryError,
    PermanentError,
    TransientError,
)
from mics.types import Prompt, Reply, Sampling


@dataclass(frozen=True)
class Call:
    """One model call: the prompt, explicit sampling parameters and a sample index."""

    prompt: Prompt
    sampling: Sampling
    sample_index: int = 0
    # (identity JSON, key) of this call's latest `backends.keys.call_key`: the gate hashes a
    # call, then an SGLang intern hashes the same call object again for its sampling seed
    _key_memo: tuple[bytes | None, str] | None = field(default=None, init=False, repr=False,
                                                        compare=False)


@runtime_checkable
class ChatModel(Protocol):
    """A chat-completion model (mentors, judge)."""

    config: ModelConfig

    def identity(self) -> dict[str, Any]:
        """What, besides the call itself, determines the reply (part of the memo key)."""
        ...

    async def complete(self, call: Call) -> Reply: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RolloutModel(Protocol):
    """A batched generator (interns): one reply per call, in order."""

    config: ModelConfig

    def identity(self) -> dict[str, Any]: ...

    async def rollout(self, calls: Sequence[Call]) -> list[Reply | BackendError]:
        """One result per call, in order. A BackendError in a slot fails only that call (the
        gate retries just those); raising one fails the whole batch."""
        ...

    async def aclose(self) -> None: ...

    # Optional: `requests_for(calls) -> int`, the HTTP requests `rollout(calls)` sends, which
    # the gate charges to `requests_per_minute` (see `http_requests`; 1 when absent).


def http_requests(model: RolloutModel, calls: Sequence[Call]) -> int:
    """The HTTP requests a rollout of `calls` sends: the model's `requests_for(calls)` when it
    defines one (a backend that sends one request per call), else 1 (one batched request)."""
    count = getattr(model, "requests_for", None)
    return max(1, int(count(calls))) if count is not None else 1


T = TypeVar("T")
_LATE_UNCANCEL = sys.version_info < (3, 13)  # see fan_out


async def fan_out(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Await `coros` concurrently, each in its own task; return when all have finished.

    The per-call fan-outs (mentors, interns, judge answers, a backend's sub-requests) use an
    `asyncio.TaskGroup`, a third of the CPU of an anyio task group (issue 15); so anyio must run
    on its asyncio backend, as it does everywhere in mics (`MemoWriter` uses asyncio directly
    too). The semantics are a task group's: if one raises, the others are cancelled and the
    errors come out in a BaseExceptionGroup; when the caller is cancelled (by an anyio cancel
    scope too) every task is cancelled and waited for. One coroutine is simply awaited (no
    task; an error comes out as itself), and none costs nothing.

    The tasks are asyncio's own, so an anyio shield inside one (`anyio.to_thread.run_sync`)
    does not hold off the group's cancellation: the task stops waiting while the thread runs
    on. Work that must not be abandoned runs in a task of its own (the local backend's batch
    queue has a worker task that callers only wait on)."""
    if len(coros) <= 1:
        if coros:
            await coros[0]
        return
    tg = asyncio.TaskGroup()
    try:
        async with tg:
            for coro in coros:
                tg.create_task(coro)
    except BaseExceptionGroup:
        if _LATE_UNCANCEL and getattr(tg, "_parent_cancel_requested", False):
            # a task failed while the group waited: before 3.13 the group cancels its parent
            # for it and never withdraws that request (gh-116720); withdraw it as 3.13 does
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        raise


async def gather(funcs: Sequence[Callable[[], Awaitable[T]]]) -> list[T | BackendError]:
    """Run concurrently (`fan_out`), results in order; a call that raised a BackendError leaves
    that error in its slot (never an ExceptionGroup), so one failure does not cost the others.
    Any other error cancels the rest and comes out as `fan_out` raises it."""
    results: list[Any] = [None] * len(funcs)

    async def one(i: int, fn: Callable[[], Awaitable[T]]) -> None:
        try:
            results[i] = await fn()
        except BackendError as e:
            results[i] = e

    await fan_out([one(i, fn) for i, fn in enumerate(funcs)])
    return results
