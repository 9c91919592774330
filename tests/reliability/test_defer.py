"""Issue 10 items 3 and 5: a failed call is not a wrong answer, and partial runs never look like
success. Real HTTP against the loopback server's fault injection; `mics` as a subprocess where
the exit code is the point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from helpers import ROOT

from backends.limits import CircuitBreaker
from bench.chaos import MODELS, QuietLoopbackServer, config_text, run_mics
from bench.loopback import Faults
from bench.outage import run_outage
from mics.config import ModelConfig, load_config
from mics.demo_data import write_demo_dataset
from mics.export import FORMATS, export
from mics.run import infra_failed, search_run, start_run
from mics.types import Outcome
from store import RunStore

LINE = "{n} questions deferred: endpoint {name} unreachable; run `mics resume {run}` when it is " \
       "back"


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_outage_storm_then_resume_gives_identical_exports(tmp_path: Path) -> None:
    """Acceptance: m1 unreachable for the first third of the run plus 20 % mixed faults
    everywhere, then resume: every export byte-identical to the fault-free run's."""
    r = run_outage(questions=6, rate=0.2, seed=1, workdir=tmp_path)
    first = r["first_session"]
    assert r["reference_exit_code"] == 0
    assert first["exit_code"] == 3 and first["deferred"] >= 1
    assert first["breakers_opened"] == ["m1"]
    assert first["deferred_by_endpoint"] == {"m1": first["deferred"]}
    assert first["line"] == LINE.format(n=first["deferred"], name="m1", run=tmp_path / "storm")
    assert r["faults_injected"] > 20 and len(r["faults_by_kind"]) >= 5
    assert r["final_exit_code"] == 0 and r["final"]["deferred"] == 0
    assert r["exports_identical"], r["exports_differing"]


def _forced(tmp_path: Path, forced: dict[str, str], *, extra: str = "", n: int = 2
            ) -> tuple[QuietLoopbackServer, Path, list[str]]:
    data, images = write_demo_dataset(tmp_path / "data", n=n)
    srv = QuietLoopbackServer(MODELS, faults={"forced": forced}).start()
    cfg = tmp_path / "run.toml"
    cfg.write_text(config_text(srv.url, max_retries=1, max_depth=2).replace(
        "[search]\n", f"[search]\n{extra}\n"))
    run = tmp_path / "R"
    return srv, run, ["search", data, "--image-root", images, "--config", cfg, "--run", run]


