"""The call memo keys on the rendered prompt: a changed template never replays a stale reply.

Every model is served over real HTTP by the loopback server; run A fills a store; later runs
start from a copy of A's memo (every reply A ever got) and the server's request log shows what
had to be sent again.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from helpers import make_questions, sim_config

from backends.gate import CallGate
from bench.loopback import LoopbackServer
from mics.config import RunConfig, parse_config
from mics.engine import Engine
from mics.prompts import JUDGE_TEMPLATE, MENTOR_TEMPLATE
from mics.run import RunError, build_models, record_run
from store import RunStore

MODELS = {"m0": {"role": "mentor", "quality": 0.6}, "m1": {"role": "mentor", "quality": 0.4},
          "i0": {"role": "intern", "skill": 0.9}, "i1": {"role": "intern", "skill": 0.7},
          "judge": "judge"}
QUESTIONS = make_questions(4)
NEW_JUDGE = JUDGE_TEMPLATE.replace("Does the model answer semantically match",
                                   "Is the model answer, read literally, the same finding as")
NEW_MENTOR = MENTOR_TEMPLATE.replace("Scale the number of steps",
                                     "Be brief, and scale the number of steps")


def http_config(srv: LoopbackServer, **prompts: str) -> RunConfig:
    def model(name: str) -> dict:
        return {"name": name, "backend": "openai", "model": name, "base_url": f"{srv.url}/v1",
                "max_retries": 0}

    return parse_config({"search": {"seed": 0, "max_depth": 2, "concurrency": 4},
                         "mentors": [model("m0"), model("m1")],
                         "interns": [model("i0"), model("i1")],
                         "judge": model("judge"), "prompts": prompts})


def search(run: Path, cfg: RunConfig, session: str) -> tuple[dict, dict[str, int]]:
    """Search QUESTIONS in `run`; (outcomes by qid, calls this session sent, by role)."""
    async def go(store: RunStore) -> list:
        models = build_models(cfg)
        try:
            return await Engine(cfg, store, models, CallGate(store, session=session)).run(
                QUESTIONS)
        finally:
            await models.aclose()

    with RunStore.open(run, write=True, create=True) as store:
        outcomes = anyio.run(go, store)
        sent: dict[str, int] = {}
        for entry in store.iter_calls():
            if entry["session"] == session:
                sent[entry["role"]] = sent.get(entry["role"], 0) + 1
    return {o.qid: o.to_dict() for o in outcomes}, sent


def memo_of(run: Path) -> list[tuple[dict, dict]]:
    with RunStore.open(run, write=False) as store:
        return [(e, store.memo_get(e["key"])) for e in store.iter_calls()]


def with_memo(memo: list[tuple[dict, dict]], run: Path) -> Path:
    """A new run directory whose store already holds every reply of `memo`."""
    with RunStore.open(run, write=True, create=True) as store:
        for entry, reply in memo:
            store.memo_put(entry["key"], reply, {**entry, "session": "copied"})
    return run


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The loopback server and run A (default templates): its outcomes, sent calls and memo."""
    with LoopbackServer(MODELS, keep_bodies=True) as srv:
        run_a = tmp_path_factory.mktemp("A") / "run"
        outcomes, sent = search(run_a, http_config(srv), "A")
        assert set(sent) == {"mentor", "intern", "judge"} and len(srv.log) == sum(sent.values())
        yield srv, outcomes, memo_of(run_a)


def requests_during(srv: LoopbackServer, fn):
    before = len(srv.log)
    bodies_before = len(srv.bodies)
    result = fn()
    return result, srv.log[before:], srv.bodies[bodies_before:]


def test_same_templates_replay_everything_from_the_memo(served, tmp_path):
    srv, outcomes_a, memo = served
    run = with_memo(memo, tmp_path / "same")
    (outcomes, sent), log, _ = requests_during(srv, lambda: search(run, http_config(srv), "B"))
    assert log == [] and sent == {}  # nothing reached the server
    assert outcomes == outcomes_a


def test_a_changed_judge_template_sends_every_judge_call_again(served, tmp_path):
    srv, outcomes_a, memo = served
    run = with_memo(memo, tmp_path / "judge")
    cfg = http_config(srv, judge=NEW_JUDGE)
    (outcomes, sent), log, bodies = requests_during(srv, lambda: search(run, cfg, "C"))
    # mentors and interns got the same rendered prompts, so their replies came from the memo;
    # every judge call was rendered anew and had to go to the judge
    assert set(sent) == {"judge"} and sent.get("judge", 0) > 0, sent
    assert [e.role for e in log] == ["judge"] * sent["judge"]
    judge_texts = [str(body) for _path, body in bodies if body["model"] == "judge"]
    assert len(judge_texts) == sent["judge"]
    assert all("read literally, the same finding" in t for t in judge_texts)
    old_judge_keys = {e["key"] for e, _r in memo if e["role"] == "judge"}
    with RunStore.open(run, write=False) as store:
        new_keys = {e["key"] for e in store.iter_calls() if e["session"] == "C"}
    assert new_keys and not new_keys & old_judge_keys
    assert outcomes.keys() == outcomes_a.keys()


def test_a_changed_mentor_template_replays_no_mentor_reply(served, tmp_path):
    srv, _outcomes_a, memo = served
    cfg = http_config(srv, mentor=NEW_MENTOR)
    old_mentor_keys = {e["key"] for e, _r in memo if e["role"] == "mentor"}
    warm = with_memo(memo, tmp_path / "warm")
    (outcomes, sent), log, bodies = requests_during(srv, lambda: search(warm, cfg, "D"))
    mentor_bodies = [str(b) for _p, b in bodies if b["model"] in ("m0", "m1")]
    assert sent.get("mentor", 0) > 0 and len(mentor_bodies) == sent["mentor"]
    assert all("Be brief, and scale" in t for t in mentor_bodies)
    with RunStore.open(warm, write=False) as store:
        mentor_keys = {e["key"] for e in store.iter_calls()
                       if e["session"] == "D" and e["role"] == "mentor"}
    assert mentor_keys and not mentor_keys & old_mentor_keys
    # the old memo saved no mentor call at all: an empty store sends exactly as many
    (cold_outcomes, cold_sent), _log, _b = requests_during(
        srv, lambda: search(tmp_path / "cold", cfg, "E"))
    assert cold_sent["mentor"] == sent["mentor"]
    assert cold_outcomes == outcomes


def test_a_run_directory_refuses_other_templates(tmp_path):
    dataset = {"path": "d.jsonl", "sha256": "0" * 64, "image_root": None, "limit": None}
    base = parse_config(sim_config())
    with RunStore.open(tmp_path / "R", write=True, create=True) as store:
        record_run(store, base, dataset)
        record_run(store, parse_config(sim_config()), dataset)  # the same config is accepted
        with pytest.raises(RunError, match="different config"):
            record_run(store, parse_config({**sim_config(), "prompts": {"judge": NEW_JUDGE}}),
                       dataset)
        assert RunConfig.from_dict(store.get_meta("config")).prompts == base.prompts
