"""Analysis of stored trees and the `mics inspect` command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import anyio
import networkx as nx
import pytest
from helpers import ROOT
from test_exports import build_fixed_run, fixed_config
from typer.testing import CliRunner

from cli.app import app
from mics.analysis import (
    _kappa,
    chosen_path,
    load_prices,
    load_tree,
    load_trees,
    run_summary,
    stop_kind,
    tree_json,
    tree_summary,
)
from mics.config import RunConfig, load_config
from mics.records import StoredQuestion, read_nodes
from mics.run import search_run, start_run
from store import RunStore

TABLES = ("questions by stop reason and final depth", "MICS-Score by depth",
          "mentor win rate per depth", "intern accuracy per temperature",
          "agreement between interns", "calls, tokens and cost per role",
          "calls, tokens and cost per model", "failed questions", "trees",
          "cost per accepted example")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_fixed_run(tmp_path_factory.mktemp("an") / "run")


@pytest.fixture(scope="module")
def summary(run):
    with RunStore.open(run, write=False) as store:
        return run_summary(store, {"m0": {"input_per_mtok": 2.0, "output_per_mtok": 8.0,
                                          "cached_input_per_mtok": 1.0}})


def test_trees_match_the_store(run):
    with RunStore.open(run, write=False) as store:
        for qid, rec in store.iter_questions():
            nodes = store.get_nodes(qid)
            g = load_tree(store, qid)
            assert g.number_of_nodes() == len(nodes)
            assert nx.is_arborescence(g)
            s = tree_summary(g)
            assert s["node_count"] == len(nodes) and s["depth"] == rec["outcome"]["final_depth"]
            assert s["stop_kind"] == stop_kind(StoredQuestion.from_record(qid, rec))
            if rec["status"] == "succeeded":
                assert s["path_mentors"] == rec["outcome"]["generated_by"]
                assert s["chosen_path"][-1] == rec["outcome"]["details"]["node"]
            root = s["chosen_path"][0]
            assert g.nodes[root]["root"] and g.nodes[root]["depth"] == 0
            for _, a in g.nodes(data=True):
                assert {"depth", "mentor", "step", "score", "chosen", "samples", "usage"} <= set(a)
                if not a["root"]:
                    assert a["score"] == a["correct"] / a["total"]
                    assert len(a["samples"]) == a["total"]
                    assert a["usage"]["mentor"]["prompt_tokens"] > 0 or a["reused"]
            data = json.loads(json.dumps(tree_json(g)))
            assert len(data["nodes"]) == len(nodes) and len(data["edges"]) == len(nodes) - 1


def test_run_summary_tables(run, summary):
    t = summary["totals"]
    assert t["questions"] == 6 and t["succeeded"] == 5 and t["failed"] == 1
    assert sum(r["total"] for r in summary["stops"]) == 6
    assert {r["stop_kind"] for r in summary["stops"]} == {"full_score", "max_depth", "all_zero"}
    for d in {r["depth"] for r in summary["mentor_wins"]}:
        rows = [r for r in summary["mentor_wins"] if r["depth"] == d]
        assert sum(r["won"] for r in rows) == rows[0]["decisions"]
        assert sum(r["win_rate"] for r in rows) == pytest.approx(1.0)
    samples = sum(r["samples"] for r in summary["intern_accuracy"])
    candidates = sum(r["candidates"] for r in summary["score_by_depth"])
    assert samples == candidates * 4  # two interns x two temperatures
    assert {(r["intern"], r["temperature"]) for r in summary["intern_accuracy"]} == {
        (i, t) for i in ("i0", "i1") for t in (1.2, 0.2)}
    [pair] = summary["intern_agreement"]
    assert (pair["a"], pair["b"]) == ("i0", "i1") and pair["pairs"] == candidates * 2
    assert [f["qid"] for f in summary["failed_questions"]] == ["q1"]


def test_usage_and_cost(run, summary):
    with RunStore.open(run, write=False) as store:
        calls = store.iter_calls()
        m0 = [store.memo_get(c["key"])["usage"] for c in calls if c["model"] == "m0"]
    roles = {r["role"]: r for r in summary["usage_by_role"]}
    assert set(roles) == {"mentor", "intern", "judge"}
    assert sum(r["calls"] for r in roles.values()) == len(calls) == summary["totals"]["calls"]
    model = {r["model"]: r for r in summary["usage_by_model"]}
    assert model["m0"]["calls"] == len(m0)
    expected = (sum(u["prompt_tokens"] for u in m0) * 2.0
                + sum(u["completion_tokens"] for u in m0) * 8.0) / 1e6
    assert model["m0"]["cost"] == pytest.approx(expected) and model["m0"]["priced"]
    assert model["m1"]["cost"] is None and roles["mentor"]["cost"] is None  # unknown price
    assert summary["totals"]["cost"] is None and summary["totals"]["cost_per_accepted"] is None


def test_cost_per_accepted_with_every_price(run):
    with RunStore.open(run, write=False) as store:
        price = {"input_per_mtok": 1.0, "output_per_mtok": 1.0, "cached_input_per_mtok": 1.0}
        names = {c["model"] for c in store.iter_calls()}
        s = run_summary(store, {n: price for n in names})
    t = s["totals"]
    assert t["cost"] == pytest.approx((t["prompt_tokens"] + t["completion_tokens"]) / 1e6)
    # accepted: the full-score chains (what `export -f sft` keeps), not max-depth successes
    with RunStore.open(run, write=False) as store:
        full = sum(tree_summary(g)["stop_kind"] == "full_score" for g in load_trees(store))
    assert 0 < t["accepted"] == full and t["succeeded"] == 5
    assert t["accepted"] + t["max_depth"] == t["succeeded"]
    assert t["cost_per_accepted"] == pytest.approx(t["cost"] / full)


def test_prices_by_model_id_and_validation(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[prices."gpt-x"]\ninput_per_mtok = 1\noutput_per_mtok = 4\n')
    assert load_prices(p) == {"gpt-x": {"input_per_mtok": 1.0, "output_per_mtok": 4.0,
                                        "cached_input_per_mtok": 1.0}}
    for body, msg in (('["a"]\ninput_per_mtok = 1\n', "output_per_mtok missing"),
                      ('["a"]\ninput_per_mtok = 1\noutput_per_mtok = 1\nfoo = 2\n', "foo"),
                      ('["a"]\ninput_per_mtok = -1\noutput_per_mtok = 1\n', ">= 0"),
                      ('["a"]\ninput_per_mtok = "cheap"\n', r"input_per_mtok: expected a number")):
        p.write_text(body)
        with pytest.raises(ValueError, match=msg):
            load_prices(p)


def test_restarts_give_a_forest_and_the_last_attempt_path(tmp_path):
    run = build_fixed_run(tmp_path / "r", on_all_zero="restart:1")
    with RunStore.open(run, write=False) as store:
        nodes = read_nodes(store, "q1")
        g = load_tree(store, "q1")
    assert {n.attempt for n in nodes} == {0, 1}
    assert tree_summary(g)["attempts"] == 2
    assert nx.number_weakly_connected_components(g) == 2
    assert all(n.attempt == 1 for n in chosen_path(nodes))


def test_kappa():
    assert _kappa([(True, True), (False, False)]) == 1.0
    assert _kappa([(True, False), (False, True)]) == -1.0
    assert _kappa([(True, True)]) is None and _kappa([]) is None


def test_fixed_config_is_what_the_run_stored(run):
    with RunStore.open(run, write=False) as store:
        assert RunConfig.from_dict(store.get_meta("config")) == fixed_config()


# ---------------------------------------------------------------- CLI


def invoke(*args: str):
    res = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def test_inspect_run_prints_every_table(run, tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('["m0"]\ninput_per_mtok = 2\noutput_per_mtok = 8\n')
    out = invoke("inspect", str(run), "--prices", str(prices))
    for title in TABLES:
        assert title in out
    assert "—" in out and "$" in out  # m0 priced, the others unknown


def test_inspect_json_round_trips(run, summary):
    data = json.loads(invoke("inspect", str(run), "--json"))
    assert data["totals"]["questions"] == 6
    assert json.loads(json.dumps(data)) == data
    tree = json.loads(invoke("inspect", str(run), "q0", "--json"))
    assert tree["qid"] == "q0" and len(tree["nodes"]) == tree["node_count"]


def test_inspect_json_through_jq(run):
    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed")
    text = invoke("inspect", str(run), "--json")
    out = subprocess.run([jq, "-c", "."], input=text, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == json.loads(text)
    out = subprocess.run([jq, "-r", ".totals.questions"], input=text, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "6"


def test_inspect_unknown_question_and_run(run, tmp_path):
    res = CliRunner().invoke(app, ["inspect", str(run), "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "no run" in res.output


def test_chiron_demo_inspect(chiron, tmp_path):
    run = tmp_path / "R"
    cfg = load_config(ROOT / "examples" / "simulated.toml")
    start_run(run, cfg, chiron / "demo.jsonl", chiron / "images", None)
    anyio.run(lambda: search_run(run))
    out = invoke("inspect", str(run))
    for title in (t for t in TABLES if t != "failed questions"):
        assert title in out
    tree = invoke("inspect", str(run), "169992")
    assert "169992" in tree and "★ chosen" in tree and "root (attempt 0)" in tree
    with RunStore.open(run, write=False) as store:
        nodes = store.get_nodes("169992")
    assert len(re.findall(r"score \d\.\d\d \(\d+/\d+\)", tree)) == len(nodes) - 1
    data = json.loads(invoke("inspect", str(run), "169992", "--json"))
    assert len(data["nodes"]) == len(nodes)


def test_price_lookup_by_model_id_and_cached_tokens(run_store):
    """One priced call under a model id (its configured name differs), one unpriced one, and a
    failed judge call of two keys, in a real store."""
    run_store.put_meta("config", {"mentors": [{"name": "big", "model": "vendor/big-1"}],
                                  "interns": [], "judge": {"name": "judge", "model": "j"}})
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 500_000, "cached_tokens": 400_000,
             "latency_s": 0.0}
    for key, role, model in (("k1", "mentor", "big"), ("k2", "judge", "judge")):
        run_store.memo_put(key, {"text": "", "finish_reason": "stop", "usage": usage},
                           {"role": role, "model": model})
    run_store.add_failure({"kind": "call", "role": "judge", "model": "judge", "keys": ["a", "b"]})
    prices = {"vendor/big-1": {"input_per_mtok": 2.0, "output_per_mtok": 10.0,
                               "cached_input_per_mtok": 0.5}}
    s = run_summary(run_store, prices)
    big, judge = s["usage_by_model"]
    assert big["cost"] == pytest.approx(0.6 * 2.0 + 0.4 * 0.5 + 0.5 * 10.0)
    assert judge["cost"] is None and judge["failed_calls"] == 2
    assert s["totals"]["cost"] is None and s["totals"]["failed_calls"] == 2
