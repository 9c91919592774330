"""Issue 15: the per-call fan-outs (mentors, interns, judge answers, a backend's sub-requests)
are asyncio task groups (`backends.base.fan_out`), inside anyio's cancel scopes. Cancelling a
search, or a call failing for good, in the middle of one behaves as it did with anyio's task
groups: every task is cancelled and waited for, nothing is left running, nothing warns, the
error that stops the run is the same, and the run resumes to the same results."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import sim_config

import mics
from backends.base import BackendError, Call, FatalError, TransientError, fan_out, gather
from backends.simulated import SimulatedModel
from mics.config import parse_config
from mics.demo_data import write_demo_dataset
from mics.engine import Models
from mics.run import search_run, start_run
from mics.types import Reply

N = 4


def _me() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None
    return task


class Tracker:
    """Counts the blocked calls that started and that ended; `ready` once `target` started."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.started = 0
        self.ended = 0
        self.ready = asyncio.Event()

    async def block(self) -> None:
        self.started += 1
        if self.started >= self.target:
            self.ready.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.ended += 1


class Blocking(SimulatedModel):
    """A simulated model whose calls wait until cancelled when it has a tracker; an intern
    sends one sub-request per call through `gather`, as the HTTP interns do."""

    def __init__(self, config: Any, role: str, tracker: Tracker | None) -> None:
        super().__init__(config, role)
        self.tracker = tracker

    async def complete(self, call: Call) -> Reply:
        if self.tracker:
            await self.tracker.block()
        return await super().complete(call)

    async def rollout(self, calls: Sequence[Call]) -> list[Reply | BackendError]:
        tracker = self.tracker
        if tracker is None:
            return list(await super().rollout(calls))

        async def one(call: Call) -> Reply:
            await tracker.block()
            return self._reply(call)

        return await gather([lambda c=c: one(c) for c in calls])


def models(cfg: Any, role: str, tracker: Tracker) -> Models:
    def pick(r: str) -> Tracker | None:
        return tracker if r == role else None

    return Models(mentors=[Blocking(m, "mentor", pick("mentor")) for m in cfg.mentors],
                  interns=[Blocking(i, "intern", pick("intern")) for i in cfg.interns],
                  judge=Blocking(cfg.judge, "judge", pick("judge")))


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Path, Path]:
    return write_demo_dataset(tmp_path / "data", n=N)


def results(run: Path, out: Path) -> bytes:
    with mics.open_run(run) as r:
        r.export(out, ["reference", "step-values"])
    return (out / "results.jsonl").read_bytes() + (out / "step_values.jsonl").read_bytes()


# role blocked: calls started before the owner cancels (3 mentors; 3 interns with 2 samples
# per candidate, each a sub-request of a gather; 2 distinct answers judged together)
@pytest.mark.parametrize(("role", "target"), [("mentor", 3), ("intern", 4), ("judge", 2)])
def test_a_search_cancelled_mid_fan_out_leaves_nothing_running(tmp_path, demo, role, target):
    data, images = demo
    cfg = parse_config(sim_config())
    start_run(tmp_path / "R", cfg, data, images, None)
    loop_errors: list[dict[str, Any]] = []
    tracker = Tracker(target)

    async def owner() -> tuple[bool, bool, list[asyncio.Task], int]:
        asyncio.get_running_loop().set_exception_handler(lambda _l, c: loop_errors.append(c))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                async def cancel_when_ready() -> None:
                    await tracker.ready.wait()
                    scope.cancel()

                tg.start_soon(cancel_when_ready)
                await search_run(tmp_path / "R", models=models(cfg, role, tracker))
                tg.cancel_scope.cancel()  # it finished without blocking: the test fails below
        me = _me()
        left = [t for t in asyncio.all_tasks() if t is not me]
        return tracker.ready.is_set(), scope.cancelled_caught, left, me.cancelling()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ready, cancelled, left, cancelling = anyio.run(owner)
        gc.collect()  # a coroutine never awaited warns when it is collected
    assert ready and cancelled
    assert tracker.started >= target and tracker.ended == tracker.started  # none still waits
    assert left == [] and cancelling == 0
    assert loop_errors == [] and [str(w.message) for w in caught] == []
    finished = mics.resume_sync(tmp_path / "R")
    assert finished.succeeded + finished.failed == N
    mics.search_sync(cfg, data, tmp_path / "whole", image_root=images)
    assert results(tmp_path / "R", tmp_path / "o1") == results(tmp_path / "whole",
                                                                 tmp_path / "o2")


