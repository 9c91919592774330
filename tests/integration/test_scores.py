"""Issue 10 items 1 and 6: every intern sample is its own call (shown by the loopback server's
own request log), and paths join with a single newline as the reference does."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import pytest
from helpers import make_questions, sim_config
from test_engine import run_engine

from bench.chaos import MODELS, QuietLoopbackServer, config_text
from mics.config import RunConfig, load_config, parse_config
from mics.demo_data import write_demo_dataset
from mics.run import search_run, start_run
from mics.types import ROOT_TEXT
from store import RunStore


def _http_search(tmp_path: Path, search_lines: str) -> tuple[list, dict[str, list[dict]]]:
    """One question, one depth, every model on the loopback server; its log and the tree."""
    data, images = write_demo_dataset(tmp_path / "data", n=1)
    with QuietLoopbackServer(MODELS) as srv:
        cfg = tmp_path / "c.toml"
        cfg.write_text(config_text(srv.url, max_depth=1).replace(
            "[search]\n", f"[search]\n{search_lines}\n"))
        start_run(tmp_path / "R", load_config(cfg), data, images, None)
        anyio.run(lambda: search_run(tmp_path / "R"))
        log = srv.log
    with RunStore.open(tmp_path / "R", write=False) as store:
        trees = {qid: store.get_nodes(qid) for qid, _ in store.iter_questions()}
    return log, trees


@pytest.mark.parametrize("search", [
    "intern_samples = [1.0, 1.0, 1.0]",
    "intern_samples = [1.0]\nsamples_per_temperature = 3",
])
def test_k_samples_at_one_temperature_are_k_requests(tmp_path: Path, search: str) -> None:
    log, trees = _http_search(tmp_path, search)
    [nodes] = trees.values()
    candidates = [n for n in nodes if n["depth"] == 0]
    assert len(candidates) == 3
    intern = [e for e in log if e.role == "intern" and e.ok]
    # the server saw 3 distinct requests per (candidate, intern), numbered 0, 1, 2
    assert len({e.key for e in intern}) == len(candidates) * 3 * 3
    per_model = Counter((e.model, e.sample_index) for e in intern)
    assert set(per_model) == {(f"i{j}", k) for j in range(3) for k in range(3)}
    for n in candidates:
        assert n["total"] == 9
        assert Counter((s["intern"], s["sample_index"]) for s in n["samples"]) == Counter(
            {(f"i{j}", k): 1 for j in range(3) for k in range(3)})


def test_default_temperatures_keep_sample_number_zero(tmp_path: Path) -> None:
    """[1.2, 0.2]: two requests per (candidate, intern), both numbered 0 - the call keys of
    runs made before this change, so replaying them still hits the memo."""
    assert parse_config(sim_config()).search.sample_plan() == ((1.2, 0), (0.2, 0))
    log, trees = _http_search(tmp_path, "")
    intern = [e for e in log if e.role == "intern" and e.ok]
    assert len({e.key for e in intern}) == 3 * 3 * 2
    assert {e.sample_index for e in intern} == {0}
    assert {e.temperature for e in intern} == {1.2, 0.2}


def test_sample_plan_numbers_repeats_per_temperature() -> None:
    cfg = parse_config(sim_config(intern_samples=[1.2, 0.2, 1.2], samples_per_temperature=2))
    assert cfg.search.sample_plan() == ((1.2, 0), (1.2, 1), (0.2, 0), (0.2, 1), (1.2, 2),
                                        (1.2, 3))
    with pytest.raises(ValueError, match="samples_per_temperature"):
        parse_config(sim_config(samples_per_temperature=0))


@pytest.mark.parametrize(("join", "sep"), [("newline", "\n"), ("blank_line", "\n\n")])
def test_path_and_step_join(tmp_path: Path, join: str, sep: str) -> None:
    """Spec 2.1-2.3: prefix shown to interns = path + "\\n" + step; chain = prefix + "\\n" +
    continuation. `step_join = "blank_line"` keeps the old join."""
    cfg = parse_config(sim_config(step_join=join))
    qs = make_questions(3)
    with RunStore.open(tmp_path / "r", create=True) as store:
        run_engine(store, cfg, qs)
        for q in qs:
            nodes = store.get_nodes(q.qid)
            by_id = {n["node_id"]: n for n in nodes}
            for n in nodes:
                if n["depth"] < 0:
                    continue
                parent = by_id[n["parent_id"]]
                assert n["prefix"] == parent["prefix"] + sep + n["step"]
                if not n["reused"]:  # a reused step keeps its mentor's earlier chain
                    assert n["chain"].startswith(parent["prefix"] + sep + n["step"])
                if n["depth"] == 0:  # the two root steps: a blank line, as the reference
                    assert "\n\n### Step 2" in n["step"]
                    assert n["prefix"].startswith(ROOT_TEXT + sep + "### Step 1")


def test_a_run_stored_before_step_join_resumes_with_its_blank_line() -> None:
    cfg = parse_config(sim_config())
    assert cfg.search.step_join == "newline"
    old = cfg.to_dict()
    del old["search"]["step_join"]
    assert RunConfig.from_dict(old).search.step_join == "blank_line"
    assert RunConfig.from_dict(cfg.to_dict()).search.step_join == "newline"
