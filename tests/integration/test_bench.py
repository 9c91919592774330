"""Smoke tests: every `mics bench` command at a tiny size, through the CLI, JSON checked for
shape and for correctness (identical exports, no missed latency), never for speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from helpers import ROOT

from bench.common import question_record, write_questions
from bench.loop import representative, served_key
from store import RunStore
from store.lmdb_store import commits_in_process

TINY_LATENCY = ["--mentor-latency", "0.01,0.02", "--intern-latency", "0.005,0.01",
                "--judge-latency", "0.002,0.004"]


def bench(*args: str, timeout: float = 300) -> dict:
    out = Path(args[args.index("--json") + 1])
    proc = subprocess.run([sys.executable, "-m", "cli.app", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = orjson.loads(out.read_bytes())
    assert report["command"].startswith("mics bench") or "cli.app bench" in report["command"]
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["python"] and machine["packages"]["lmdb"]
    assert 0 < machine["python_loop_s"] < 60  # the host-speed gauge the figures carry
    return report


def test_loop_smoke(tmp_path):
    r = bench("loop", "--questions", "6", "--reference-questions", "2", "--cap", "4",
              *TINY_LATENCY, "--json", str(tmp_path / "loop.json"))["loop"]
    assert r["exports_identical"] is True
    # the figures are what they say: rates from the counts and times, speedup their ratio,
    # efficiency the lower bound over the engine's time (it cannot beat its own bound)
    assert r["engine_qph"] == pytest.approx(r["questions"] / r["engine_s"] * 3600, rel=0.01)
    assert r["reference_qph"] == pytest.approx(
        r["reference_questions"] / r["reference_s"] * 3600, rel=0.01)
    assert r["speedup"] == pytest.approx(r["engine_qph"] / r["reference_qph"], abs=0.01)
    assert r["efficiency"] == pytest.approx(r["bound_s"] / r["engine_s"], abs=0.01)
    assert 0 < r["efficiency"] <= 1.0
    assert r["engine_succeeded"] + r["engine_failed"] == r["questions"] == 6
    assert r["bound_s"] == max(r["critical_path_max_s"], r["endpoint_load_max_s"])
    assert r["reference_questions"] == 2 and len(r["reference_rids"]) == 2
    assert r["critical_path_lookup_misses"] == 0  # every engine call's latency was found
    assert r["bound_s"] >= r["critical_path_max_s"] > 0
    assert set(r["endpoints"]) == {"m0", "m1", "m2", "i0", "i1", "i2", "judge"}


def test_loop_openai_interns_smoke(tmp_path):
    r = bench("loop", "--questions", "3", "--reference-questions", "1", "--interns", "openai",
              *TINY_LATENCY, "--json", str(tmp_path / "loop.json"))["loop"]
    assert r["exports_identical"] is True and r["critical_path_lookup_misses"] == 0
    assert r["endpoints"]["i0"]["calls"] == r["endpoints"]["i0"]["items"]  # one call per item


def test_overhead_smoke(tmp_path):
    r = bench("overhead", "--questions", "20", "--json", str(tmp_path / "o.json"))["overhead"]
    assert r["calls_per_s"] > 0 and r["commits_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["questions"] == 20 == r["succeeded"] + r["failed"]
    assert r["model_calls"] > 0 and r["rss_samples"]


def test_resume_smoke(tmp_path):
    r = bench("resume", "--nodes", "120", "--json", str(tmp_path / "r.json"))["resume"]
    assert r["open_resume_s"] > 0 and r["nodes"] >= 120
    assert r["pending_after_resume"] == 0
    assert r["memo_hits_on_resume"] > 0  # the interrupted questions were replayed from the memo


def test_resume_finished_smoke(tmp_path):
    r = bench("resume", "--finished", "200", "--fresh", "2", "--image-side", "16",
              "--json", str(tmp_path / "f.json"))["resume-finished"]
    runs = r["runs"]
    assert [(x["finished"], x["images"]) for x in runs] == [
        (20, False), (20, True), (200, False), (200, True)]
    for x in runs:
        assert x["questions"] == x["finished"] + 2 and x["pending"] == 0 and x["sent"] > 0
        assert x["succeeded"] + x["failed"] == x["questions"]
        assert x["calls_for_finished"] == 0  # no finished question was searched again
        assert x["fresh_exports_identical"] is True
        assert 0 < x["first_call_s"] <= x["done_s"] and x["first_call_s"] <= x["process_s"]
        assert 0 < x["first_call_after_search_run_s"] <= x["done_after_search_run_s"]
        assert x["image_side"] == (16 if x["images"] else None)


def test_prefix_smoke(tmp_path):
    pytest.importorskip("transformers")
    r = bench("prefix", "--models", "tiny", "--questions", "1", "--depths", "1", "--no-vlm",
              "--json", str(tmp_path / "p.json"))["prefix"]
    assert r["results"]
    for x in r["results"]:  # prefix reuse computes fewer tokens, and changes no greedy reply
        assert x["prefill_token_ratio"] == pytest.approx(
            x["prefill_tokens_reuse"] / x["prefill_tokens_naive"], abs=1e-4)
        assert 0 < x["prefill_tokens_reuse"] < x["prefill_tokens_naive"]
        assert x["greedy_equal"] is True and x["fallbacks"] == 0


def test_questions_are_unique_and_streamed(tmp_path):
    import random

    path = write_questions(tmp_path / "q.jsonl", 30)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 30
    texts = {orjson.loads(x)["messages"][0]["content"] for x in lines}
    assert len(texts) == 30  # no two questions share a prompt (the memo is content-keyed)
    assert question_record(0, random.Random(0))["images"] == []


def test_representative_picks_spread_quantiles():
    work = {f"q{i}": float(i) for i in range(100)}
    assert representative(work, 4) == ["q12", "q37", "q62", "q87"]
    assert representative(work, 1) == ["q50"]
    assert served_key("m", "t", 1, 0) == served_key("m", "t", 1.0, 0)


def test_grouped_sync_store_counts_commits_and_survives_reopen(tmp_path):
    before = commits_in_process()
    with RunStore.open(tmp_path / "run", create=True, sync_interval_s=0.0) as s:
        s.memo_put("k0", {"text": "a"}, {"role": "mentor"})
    with RunStore.open(tmp_path / "run", sync_interval_s=60.0) as s:  # grouped: fsync on close
        for i in range(1, 50):
            s.memo_put(f"k{i}", {"text": "b" * 500}, {"role": "intern"})
        assert s.commit_count() == 49
    assert commits_in_process() - before >= 50
    with RunStore.open(tmp_path / "run", write=False) as r:
        assert r.memo_count() == 50 and r.memo_get("k49") == {"text": "b" * 500}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux only")
def test_unmapping_store_pages_keeps_data_readable(tmp_path, monkeypatch):
    from store import lmdb_store

    monkeypatch.setattr(lmdb_store, "TRIM_INTERVAL_S", 0.0)  # every commit drops the pages
    with RunStore.open(tmp_path / "run", create=True) as s:
        for i in range(300):
            s.memo_put(f"k{i}", {"text": str(i) * 200}, {"role": "judge"})
            assert s.memo_get(f"k{i // 2}") == {"text": str(i // 2) * 200}
        assert s.memo_get("k123") == {"text": "123" * 200}
        assert s.memo_count() == 300


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux only")
def test_unmapping_follows_the_map_when_it_grows(tmp_path, monkeypatch):
    """The trimmed address range is looked up again after the map is resized (it moves)."""
    from store import lmdb_store

    monkeypatch.setattr(lmdb_store, "TRIM_INTERVAL_S", 0.0)
    with RunStore.open(tmp_path / "run", create=True, map_size=1 << 20) as s:
        sizes = set()
        for i in range(400):  # ~1.6 MB of replies: the 1 MB map doubles at least once
            s.memo_put(f"k{i}", {"text": str(i % 10) * 4000}, {"role": "judge"})
            sizes.add(s.stats()["map_size"])
            assert s.memo_get(f"k{i // 2}") == {"text": str((i // 2) % 10) * 4000}
        assert len(sizes) > 1  # the map really grew (and moved), trimmed after every commit
        assert all(s.memo_get(f"k{i}") == {"text": str(i % 10) * 4000} for i in range(400))


def test_parts_smoke(tmp_path):
    pytest.importorskip("transformers")
    r = bench("parts", "--replies", "150", "--calls", "20", "--tasks", "4,8", "--prompts", "20",
              "--repeats", "1", "--json", str(tmp_path / "parts.json"))["parts"]
    st = r["storing"]
    assert st["replies"] == 150 and st["stores_identical"] is True
    for pattern in ("measured", "one_per_turn"):
        row = st[pattern]
        assert row["old_commits"] == 150 and row["commits_match_turns"] is True
        assert row["old_ms"] >= 0 and row["new_ms"] >= 0
    assert st["one_per_turn"]["new_commits"] == 150  # nothing to group: a commit per reply
    assert st["measured"]["new_commits"] < 150 and st["puts_per_turn"] == 1.77
    assert set(r["gate"]) == {"4", "8"} and r["gate"]["8"]["calls"] == 160
    assert set(r["render"]) == {"text", "qwen2-vl", "internvl"}
    assert all(x["equal"] is True and x["prompts"] == 20 for x in r["render"].values())
    assert r["render"]["text"]["images"] == 0 < r["render"]["internvl"]["images"]
    assert r["render"]["text"]["transformers_ms"] > 0  # the pre-issue-15 renderer, equal too
    for n, tot in r["total"].items():  # the total is the sum of the three items
        parts = (st["measured"], r["gate"][n], r["render"]["text"])
        assert tot["old_ms"] == pytest.approx(sum(p["old_ms"] for p in parts))
        assert tot["new_ms"] == pytest.approx(sum(p["new_ms"] for p in parts))
        assert tot["old_transformers_ms"] == pytest.approx(
            tot["old_ms"] - r["render"]["text"]["old_ms"] + r["render"]["text"]["transformers_ms"])
    assert r["issue_ms"]["total"] == 0.242 and r["goal_ms"] == pytest.approx(0.121)