class Fatal(SimulatedModel):
    """A mentor whose endpoint refuses the key once the other mentors' calls are in flight."""

    def __init__(self, config: Any, role: str, tracker: Tracker) -> None:
        super().__init__(config, role)
        self.tracker = tracker

    async def complete(self, call: Call) -> Reply:
        await self.tracker.ready.wait()
        raise FatalError("invalid api key (injected)", status=401)


def test_a_fatal_error_in_a_fan_out_cancels_the_others_and_stops_the_run(tmp_path, demo):
    data, images = demo
    cfg = parse_config(sim_config())
    start_run(tmp_path / "R", cfg, data, images, None)

    async def go() -> tuple[Tracker, BaseException]:
        tracker = Tracker(2)  # the two other mentors are waiting
        ms = Models(mentors=[Blocking(cfg.mentors[0], "mentor", tracker),
                             Fatal(cfg.mentors[1], "mentor", tracker),
                             Blocking(cfg.mentors[2], "mentor", tracker)],
                    interns=[SimulatedModel(i, "intern") for i in cfg.interns],
                    judge=SimulatedModel(cfg.judge, "judge"))
        try:
            await search_run(tmp_path / "R", models=ms)
        except mics.RunError as e:
            return tracker, e
        raise AssertionError("the run did not stop")

    tracker, error = anyio.run(go)
    assert type(error) is mics.RunError and error.status == 401
    assert str(error).startswith("run stopped: ") and "invalid api key (injected)" in str(error)
    assert f"mics resume {tmp_path / 'R'}" in str(error)
    assert tracker.started >= 2 and tracker.ended == tracker.started  # none still waits


# ---------------------------------------------------------------- fan_out and gather alone


async def _never() -> None:
    await anyio.sleep_forever()


def test_fan_out_errors_cancel_the_others_and_leave_the_caller_uncancelled() -> None:
    """A task failing while the group waits: the others are cancelled, the errors come out in
    a group, and the caller's task is not left with a cancellation request (Python < 3.13
    leaves one: gh-116720)."""
    ended: list[str] = []

    async def waits(name: str) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            ended.append(name)

    async def fails() -> None:
        await anyio.sleep(0)
        raise ValueError("boom")

    async def main() -> tuple[BaseExceptionGroup, int]:
        try:
            await fan_out([waits("a"), fails(), waits("b")])
        except BaseExceptionGroup as group:
            return group, _me().cancelling()
        raise AssertionError("no error")

    group, cancelling = anyio.run(main)
    assert [type(e) for e in group.exceptions] == [ValueError] and sorted(ended) == ["a", "b"]
    assert cancelling == 0


def test_fan_out_under_an_anyio_deadline_is_cancelled_and_the_scope_catches_it() -> None:
    async def main() -> tuple[bool, int, int]:
        with anyio.move_on_after(0) as scope:  # cancelled at its first checkpoint
            await fan_out([_never(), _never(), _never()])
        return scope.cancelled_caught, len(asyncio.all_tasks()), _me().cancelling()

    assert anyio.run(main) == (True, 1, 0)


def test_one_coroutine_is_awaited_alone_and_its_error_is_itself() -> None:
    async def main() -> None:
        async def fails() -> None:
            raise KeyError("k")

        with pytest.raises(KeyError):
            await fan_out([fails()])
        await fan_out([])

    anyio.run(main)


def test_gather_keeps_order_and_backend_errors_in_their_slots() -> None:
    async def value(x: int) -> int:
        await anyio.sleep(0)
        return x

    async def broken() -> int:
        raise TransientError("down")

    async def main() -> list[Any]:
        funcs: list[Callable[[], Awaitable[int]]] = [
            lambda: value(1), broken, lambda: value(3), broken]
        return [*await gather(funcs), *await gather([broken]), *await gather([lambda: value(5)])]

    out = anyio.run(main)
    assert out[0] == 1 and out[2] == 3 and out[5] == 5
    assert [type(out[i]) for i in (1, 3, 4)] == [TransientError] * 3
