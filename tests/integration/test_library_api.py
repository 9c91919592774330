"""mics as a library: the public surface, searching from records, opening a run, stopping a
run from its owner (event or cancel scope, no signal handler), and the one error root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import ROOT

import mics
from bench.loopback import LoopbackServer
from mics.demo_data import write_demo_dataset
from mics.types import Node, Outcome, Question

N = 10


@pytest.fixture
def demo(tmp_path: Path) -> tuple[list[dict[str, Any]], Path, Path]:
    """N synthetic Chiron records (read back from disk), their JSONL file and image root."""
    data, images = write_demo_dataset(tmp_path / "data", n=N)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    return records, data, images


def results(run: Path, out: Path) -> bytes:
    with mics.open_run(run) as r:
        r.export(out, ["reference", "step-values"])
    return (out / "results.jsonl").read_bytes() + (out / "step_values.jsonl").read_bytes()


# ---------------------------------------------------------------- the surface


def test_help_shows_the_api() -> None:
    proc = subprocess.run([sys.executable, "-c", "import mics; help(mics)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PAGER": "cat", "TERM": "dumb"})
    assert proc.returncode == 0, proc.stderr
    for name in ("search(", "resume(", "open_run(", "search_sync(", "resume_sync(",
                 "load_config(", "class Run", "class MicsError", "class Outcome",
                 "await mics.search"):
        assert name in proc.stdout, name


def test_every_public_name_resolves_and_the_core_stays_light() -> None:
    assert all(getattr(mics, name) is not None for name in mics.__all__)
    with pytest.raises(AttributeError):
        mics.no_such_name  # noqa: B018
    code = ("import sys, mics.types, mics.config, mics.policy; "
            "print([m for m in sys.modules if m.split('.')[0] in "
            "('backends', 'store', 'anyio', 'lmdb', 'httpx') or m == 'mics.engine'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_old_error_classes_are_the_new_ones() -> None:
    from backends import base
    from backends.gate import RunAborted, StopRequested
    from mics import config, run
    from store import SchemaError, StoreError, StoreLocked

    assert config.ConfigError is mics.ConfigError and run.RunError is mics.RunError
    assert StoreError is mics.StoreError and issubclass(StoreLocked, mics.StoreError)
    assert issubclass(SchemaError, mics.MicsError)
    assert (base.BackendError, base.TransientError, base.PermanentError, base.FatalError) == (
        mics.BackendError, mics.TransientError, mics.PermanentError, mics.FatalError)
    assert issubclass(StopRequested, mics.Stopped) and issubclass(RunAborted, mics.RunError)
    assert issubclass(mics.RunError, RuntimeError)  # what `except RuntimeError` code caught
    assert issubclass(mics.ConfigError, ValueError) and issubclass(mics.DataError, ValueError)
    assert [c.kind for c in (mics.TransientError, mics.OutOfMemoryError, mics.PermanentError,
                             mics.FatalError)] == ["transient", "oom", "permanent", "fatal"]
    assert mics.OutOfMemoryError("x").retryable and not mics.FatalError("x").retryable


def test_the_lmdb_store_satisfies_the_run_store_protocol(tmp_path: Path) -> None:
    from store import RunStore

    with RunStore.open(tmp_path / "R", create=True) as store:
        assert isinstance(store, mics.RunStore)
    assert not isinstance(object(), mics.RunStore)


def test_re_raising_keeps_status_and_retry_after() -> None:
    e = mics.TransientError("m: HTTP 429", status=429, retry_after=2.5)
    again = e.again("mentor m0: HTTP 429")
    assert type(again) is mics.TransientError and str(again) == "mentor m0: HTTP 429"
    assert (again.status, again.retry_after) == (429, 2.5)
    from backends.gate import RunAborted

    aborted = RunAborted.from_error(mics.FatalError("bad key", status=401))
    assert isinstance(aborted, mics.RunError) and aborted.status == 401


# ---------------------------------------------------------------- searching from code


def test_records_search_like_their_file_and_open_typed(tmp_path, config, demo) -> None:
    records, data, images = demo
    summary = mics.search_sync(config, (r for r in records), tmp_path / "R", image_root=images)
    assert summary.questions == N and summary.succeeded + summary.failed == N
    assert not summary.interrupted and summary.calls["sent"] > 0
    from_file = mics.search_sync(config, data, tmp_path / "F", image_root=images)
    assert from_file.stop_reasons == summary.stop_reasons
    assert results(tmp_path / "R", tmp_path / "oR") == results(tmp_path / "F", tmp_path / "oF")

    with mics.open_run(tmp_path / "R") as run:
        assert run.config == config
        questions = list(run.questions())
        assert all(isinstance(q, Question) for q in questions)
        assert [q.qid for q in questions] == [r["rid"] for r in records]
        outcomes = list(run.outcomes())
        assert all(isinstance(o, Outcome) for o in outcomes) and len(outcomes) == N
        full = list(run.outcomes("full_score"))
        assert full and all(o.stop_reason == "full_score" for o in full)
        assert summary.stop_reasons.get("full_score") == len(full)
        qid = full[0].qid
        nodes = run.nodes(qid)
        assert all(isinstance(n, Node) for n in nodes)
        path = run.path(qid)
        assert path[0].depth == -1 and path[-1].score == 1.0
        assert [n.depth for n in path] == list(range(-1, full[0].final_depth))
        assert run.graph(qid).number_of_nodes() == len(nodes)
        assert run.summary().questions == N


def test_resume_of_a_finished_run_sends_nothing(tmp_path, config, demo) -> None:
    records, _, images = demo
    mics.search_sync(config, records, tmp_path / "R", image_root=images)
    again = mics.resume_sync(tmp_path / "R")
    assert again.calls.get("sent", 0) == 0 and again.questions == N
    rerun = mics.search_sync(config, records, tmp_path / "R", image_root=images)
    assert rerun.calls.get("sent", 0) == 0


def test_other_records_in_the_same_run_are_refused_and_nothing_is_lost(
        tmp_path, config, demo) -> None:
    records, _, images = demo
    mics.search_sync(config, records, tmp_path / "R", image_root=images)
    stored = (tmp_path / "R" / "questions.jsonl").read_bytes()
    with pytest.raises(mics.RunError, match="other questions"):
        mics.search_sync(config, records[:-1], tmp_path / "R", image_root=images)
    assert (tmp_path / "R" / "questions.jsonl").read_bytes() == stored
    assert mics.resume_sync(tmp_path / "R").questions == N


def test_a_record_that_cannot_be_stored_is_a_data_error(tmp_path, config, demo) -> None:
    records, _, images = demo
    bad = [*records[:2], {"rid": "odd", "messages": {1, 2}}]
    with pytest.raises(mics.DataError, match=r"record 2 \(rid 'odd'\)") as info:
        mics.search_sync(config, bad, tmp_path / "R", image_root=images)
    assert isinstance(info.value, mics.MicsError)


def test_a_bad_record_is_stored_as_failed_naming_its_field(tmp_path, config, demo) -> None:
    records, _, images = demo
    broken = {**records[1], "messages": []}
    summary = mics.search_sync(config, [records[0], broken], tmp_path / "R", image_root=images)
    assert summary.questions == 2 and summary.stop_reasons.get("bad_record") == 1
    with mics.open_run(tmp_path / "R") as run:
        [bad] = list(run.outcomes("bad_record"))
        assert bad.qid == broken["rid"] and "messages" in bad.details["field"]
        assert [q.qid for q in run.questions()] == [records[0]["rid"]]
        good, unread = list(run.stored())  # typed records, bad ones included
        assert isinstance(good, mics.StoredQuestion) and good.question is not None
        assert good.finished and good.outcome == run.outcome(good.qid)
        assert unread.qid.startswith(f"{broken['rid']}@line") and unread.question is None
        assert unread.stop_reason == "bad_record" and unread.outcome == bad


def test_a_config_mapping_or_path_is_accepted(tmp_path, demo) -> None:
    records, _, images = demo
    cfg = ROOT / "examples" / "simulated.toml"
    summary = mics.search_sync(str(cfg), records[:2], tmp_path / "R", image_root=images,
                               seed=3)
    with mics.open_run(tmp_path / "R") as run:
        assert run.config.search.seed == 3 and summary.questions == 2
    with pytest.raises(mics.ConfigError, match="unknown section"):
        mics.search_sync({"bogus": {}}, records, tmp_path / "X", image_root=images)


def test_the_sync_wrappers_refuse_a_running_loop(tmp_path, config, demo) -> None:
    records, _, images = demo

    async def inside() -> None:
        mics.search_sync(config, records, tmp_path / "R", image_root=images)

    with pytest.raises(mics.RunError, match=r"await mics\.search"):
        anyio.run(inside)


# ---------------------------------------------------------------- stopping is the owner's


def test_a_stop_event_stops_without_signal_handlers_and_resume_finishes(
        tmp_path, config, demo) -> None:
    records, _, images = demo
    mics.search_sync(config, records, tmp_path / "whole", image_root=images)
    handlers: list[tuple[Any, Any]] = []  # what the event loop itself installed
    seen: list[tuple[Any, Any]] = []  # what is installed while mics searches

    async def owner() -> mics.RunSummary:
        handlers.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        stop = anyio.Event()

        def on_done(_outcome: Outcome) -> None:
            seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
            stop.set()

        return await mics.search(config, records, tmp_path / "R", image_root=images,
                                 stop=stop, on_done=on_done)

    stopped = anyio.run(owner)
    assert seen and all(h == handlers[0] for h in seen)  # the library installed none
    assert stopped.interrupted and stopped.succeeded + stopped.failed < N
    finished = mics.resume_sync(tmp_path / "R")
    assert finished.succeeded + finished.failed == N and not finished.interrupted
    assert results(tmp_path / "R", tmp_path / "o1") == results(tmp_path / "whole",
                                                                 tmp_path / "o2")


def test_cancelling_the_owner_scope_leaves_a_resumable_run(tmp_path, config, demo) -> None:
    records, _, images = demo
    mics.search_sync(config, records, tmp_path / "whole", image_root=images)

    async def owner() -> bool:
        with anyio.CancelScope() as scope:
            await mics.search(config, records, tmp_path / "R", image_root=images,
                              on_done=lambda _o: scope.cancel())
        return scope.cancelled_caught

    assert anyio.run(owner)
    with mics.open_run(tmp_path / "R") as run:
        assert run.summary().pending > 0 or run.summary().questions < N
    finished = mics.resume_sync(tmp_path / "R")
    assert finished.succeeded + finished.failed == N
    assert results(tmp_path / "R", tmp_path / "o1") == results(tmp_path / "whole",
                                                                 tmp_path / "o2")


def test_a_bad_key_stops_the_run_with_its_http_status(tmp_path, monkeypatch, demo) -> None:
    records, _, images = demo
    monkeypatch.setenv("MICS_LIB_TEST_KEY", "sk-wrong")
    served = {"m0": {"role": "mentor", "quality": 0.6}, "judge": "judge"}
    with LoopbackServer(served, api_key="sk-right") as srv:
        cfg = {"mentors": [{"name": "m0", "backend": "openai", "model": "m0",
                            "base_url": f"{srv.url}/v1", "api_key_env": "MICS_LIB_TEST_KEY"}],
               "interns": [{"name": "i0", "backend": "simulated", "model": "i0"}],
               "judge": {"name": "judge", "backend": "simulated", "model": "judge"}}
        with pytest.raises(mics.RunError, match="401") as info:
            mics.search_sync(cfg, records[:2], tmp_path / "R", image_root=images)
    assert info.value.status == 401
    assert "sk-wrong" not in str(info.value)


def test_run_export_writes_what_mics_export_writes(tmp_path, config, demo) -> None:
    """`Run.export` has the CLI's defaults: sft holds only full-score chains unless
    include_partial; both routes write the same bytes."""
    records, data, images = demo
    summary = mics.search_sync(config, data, tmp_path / "R", image_root=images)
    partial = summary.stop_reasons.get("max_depth", 0)
    assert partial > 0  # the check below can tell the two defaults apart
    with mics.open_run(tmp_path / "R") as run:
        lib = run.export(tmp_path / "lib", ["sft", "step-values"])
        lib_all = run.export(tmp_path / "lib-all", ["sft"], include_partial=True)
    for out, extra in ((tmp_path / "cli", []), (tmp_path / "cli-all", ["--include-partial"])):
        proc = subprocess.run([sys.executable, "-m", "cli.app", "export", str(tmp_path / "R"),
                               "--out", str(out), "-f", "sft", "-f", "step-values", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert lib["partial"] == partial and lib_all["sft"] == lib["sft"] + partial
    for name in ("sft.jsonl", "step_values.jsonl"):
        assert (tmp_path / "lib" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    assert ((tmp_path / "lib-all" / "sft.jsonl").read_bytes()
            == (tmp_path / "cli-all" / "sft.jsonl").read_bytes())
