"""The two protocols the engine sees models through, and the errors backends raise.

Mentors and the judge are `ChatModel`s (one prompt in, one reply out); interns are
`RolloutModel`s (a batch of prompts in, one reply each out, so shared prefixes can be reused).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio

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


T = TypeVar("T")


async def gather(funcs: Sequence[Callable[[], Awaitable[T]]]) -> list[T | BackendError]:
    """Run concurrently, results in order; a call that raised a BackendError leaves that error
    in its slot (never an ExceptionGroup), so one failure does not cost the others."""
    if len(funcs) == 1:  # nothing to run beside it: no task group (issue 15)
        try:
            return [await funcs[0]()]
        except BackendError as e:
            return [e]
    results: list[Any] = [None] * len(funcs)

    async def one(i: int, fn: Callable[[], Awaitable[T]]) -> None:
        try:
            results[i] = await fn()
        except BackendError as e:
            results[i] = e

    async with anyio.create_task_group() as tg:
        for i, fn in enumerate(funcs):
            tg.start_soon(one, i, fn)
    return results
