"""The async engine end to end with simulated models and a real LMDB store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import anyio
import pytest
from helpers import make_questions, sim_config

from backends.base import Call
from backends.gate import CallGate
from backends.simulated import SimulatedModel
from bench.reference_engine import ReferenceEngine
from mics.config import parse_config
from mics.engine import Engine, Models
from mics.run import build_models
from mics.types import ImageRef, Sampling
from store import RunStore


class Recording(SimulatedModel):
    """A simulated model that keeps every call it receives (a real backend, not a patch)."""

    def __init__(self, config, role):
        super().__init__(config, role)
        self.calls: list[Call] = []
        self.batches: list[int] = []

    async def complete(self, call: Call):
        self.calls.append(call)
        return await super().complete(call)

    async def rollout(self, calls: Sequence[Call]):
        self.calls.extend(calls)
        self.batches.append(len(calls))
        return await super().rollout(calls)


def recording_models(cfg) -> Models:
    return Models(
        mentors=[Recording(m, "mentor") for m in cfg.mentors],
        interns=[Recording(i, "intern") for i in cfg.interns],
        judge=Recording(cfg.judge, "judge"),
    )


def run_engine(store, cfg, questions, models=None):
    models = models or build_models(cfg)
    gate = CallGate(store, session="test")
    outcomes = anyio.run(lambda: Engine(cfg, store, models, gate).run(questions))
    return {o.qid: o for o in outcomes}, gate, models


def tree_dump(store, qids):
    return {q: store.get_nodes(q) for q in qids}, {q: store.get_question(q) for q in qids}


def test_search_stores_every_node_and_outcome(tmp_path, config):
    qs = make_questions(6)
    with RunStore.open(tmp_path / "r", create=True) as store:
        outcomes, gate, _ = run_engine(store, config, qs)
        assert set(outcomes) == {q.qid for q in qs}
        for q in qs:
            rec = store.get_question(q.qid)
            assert rec["status"] == outcomes[q.qid].status in ("succeeded", "failed")
            assert rec["outcome"] == outcomes[q.qid].to_dict()
            nodes = store.get_nodes(q.qid)
            assert nodes[0]["node_id"].endswith("root") or any(
                n["depth"] == -1 for n in nodes)
            o = outcomes[q.qid]
            if o.status == "succeeded":
                assert o.reasoning.startswith("Let's think about")
                assert "### The final answer is:" in o.reasoning
                assert len(o.generated_by) == o.final_depth
                assert all(len(s) == o.final_depth for s in o.scores.values())
                chosen = [n for n in nodes if n["chosen"] and n["depth"] >= 0]
                assert [n["mentor"] for n in chosen] == o.generated_by
            else:  # a failure says why, and names no chain
                assert o.stop_reason == "all_zero" and o.error and o.reasoning == ""
        succeeded = [o for o in outcomes.values() if o.status == "succeeded"]
        assert succeeded, "no question succeeded: the checks above never ran"
        assert any(o.final_depth > 1 for o in succeeded)  # the path checks met a deeper tree
        assert gate.counts["sent"] == store.call_count()


def test_same_seed_same_trees_and_different_concurrency(tmp_path):
    qs = make_questions(6)
    dumps = []
    for i, conc in enumerate((1, 8)):
        cfg = parse_config(sim_config(concurrency=conc))
        with RunStore.open(tmp_path / f"r{i}", create=True) as store:
            run_engine(store, cfg, qs)
            dumps.append(tree_dump(store, [q.qid for q in qs]))
    assert dumps[0] == dumps[1]


def test_replay_against_full_memo_sends_nothing(tmp_path, config):
    qs = make_questions(5)
    with RunStore.open(tmp_path / "r", create=True) as store:
        _, first_gate, _ = run_engine(store, config, qs)
        before = tree_dump(store, [q.qid for q in qs])
        for q in qs:  # forget the outcomes, keep the memo: a full replay
            store.put_question(q.qid, {"status": "running", "index": q.index})
        _, gate, _ = run_engine(store, config, qs)
        assert gate.counts["sent"] == 0
        assert gate.counts["memo_hits"] > 0
        assert tree_dump(store, [q.qid for q in qs]) == before
        assert store.call_count() == first_gate.counts["sent"]


def test_finished_questions_are_skipped(tmp_path, config):
    qs = make_questions(3)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, config, qs)
        outcomes, gate, _ = run_engine(store, config, qs)
        assert outcomes == {} and gate.counts["sent"] == 0 and gate.counts["memo_hits"] == 0


def test_b13_fresh_tree_per_question(tmp_path, config):
    qs = make_questions(4)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, config, qs)
        for q in qs:
            nodes = store.get_nodes(q.qid)
            roots = [n for n in nodes if n["parent_id"] is None]
            assert len(roots) >= 1
            ids = {n["node_id"] for n in nodes}
            assert all(n["parent_id"] in ids for n in nodes if n["parent_id"] is not None)
            # every candidate's prefix extends its parent's prefix: one tree, this question's
            by_id = {n["node_id"]: n for n in nodes}
            for n in nodes:
                if n["parent_id"] is not None:
                    assert n["prefix"].startswith(by_id[n["parent_id"]]["prefix"])


def test_b8_b9_explicit_sampling_and_per_intern_prompts(tmp_path):
    image = ImageRef(path="/nonexistent/x.png", sha256="ab" * 32, mime="image/png",
                     width=4, height=4)
    q = replace(make_questions(1)[0], images=(image,), image_paths=("x.png",))
    cfg = parse_config(sim_config(max_depth=1, intern_top_p=0.9, intern_top_k=20,
                                  intern_max_tokens=256))
    models = recording_models(cfg)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, cfg, [q], models)
        nodes = [n for n in store.get_nodes(q.qid) if n["depth"] == 0]
    for intern in models.interns:
        temps = sorted(c.sampling.temperature for c in intern.calls)
        assert temps == sorted([0.2, 1.2] * len(nodes))
        for c in intern.calls:  # B8: every sampling parameter explicit, from config
            assert (c.sampling.top_p, c.sampling.top_k, c.sampling.max_tokens) == (0.9, 20, 256)
        # B9: each intern's prompt is the clean layout, no "<image>" tags leaked into the text
        for c in intern.calls:
            assert "<image>" not in c.prompt.user_text()
            assert c.prompt.images() == (image,)
    prompts = {c.prompt for i in models.interns for c in i.calls}
    assert len(prompts) == len(nodes)  # all interns got identical prompts per candidate
    for c in models.judge.calls:  # the judge gets the clean question, no image tags
        assert q.question in c.prompt.user_text() and "<image>" not in c.prompt.user_text()
        assert c.sampling.temperature == 0.0


def test_calls_of_one_setting_share_one_sampling_object(tmp_path, config):
    """Issue 15: a call key serializes each Sampling object once, so the engine makes one per
    setting (mentor, judge, each planned intern sample) for all its calls; equal to before."""
    models = recording_models(config)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, config, make_questions(2), models)
    s = config.search

    def shared(calls):
        [sampling] = {id(c.sampling): c.sampling for c in calls}.values()
        return sampling

    assert shared([c for m in models.mentors for c in m.calls]) == Sampling(
        temperature=s.mentor_temperature, top_p=s.mentor_top_p, max_tokens=s.mentor_max_tokens)
    assert shared(models.judge.calls) == Sampling(temperature=s.judge_temperature,
                                                  max_tokens=s.judge_max_tokens)
    for t_i, (temp, _number) in enumerate(s.sample_plan()):
        calls = [c for i in models.interns for c in i.calls[t_i::len(s.sample_plan())]]
        assert shared(calls) == Sampling(temperature=temp, top_p=s.intern_top_p,
                                         top_k=s.intern_top_k, max_tokens=s.intern_max_tokens)


def test_b3_reused_step_is_a_real_step(tmp_path):
    cfg = parse_config(sim_config(max_depth=3))
    qs = make_questions(6)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, cfg, qs)
        nodes = [n for q in qs for n in store.get_nodes(q.qid) if n["depth"] >= 0]
    assert nodes
    for n in nodes:
        assert n["step"].startswith("### Step ")
        assert "final answer" not in n["step"].lower()
    assert any(n["reused"] for n in nodes)  # some selected mentors continued their own chain


def test_mentor_failure_is_recorded_not_fatal(tmp_path):
    data = sim_config(max_depth=2)
    data["mentors"][2]["options"] = {"quality": 0.5, "malformed_rate": 1.0}
    cfg = parse_config(data)
    qs = make_questions(3)
    with RunStore.open(tmp_path / "r", create=True) as store:
        outcomes, _, _ = run_engine(store, cfg, qs)
        assert len(outcomes) == 3
        for q in qs:
            assert all(n["mentor"] != "m2" for n in store.get_nodes(q.qid))
            o = outcomes[q.qid]
            assert o.scores["m2"] == [None] * len(o.scores["m2"])  # no candidate: no score
            errors = o.details["mentor_errors_by_depth"]
            assert set(errors) == {str(d + 1) for d in range(o.final_depth)}
            assert all("malformed" in e["m2"] for e in errors.values())


def test_all_mentors_malformed_fails_question_with_cause(tmp_path):
    data = sim_config()
    for m in data["mentors"]:
        m["options"] = {"malformed_rate": 1.0}
    cfg = parse_config(data)
    with RunStore.open(tmp_path / "r", create=True) as store:
        outcomes, _, _ = run_engine(store, cfg, make_questions(1))
    o = outcomes["q0"]
    assert (o.status, o.stop_reason, o.stage) == ("failed", "no_mentor", "mentor")
    assert set(o.details["mentor_errors"]) == {"m0", "m1", "m2"}
    assert "malformed" in o.details["mentor_errors"]["m0"]


@pytest.mark.parametrize("mode", ["fail", "restart:2"])
def test_all_zero_fail_or_restart(tmp_path, mode):
    data = sim_config(on_all_zero=mode)
    for m in data["mentors"]:
        m["options"] = {"quality": 0.0}  # no clues: interns never get it right
    cfg = parse_config(data)
    with RunStore.open(tmp_path / "r", create=True) as store:
        outcomes, gate, _ = run_engine(store, cfg, make_questions(1))
        nodes = store.get_nodes("q0")
    o = outcomes["q0"]
    assert (o.status, o.stop_reason, o.error) == ("failed", "all_zero",
                                                  "All mentor scores are zero.")
    attempts = {n["attempt"] for n in nodes}
    assert attempts == ({0} if mode == "fail" else {0, 1, 2})
    assert o.details["attempts"] == len(attempts)


def test_reference_schedule_builds_the_same_trees_one_call_at_a_time(tmp_path):
    qs = make_questions(5)
    dumps = []
    for i, schedule in enumerate(("concurrent", "reference")):
        cfg = parse_config(sim_config(concurrency=1 if schedule == "reference" else 8))
        models = recording_models(cfg)
        with RunStore.open(tmp_path / f"r{i}", create=True) as store:
            kind = ReferenceEngine if schedule == "reference" else Engine
            engine = kind(cfg, store, models, CallGate(store, session="test"))
            anyio.run(engine.run, qs)
            dumps.append(tree_dump(store, [q.qid for q in qs]))
        batches = [b for intern in models.interns for b in intern.batches]
        if schedule == "reference":  # every intern call went out alone
            assert set(batches) == {1}
        else:  # all candidates x temperatures of a depth in one batch per intern
            assert max(batches) > 1
    assert dumps[0] == dumps[1]


def test_a_judge_reply_that_is_neither_yes_nor_no_defers_never_counts_wrong(tmp_path):
    """A verdict the judge did not give is not a "no": after the second ask the depth is
    deferred, naming the judge's reply, and no score is written from it."""
    from helpers import sim_config

    from mics.config import parse_config

    data = sim_config()
    data["judge"]["options"] = {"unparsable_rate": 1.0}
    qs = make_questions(3)
    with RunStore.open(tmp_path / "r", create=True) as store:
        outcomes, gate, _ = run_engine(store, parse_config(data), qs)
        judge_calls = [c for c in store.iter_calls() if c["role"] == "judge"]
    assert {o.status for o in outcomes.values()} == {"deferred"}
    for o in outcomes.values():
        assert "neither Yes nor No" in o.error and "judge" in o.details["endpoints"]
        assert o.scores == {m: [] for m in o.scores} or all(not s for s in o.scores.values())
    assert {c["key"] for c in judge_calls} and all(c["attempts"] == 1 for c in judge_calls)
    data["judge"]["options"] = {"unparsable_rate": 0.3}  # a second ask mostly clears it
    with RunStore.open(tmp_path / "r2", create=True) as store:
        outcomes, _, _ = run_engine(store, parse_config(data), make_questions(6))
    assert {o.status for o in outcomes.values()} <= {"succeeded", "failed", "deferred"}
    assert any(o.status == "succeeded" for o in outcomes.values())
