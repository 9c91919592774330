"""Reliability: SIGKILL at random moments (bench/chaos.py at reduced size), SIGINT once and
twice over HTTP, and a kill between the run records (issue 7, see RELIABILITY.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import EXAMPLE, ROOT, ok

from bench.chaos import (
    MODELS,
    QuietLoopbackServer,
    Session,
    account,
    config_text,
    run_chaos,
    run_mics,
    same_exports,
    stored_calls,
)
from mics.config import load_config
from mics.demo_data import write_demo_dataset
from mics.run import search_run, start_run
from store import RunStore


def test_chaos_kills_resume_to_identical_exports(tmp_path: Path) -> None:
    """bench/chaos.py at reduced size: every kill lands and resumes; nothing paid twice."""
    report = run_chaos(questions=10, kills=5, seed=3, workdir=tmp_path)
    a = report.accounting
    assert report.kills_landed == 5, report.to_dict()["kill_points"]
    assert report.kills_resumed == 5
    assert {p.kind for p in report.kill_points} == {"time", "calls", "export"}
    assert report.exports_identical, report.export_diff
    assert report.trees_identical and report.same_calls_as_reference
    assert a["stored_twice"] == 0
    assert a["completed_calls_repeated"] == 0, a
    assert a["lost_in_unkilled_sessions"] == 0 and a["negative_lost_sessions"] == 0
    assert a["server_distinct_completed"] == report.reference["calls"] == a["stored_calls"]
    assert a["server_repeats"] == a["in_flight_lost"]  # every repeat re-buys a lost reply
    assert report.passed


@dataclass
class HttpRun:
    srv: QuietLoopbackServer
    work: Path
    search: list[str | Path]
    ref_out: Path


@pytest.fixture(scope="module")
def http_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRun]:
    """A loopback server (OpenAI endpoints for every model) and an uninterrupted export."""
    work = tmp_path_factory.mktemp("http")
    data, images = write_demo_dataset(work / "data", n=4)
    with QuietLoopbackServer(MODELS) as srv:
        cfg = work / "run.toml"
        cfg.write_text(config_text(srv.url))
        search: list[str | Path] = ["search", data, "--image-root", images, "--config", cfg]
        ok(run_mics([*search, "--run", work / "ref"]))
        ok(run_mics(["export", work / "ref", "--out", work / "ref-out", "--format", "all"]))
        yield HttpRun(srv, work, search, work / "ref-out")


def _start(args: list[str | Path]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _wait_for_calls(run: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    deadline = time.time() + timeout
    stored = 0
    while time.time() < deadline and stored < n and proc.poll() is None:
        time.sleep(0.05)
        stored = len(stored_calls(run))
    assert proc.poll() is None and stored >= n, f"stored {stored} calls, rc {proc.poll()}"
    return stored


def _resume_and_compare(h: HttpRun, run: Path, sessions: list[Session]) -> dict[str, Any]:
    h.srv.latency = {}
    sessions.append(ok(run_mics(["resume", run])))
    out = h.work / f"{run.name}-out"
    ok(run_mics(["export", run, "--out", out, "--format", "all"]))
    same, diff = same_exports(h.ref_out, out)
    assert same, diff
    acc = account(h.srv.log, sessions, stored_calls(run))
    assert acc["stored_twice"] == 0 and acc["completed_calls_repeated"] == 0, acc
    return acc


def test_first_sigint_stores_every_reply_in_flight(http_run: HttpRun) -> None:
    """One SIGINT: no call is started after it, every reply the server sent is stored, exit 130
    with a resume hint; resuming gives the uninterrupted exports."""
    h, run = http_run, http_run.work / "graceful"
    h.srv.clear_log()
    h.srv.latency = {"mentor": (0.3, 1.5)}
    start = time.time()
    proc = _start([*h.search, "--run", run])
    _wait_for_calls(run, 10, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # issue 10: stored what was in flight, then 128 + SIGINT
    assert f"resume with mics resume {run}" in " ".join(out.split())
    session = Session("graceful", ["search"], start, time.time(), 130)
    acc = account(h.srv.log, [session], stored_calls(run))
    assert acc["server_completions"] == acc["stored_calls"], acc  # nothing in flight was lost
    # it stopped: the search ended short of the uninterrupted run's calls
    assert acc["stored_calls"] < len(stored_calls(h.work / "ref")), acc
    with RunStore.open(run, write=False) as store:
        assert any(rec["status"] == "running" for _, rec in store.iter_questions()) or \
            store.question_count() < 4
    acc = _resume_and_compare(h, run, [session])
    assert acc["server_repeats"] == 0


def test_second_sigint_exits_at_once_and_loses_nothing_stored(http_run: HttpRun) -> None:
    """A second SIGINT exits 130 at once (slow replies still in flight); every stored call
    survives; resuming re-buys only the replies that were in flight."""
    h, run = http_run, http_run.work / "twice"
    h.srv.clear_log()
    h.srv.latency = {"mentor": (1.0, 3.0)}
    start = time.time()
    proc = _start([*h.search, "--run", run])
    _wait_for_calls(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # the first SIGINT waits for the slow mentor replies
    before = len(stored_calls(run))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    session = Session("twice", ["search"], start, time.time(), 130, killed=True)
    assert len(stored_calls(run)) >= before
    acc = _resume_and_compare(h, run, [session])
    assert acc["in_flight_lost"] >= 1  # at once: it left the slow replies in flight behind
    assert acc["server_repeats"] == acc["in_flight_lost"]


def test_kill_between_the_run_records_leaves_a_resumable_run(tmp_path: Path) -> None:
    data, images = write_demo_dataset(tmp_path / "data", n=1)
    cfg, run = load_config(EXAMPLE), tmp_path / "R"
    with RunStore.open(run, create=True) as store:  # what a kill after the first commit leaves
        store.put_meta("config", cfg.to_dict())
    start_run(run, cfg, data, images, None)
    assert anyio.run(lambda: search_run(run)).questions == 1
