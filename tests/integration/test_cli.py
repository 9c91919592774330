"""The `mics` command line as a user runs it: real subprocesses, real LMDB, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from helpers import ROOT

from bench.crash_store import KILL_AFTER_ENV, MODULE
from mics.demo_data import write_demo_dataset
from store import RunStore

EXAMPLE = ROOT / "examples" / "simulated.toml"


def mics(*args: str, env: dict[str, str] | None = None, check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    module = MODULE if env and KILL_AFTER_ENV in env else "cli.app"  # the kill hook is bench's
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"mics {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def test_chiron_demo_search_and_export(tmp_path, chiron):
    run, out = tmp_path / "R", tmp_path / "O"
    mics("search", chiron / "demo.jsonl", "--image-root", chiron / "images",
         "--config", EXAMPLE, "--run", run)
    mics("export", run, "--out", out)
    results, failed = read_jsonl(out / "results.jsonl"), read_jsonl(out / "failed.jsonl")
    assert len(results) + len(failed) == 10
    keys = {"rid", "images", "question", "gt_answer", "reasoning", "scores", "final_depth",
            "generated_by", "search_id", "leaks_answer"}
    for r in results:
        assert set(r) == keys
        assert isinstance(r["final_depth"], str) and isinstance(r["search_id"], str)
        assert r["search_id"] in ("0", "1")
        assert len(r["generated_by"]) == int(r["final_depth"])
        assert {len(v) for v in r["scores"].values()} == {int(r["final_depth"])}
        assert not r["question"].startswith("**Question:**")
    for f in failed:
        assert set(f) == {"rid", "stage", "error", "details"}
    rids = [line["rid"] for line in read_jsonl(chiron / "demo.jsonl")]
    assert sorted(r["rid"] for r in results + failed) == sorted(rids)


def test_demo_command_prints_summary(tmp_path):
    proc = mics("demo", "--run", tmp_path / "demo")
    for text in ("questions searched", "succeeded", "failed", str(tmp_path / "demo"),
                 "SIMULATED"):
        assert text in proc.stdout
    with RunStore.open(tmp_path / "demo", write=False) as store:
        assert store.question_count() >= 12


def test_kill_and_resume_equals_uninterrupted(tmp_path, demo_data):
    data, images = demo_data
    args = ["--image-root", images, "--config", EXAMPLE, "--seed", "7"]
    mics("search", data, "--run", tmp_path / "A", *args)
    mics("export", tmp_path / "A", "--out", tmp_path / "EA")
    with RunStore.open(tmp_path / "A", write=False) as store:
        full_calls = store.call_count()
    assert full_calls > 100

    killed = mics("search", data, "--run", tmp_path / "B", *args,
                  env={KILL_AFTER_ENV: str(full_calls // 3)}, check=False)
    assert killed.returncode == -signal.SIGKILL
    with RunStore.open(tmp_path / "B", write=False) as store:
        assert 0 < store.call_count() < full_calls
    mics("resume", tmp_path / "B")
    mics("export", tmp_path / "B", "--out", tmp_path / "EB")

    for name in ("results.jsonl", "failed.jsonl"):
        assert (tmp_path / "EA" / name).read_bytes() == (tmp_path / "EB" / name).read_bytes()
    with RunStore.open(tmp_path / "B", write=False) as store:
        log = store.iter_calls()
    keys = [entry["key"] for entry in log]
    assert len(keys) == len(set(keys)), "a completed call was sent twice"
    assert len(keys) == full_calls
    assert len({entry["session"] for entry in log}) == 2


def test_second_search_on_same_run_is_refused(tmp_path, demo_data):
    data, images = demo_data
    slow = tmp_path / "slow.toml"
    slow.write_text(EXAMPLE.read_text().replace(
        'model = "sim-judge"', 'model = "sim-judge"\noptions = { latency_s = 1.0 }'))
    args = ["search", data, "--image-root", images, "--config", slow, "--run", tmp_path / "R"]
    first = subprocess.Popen([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        lock = tmp_path / "R" / "lock"
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.05)
        second = mics(*args, check=False)
        assert second.returncode != 0
        assert "in use" in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        out, errs = first.communicate(timeout=120)
    assert first.returncode == 0, errs


def test_config_errors_before_any_call(tmp_path, demo_data):
    data, images = demo_data
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("max_depth = 3", "max_depht = 3"))
    proc = mics("search", data, "--config", bad, "--run", tmp_path / "R", check=False)
    assert proc.returncode == 2 and "max_depht" in proc.stderr
    assert not (tmp_path / "R").exists()


def test_status_reads_a_run(tmp_path, demo_data):
    data, images = demo_data
    mics("search", data, "--image-root", images, "--config", EXAMPLE, "--run", tmp_path / "R",
         "--limit", "3")
    proc = mics("status", tmp_path / "R")
    assert "questions searched" in proc.stdout and "stored calls" in proc.stdout
    assert "SIMULATED" in proc.stdout and "sim-judge" in proc.stdout


def test_first_sigint_stops_gracefully_and_resume_completes(tmp_path, demo_data):
    data, images = demo_data
    slow = tmp_path / "slow.toml"
    slow.write_text(EXAMPLE.read_text().replace(
        'model = "sim-judge"', 'model = "sim-judge"\noptions = { latency_s = 0.02 }'))
    common = ["--image-root", images, "--seed", "3"]
    mics("search", data, "--run", tmp_path / "A", "--config", EXAMPLE, *common)
    mics("export", tmp_path / "A", "--out", tmp_path / "EA")

    run = tmp_path / "B"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.app", "search", str(data), "--run", str(run), "--config",
         str(slow), *map(str, common)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + 60
    stored = 0
    while time.time() < deadline and stored < 40:
        time.sleep(0.05)
        if (run / "store").exists():
            with RunStore.open(run, write=False) as store:
                stored = store.call_count()
    proc.send_signal(signal.SIGINT)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 130, errs  # issue 10: a stopped run exits 128 + SIGINT
    assert "resume with" in out
    with RunStore.open(run, write=False) as store:
        statuses = [rec["status"] for _, rec in store.iter_questions()]
    assert "running" in statuses or len(statuses) < 12  # it really stopped early

    mics("resume", run)
    mics("export", run, "--out", tmp_path / "EB")
    for name in ("results.jsonl", "failed.jsonl"):
        assert (tmp_path / "EA" / name).read_bytes() == (tmp_path / "EB" / name).read_bytes()
    with RunStore.open(run, write=False) as store:
        keys = [entry["key"] for entry in store.iter_calls()]
    assert len(keys) == len(set(keys))