def test_a_down_mentor_defers_then_resume_sends_only_the_missing_calls(tmp_path: Path) -> None:
    srv, run, args = _forced(tmp_path, {"m1": "500"})
    try:
        s = run_mics(args)
        assert s.rc == 3, s.stderr
        # 4 failures (2 questions x 2 attempts) stay under breaker_after = 10: no breaker, and
        # the line says the calls failed rather than that the endpoint is unreachable
        assert "CIRCUIT BREAKER" not in s.stderr
        assert (f"2 questions deferred: calls to m1 failed; run `mics resume {run}` when it is "
                "back") in " ".join(s.stderr.split())
        with RunStore.open(run, write=False) as store:
            recs = dict(store.iter_questions())
        assert {r["status"] for r in recs.values()} == {"deferred"}
        for r in recs.values():  # never scored: no 0.0 for the mentor that could not be asked
            assert r["outcome"]["stage"] == "mentor" and "m1" in r["outcome"]["error"]
            assert r["outcome"]["details"]["endpoints"] == ["m1"]
        exp = run_mics(["export", run, "--out", tmp_path / "partial"])
        assert exp.rc == 0 and _read(tmp_path / "partial" / "results.jsonl") == []
        delivered = {e.key for e in srv.log if e.ok}

        srv.set_faults(Faults())  # the endpoint is back
        srv.clear_log()
        s = run_mics(["resume", run])
        assert s.rc == 0, s.stderr
        resent = [e for e in srv.log if e.ok and e.key in delivered]
        assert resent == []  # only the missing calls were sent
        assert {e.model for e in srv.log} >= {"m1"}
        run_mics(["export", run, "--out", tmp_path / "done", "--format", "all"])
    finally:
        srv.stop()
    # the same data and config, never faulted
    with QuietLoopbackServer(MODELS) as clean:
        cfg = tmp_path / "clean.toml"
        cfg.write_text(config_text(clean.url, max_retries=1, max_depth=2))
        ok = run_mics([*args[:4], "--config", cfg, "--run", tmp_path / "C"])
        assert ok.rc == 0, ok.stderr
    run_mics(["export", tmp_path / "C", "--out", tmp_path / "ref", "--format", "all"])
    for name in ("results.jsonl", "failed.jsonl", "step_values.jsonl", "preferences.jsonl",
                 "sft.jsonl"):
        assert (tmp_path / "done" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_a_server_that_moved_is_given_by_re_running_search_with_its_new_url(
        tmp_path: Path) -> None:
    """m1 fails, its questions are deferred; the server comes back on another port. Re-running
    `search` with the new base_url (and another concurrency) continues the same run: only the
    missing calls are sent. A change to anything else is refused, naming the key."""
    srv, run, args = _forced(tmp_path, {"m1": "500"})
    try:
        assert run_mics(args).rc == 3
        delivered = {e.key for e in srv.log if e.ok}
    finally:
        srv.stop()
    with QuietLoopbackServer(MODELS) as moved:
        cfg = tmp_path / "moved.toml"
        cfg.write_text(config_text(moved.url, max_retries=1, max_depth=2, concurrency=4))
        changed = [*args[:5], cfg, *args[6:]]
        s = run_mics(changed)
        assert s.rc == 0, s.stderr
        said = " ".join(s.stderr.split())
        assert "endpoint settings changed since the last session" in said
        assert "[[mentors]] #2 (m1).base_url" in said and "[search].concurrency" in said
        assert [e for e in moved.log if e.ok and e.key in delivered] == []
        assert any(e.model == "m1" for e in moved.log)
        with RunStore.open(run, write=False) as store:
            assert {r["status"] for _q, r in store.iter_questions()} <= {"succeeded", "failed"}
            assert store.get_meta("config")["mentors"][0]["base_url"] == f"{moved.url}/v1"
        deeper = tmp_path / "deeper.toml"
        deeper.write_text(config_text(moved.url, max_retries=1, max_depth=3))
        refused = run_mics([*args[:5], deeper, *args[6:]])
    assert refused.rc == 2
    assert "different config ([search].max_depth)" in " ".join(refused.stderr.split())


@pytest.mark.parametrize(("forced", "role"), [({"i2": "503"}, "intern"),
                                              ({"judge": "500"}, "judge")])
def test_failed_samples_defer_by_default_and_count_wrong_on_request(
        tmp_path: Path, forced: dict[str, str], role: str) -> None:
    srv, run, args = _forced(tmp_path / "defer", forced, n=1)
    try:
        s = run_mics(args)
    finally:
        srv.stop()
    assert s.rc == 3, s.stderr
    with RunStore.open(run, write=False) as store:
        [(_, rec)] = store.iter_questions()
    assert rec["status"] == "deferred" and rec["outcome"]["stage"] == role

    srv, run, args = _forced(tmp_path / "wrong", forced, n=1,
                             extra='on_call_failure = "count_wrong"')
    try:
        s = run_mics(args)
    finally:
        srv.stop()
    with RunStore.open(run, write=False) as store:
        [(qid, rec)] = store.iter_questions()
        samples = [x for n in store.get_nodes(qid) for x in n["samples"]]
    assert rec["status"] in ("succeeded", "failed")  # decided, the reference way
    assert any(x["verdict"] in ("call-failed", "judge-failed") and not x["correct"]
               for x in samples)


def test_count_wrong_questions_without_a_working_intern_export_no_step_labels(
        tmp_path: Path) -> None:
    """count_wrong with every intern down: the question fails as no_intern. Its all-zero
    scores are an outage, not labels: no step-values, prm or preference rows; the failure is
    still listed in failed.jsonl."""
    srv, run, args = _forced(tmp_path, {"i0": "503", "i1": "503", "i2": "503"}, n=1,
                             extra='on_call_failure = "count_wrong"')
    try:
        run_mics(args)
    finally:
        srv.stop()
    with RunStore.open(run, write=False) as store:
        [(qid, rec)] = store.iter_questions()
        assert rec["stop_reason"] == "no_intern" and store.get_nodes(qid)
        counts = export(store, tmp_path / "O", ["reference", "step-values", "prm",
                                                 "preferences"])
    assert counts["step-values"] == counts["prm"] == counts["preferences"] == 0
    assert [r["rid"] for r in _read(tmp_path / "O" / "failed.jsonl")] == [qid]


def test_retry_failed_re_searches_an_old_run_s_infrastructure_failures(tmp_path: Path) -> None:
    """A run made before deferral: q0 failed "All mentor scores are zero." while its mentor
    calls were failing (the failure log says so); q1 failed the same way on its merits."""
    data, images = write_demo_dataset(tmp_path / "data", n=2)
    with QuietLoopbackServer(MODELS) as srv:
        cfg = tmp_path / "c.toml"
        cfg.write_text(config_text(srv.url, max_depth=2))
        run = tmp_path / "R"
        start_run(run, load_config(cfg), data, images, None)
        anyio.run(lambda: search_run(run))
        with RunStore.open(run, write=True) as store:
            for qid, rec in store.iter_questions():
                store.put_question(qid, {**rec, "status": "failed", "stop_reason": "all_zero",
                                         "outcome": {**rec["outcome"], "status": "failed",
                                                     "stop_reason": "all_zero",
                                                     "error": "All mentor scores are zero."}})
            store.add_failure({"kind": "call", "role": "mentor", "model": "m1",
                               "qid": "synthetic-001", "keys": [], "error": "HTTP 503",
                               "attempts": 5, "errors": []})
            assert infra_failed(store) == {"synthetic-001"}
        summary = anyio.run(lambda: search_run(run))  # a plain resume leaves them
        assert summary.failed == 2
        summary = anyio.run(lambda: search_run(run, retry_failed=True))
        assert summary.failed == 1 and summary.succeeded == 1
        with RunStore.open(run, write=False) as store:
            assert store.get_question("synthetic-001")["status"] == "succeeded"
            assert store.get_question("synthetic-002")["status"] == "failed"


def test_retry_failed_reads_again_a_record_whose_image_was_missing(tmp_path: Path) -> None:
    """A record whose image is missing is stored as failed (bad_record); a plain resume leaves
    it, `--retry-failed` stores it as failed again (once) while the image is still missing,
    and searches it once the image is back: no bad record is left over."""
    data, images = write_demo_dataset(tmp_path / "data", n=2)
    second = json.loads(data.read_text().splitlines()[1])
    image = images / second["images"][0]
    hidden = image.with_name(image.name + ".away")
    image.rename(hidden)
    with QuietLoopbackServer(MODELS) as srv:
        cfg = tmp_path / "c.toml"
        cfg.write_text(config_text(srv.url, max_depth=2))
        run = tmp_path / "R"
        start_run(run, load_config(cfg), data, images, None)
        first = anyio.run(lambda: search_run(run))
        assert (first.questions, first.failed, first.stop_reasons.get("bad_record")) == (2, 1, 1)
        again = anyio.run(lambda: search_run(run, retry_failed=True))  # still missing:
        assert (again.questions, again.failed, again.stop_reasons.get("bad_record")) == (2, 1, 1)
        hidden.rename(image)
        assert anyio.run(lambda: search_run(run)).failed == 1  # a plain resume leaves it
        summary = anyio.run(lambda: search_run(run, retry_failed=True))
        assert (summary.questions, summary.failed, summary.succeeded) == (2, 0, 2)
        assert summary.stop_reasons.get("bad_record") is None
        with RunStore.open(run, write=False) as store:
            keys = [qid for qid, _rec in store.iter_questions()]
            assert keys == ["synthetic-001", "synthetic-002"]
            assert store.question_counts() == {("succeeded", r): n for r, n in
                                               summary.stop_reasons.items()}


def test_cli_resume_has_retry_failed() -> None:
    out = subprocess.run([sys.executable, "-m", "cli.app", "resume", "--help"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "--retry-failed" in out.stdout


def test_sigterm_stores_in_flight_work_and_exits_143(tmp_path: Path) -> None:
    data, images = write_demo_dataset(tmp_path / "data", n=4)
    with QuietLoopbackServer(MODELS, latency={"mentor": (0.2, 0.6)}) as srv:
        cfg = tmp_path / "c.toml"
        cfg.write_text(config_text(srv.url, concurrency=2))
        run = tmp_path / "R"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.app", "search", str(data), "--image-root", str(images),
             "--config", str(cfg), "--run", str(run)], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
        deadline = time.time() + 60
        while time.time() < deadline and not [e for e in srv.log if e.ok]:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        completed = len({e.key for e in srv.log if e.ok})
    assert proc.returncode == 143, err
    assert "resume" in out
    with RunStore.open(run, write=False) as store:
        assert store.call_count() == completed  # every reply the server sent was stored
        assert store.question_count() < 4 or any(
            r["status"] == "running" for _, r in store.iter_questions())


def test_circuit_breaker_opens_probes_and_closes() -> None:
    brk = CircuitBreaker(ModelConfig(name="m", backend="openai", model="m", breaker_after=3,
                                     breaker_cooldown_s=0.0))
    assert [brk.failure("x") for _ in range(3)] == [False, False, True]
    assert brk.is_open
    assert brk.allow() and not brk.allow()  # one probe at a time
    assert not brk.failure("still down")  # the probe failed: open again, not re-announced
    assert brk.is_open and brk.allow()
    brk.success()
    assert not brk.is_open and brk.allow() and brk.allow()
    off = CircuitBreaker(ModelConfig(name="m", backend="openai", model="m", breaker_after=0))
    assert not any(off.failure("x") for _ in range(100)) and off.allow()


def test_export_writes_null_for_a_mentor_without_a_candidate(tmp_path: Path) -> None:
    """Also for runs stored before this change, whose outcome says 0.0 next to the error."""
    from mics.export import mentor_scores

    outcome = Outcome.from_dict({
        "qid": "q0", "status": "succeeded", "stop_reason": "max_depth",
        "scores": {"m0": [0.5, 1.0], "m1": [0.0, 0.0]},
        "details": {"mentor_errors_by_depth": {"2": {"m1": "call failed: HTTP 503"}}}})
    assert mentor_scores(outcome) == {"m0": [0.5, 1.0], "m1": [0.0, None]}
    with RunStore.open(tmp_path / "r", create=True) as store:
        assert export(store, tmp_path / "o", list(FORMATS))["results"] == 0



def test_an_opened_breaker_is_a_log_warning_not_a_print(tmp_path: Path, caplog, capsys) -> None:
    """The library announces an opened breaker on the "mics" logger (the CLI still shows it:
    with no logging set up, Python writes warnings to stderr); it prints nothing itself."""
    import logging
    import socket

    from backends.base import Call
    from backends.gate import CallGate
    from backends.registry import build_chat
    from mics.types import Prompt, Sampling, Text
    from store import RunStore

    with socket.socket() as s:  # a port nothing listens on: every call is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ModelConfig(name="down", backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                      max_retries=0, breaker_after=2, timeout_s=2.0)
    model = build_chat(cfg, "mentor")
    calls = [Call(Prompt("s", (Text(f"q{i}"),)), Sampling(temperature=0.0)) for i in range(3)]
    with RunStore.open(tmp_path / "r", create=True) as store:
        gate = CallGate(store)

        async def go() -> None:
            try:
                for c in calls:
                    await gate.chat(model, c, role="mentor", qid="q")
            finally:
                await model.aclose()

        with caplog.at_level(logging.WARNING, logger="mics"):
            anyio.run(go)
    assert gate.breakers_opened == ["down"]
    assert [r.name for r in caplog.records if "CIRCUIT BREAKER OPEN" in r.getMessage()] == [
        "mics"]
    assert "CIRCUIT BREAKER" not in capsys.readouterr().err
