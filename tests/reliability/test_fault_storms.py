"""Reliability: fault storms over HTTP and models that always fail (issue 7 and issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import read_jsonl

from bench.chaos import (
    MODELS,
    QuietLoopbackServer,
    Session,
    config_text,
    run_mics,
    run_storm,
)
from bench.loopback import Faults
from mics.demo_data import write_demo_dataset
from mics.export import export_reference
from store import RunStore


def test_fault_storm_every_question_completes(tmp_path: Path) -> None:
    """20% of requests fail (429 + Retry-After, 500, 503, timeouts, drops, truncated JSON)."""
    r = run_storm(questions=4, rate=0.2, seed=2, workdir=tmp_path, max_retries=6)
    assert r["exit_code"] == 0
    assert set(r["faults_by_kind"]) == {"429", "500", "503", "slow", "drop", "malformed"}
    assert r["faults_injected"] > 30
    assert r["questions_finished"] == 4 and r["questions_no_mentor"] == 0
    assert r["retried_calls"] > 0 and r["retries_recorded_on_call"]
    assert r["max_attempts"] <= r["attempt_bound"]
    assert r["failed_call_attempts_max"] <= r["attempt_bound"]


def test_fault_storm_never_rebuys_a_delivered_reply(tmp_path: Path) -> None:
    r = run_storm(questions=1, rate=0.2, seed=2, workdir=tmp_path, kinds=("500",))
    assert r["questions_finished"] == 1
    assert r["delivered_replies_resent"] == 0, r["delivered_replies_resent_by_role"]


def _forced_run(tmp_path: Path, forced: dict[str, str]) -> tuple[Session, Path, Path]:
    data, images = write_demo_dataset(tmp_path / "data", n=2)
    with QuietLoopbackServer(MODELS, faults=Faults(forced=forced)) as srv:
        cfg = tmp_path / "run.toml"
        cfg.write_text(config_text(srv.url, max_retries=2))
        run, out = tmp_path / "R", tmp_path / "O"
        s = run_mics(["search", data, "--image-root", images, "--config", cfg, "--run", run])
    with RunStore.open(run, write=False) as store:
        export_reference(store, out)
    return s, run, out


ALL_MENTORS = {"m0": "500", "m1": "500", "m2": "500"}
ALL_INTERNS = {"i0": "503", "i1": "503", "i2": "503"}


@pytest.mark.parametrize("forced", [
    pytest.param({"m1": "500"}, id="one-mentor"),
    pytest.param({"i2": "503"}, id="one-intern"),
    pytest.param(ALL_MENTORS, id="all-mentors"),
    pytest.param({"judge": "500"}, id="judge"),
    pytest.param(ALL_INTERNS, id="all-interns"),
])
def test_a_model_that_always_fails(tmp_path: Path, forced: dict[str, str]) -> None:
    """Issue 10: every question that met the failing model is deferred, never scored (exit 3
    and one line naming the model); each failed call is recorded with every attempt's error
    and the bound on attempts (or, once the endpoint's circuit breaker is open, fails at once
    saying so). Before issue 10 such runs exited 0 with the failures scored as wrong."""
    s, run, out = _forced_run(tmp_path, forced)
    assert s.rc == 3, s.stderr
    line = " ".join(s.stderr.split())
    assert "2 questions deferred:" in line and any(m in line for m in forced), line
    with RunStore.open(run, write=False) as store:
        recs = {qid: rec for qid, rec in store.iter_questions()}
        failures = store.iter_failures()
    assert len(recs) == 2 and all(r["status"] == "deferred" and r["retryable"]
                                  for r in recs.values())
    assert {f["model"] for f in failures} == set(forced)
    for f in failures:
        if f["error"].startswith("circuit open"):
            assert f["attempts"] <= 3 and f"endpoint {f['model']}" in f["error"]
        else:
            assert f["attempts"] == 3 and len(f["errors"]) == 3  # max_retries = 2: bounded
            assert f"HTTP {forced[f['model']]}" in f["error"]
    assert {f["qid"] for f in failures} == set(recs)  # every question met the failing model
    for rec in recs.values():
        assert set(rec["outcome"]["details"]["endpoints"]) <= set(forced)
        assert "HTTP 5" in rec["outcome"]["error"] or "circuit open" in rec["outcome"]["error"]
    assert read_jsonl(out / "failed.jsonl") == [] and read_jsonl(out / "results.jsonl") == []
    status = json.loads(run_mics(["status", run, "--json"]).stdout)
    assert status["sessions"] == 1  # a session whose calls only failed is a session
