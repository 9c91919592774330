"""Grouped memo commits: replies arriving together share one write transaction, and each is
committed before its caller goes on; through the call gate, over real HTTP and LMDB."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from backends.base import Call
from backends.gate import CallGate
from backends.memo_writer import MemoWriter
from backends.openai_chat import OpenAIChat
from bench.loopback import LoopbackServer
from mics.config import ModelConfig
from mics.types import Prompt, Reply, Sampling, Text
from store import RunStore
from store.lmdb_store import StoreError, commits_in_process


def test_puts_in_one_loop_turn_share_one_commit(tmp_path: Path) -> None:
    with RunStore.open(tmp_path / "run", write=True, create=True) as store:
        writer = MemoWriter(store)
        seen: list[bool] = []

        async def one(i: int) -> None:
            await writer.put([(f"k{i}", {"text": str(i)}, {"role": "judge"})])
            seen.append(store.memo_get(f"k{i}") == {"text": str(i)})  # committed on return

        async def go() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)

        before = commits_in_process()
        anyio.run(go)
        assert seen == [True] * 20
        assert writer.commits == 1 and commits_in_process() - before == 1
        assert store.call_count() == 20 and store.memo_count() == 20

        async def later() -> None:  # a lone reply still commits at once, alone
            await writer.put([("solo", {"text": "s"}, {})])

        anyio.run(later)
        assert writer.commits == 2 and store.memo_get("solo") == {"text": "s"}


def test_a_failed_commit_fails_every_reply_of_its_round(tmp_path: Path) -> None:
    RunStore.open(tmp_path / "run", write=True, create=True).close()
    with RunStore.open(tmp_path / "run", write=False) as store:  # writes are refused
        writer = MemoWriter(store)
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                await writer.put([(f"k{i}", {}, {})])
            except StoreError as e:
                errors.append(e)

        async def go() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(one, i)

        anyio.run(go)
        assert len(errors) == 5 and writer.commits == 0


def test_gate_groups_concurrent_replies_and_stores_each(tmp_path: Path) -> None:
    with LoopbackServer({"judge": {"role": "judge"}}) as srv, \
            RunStore.open(tmp_path / "run", write=True, create=True) as store:
        model = OpenAIChat(ModelConfig(name="judge", backend="openai", model="judge",
                                       base_url=f"{srv.url}/v1", max_concurrency=32))
        gate = CallGate(store, session="t")
        calls = [Call(Prompt("s", (Text(f"Model answer: a{k}\n\nCorrect answer: a{k % 3}"),)),
                      Sampling(temperature=0.0, max_tokens=8)) for k in range(60)]
        out: list[object] = [None] * len(calls)

        async def one(i: int) -> None:
            out[i] = await gate.chat(model, calls[i], role="judge", qid=f"q{i}")

        async def go() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(len(calls)):
                    tg.start_soon(one, i)
            await model.aclose()

        before = commits_in_process()
        anyio.run(go)
        commits = commits_in_process() - before
        assert all(isinstance(r, Reply) for r in out)
        assert store.call_count() == 60 == store.memo_count()
        assert gate.memo_commits == commits < 60  # some replies shared a commit
        assert gate.counts["sent"] == 60


@pytest.mark.parametrize("joiners", [0, 3])
def test_inflight_events_are_made_only_for_joined_calls(tmp_path: Path, joiners: int) -> None:
    with LoopbackServer({"judge": {"role": "judge"}}, latency={"judge": 0.05}) as srv, \
            RunStore.open(tmp_path / "run", write=True, create=True) as store:
        model = OpenAIChat(ModelConfig(name="judge", backend="openai", model="judge",
                                       base_url=f"{srv.url}/v1"))
        gate = CallGate(store)
        call = Call(Prompt("s", (Text("Model answer: a\n\nCorrect answer: a"),)),
                    Sampling(temperature=0.0, max_tokens=8))
        events: list[object] = []
        results: list[object] = []

        async def one() -> None:
            results.append(await gate.chat(model, call, role="judge", qid="q"))

        async def go() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(1 + joiners):
                    tg.start_soon(one)
                await anyio.sleep(0.02)
                events.extend(gate.in_flight.values())
            await model.aclose()

        anyio.run(go)
        assert gate.counts["sent"] == 1 and gate.counts["joined"] == joiners
        assert len(results) == 1 + joiners and len({r.text for r in results}) == 1
        assert (events[0] is None) == (joiners == 0)
        assert not gate.in_flight
