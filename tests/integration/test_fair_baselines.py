"""Fair baselines in the benches: the reference sharded CAP ways (loop), dedup-only and the
unique-token bound (prefix), and the loop's latency presets. Token counts are exact, so the
prefix goal (reuse within 1.1x of the bound) is checked here; speed never is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import orjson
import pytest
from helpers import ROOT

from bench.loop import PRESETS, chunked_time
from bench.prefix import dedup_only_tokens, unique_token_bound

TINY_LATENCY = ["--mentor-latency", "0.01,0.02", "--intern-latency", "0.005,0.01",
                "--judge-latency", "0.002,0.004"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.app", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})


def test_unique_token_bound_counts_each_distinct_prefix_once() -> None:
    keys = [(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 6), (1, 2, 3, 4), (7,)]
    # trie: 1-2-3-{4,5}, 1-2-6, 7  ->  1,2,3,4,5,6,7 = 7 tokens
    assert unique_token_bound(keys) == 7
    assert dedup_only_tokens(keys) == 4 + 4 + 3 + 1  # distinct prompts, whole
    assert unique_token_bound([]) == 0 == dedup_only_tokens([])


def test_chunked_time_is_the_slowest_contiguous_chunk() -> None:
    per_q = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert chunked_time(per_q, 2) == 4.0 + 5.0  # chunks of 3: [1,2,3] [4,5]
    assert chunked_time(per_q, 5) == 5.0
    assert chunked_time(per_q, 1) == 15.0
    assert chunked_time([], 4) == 0.0


def test_loop_reports_the_sharded_reference(tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    proc = bench("loop", "--questions", "6", "--reference-questions", "1", "--cap", "2",
                 *TINY_LATENCY, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = orjson.loads(out.read_bytes())["loop"]
    assert r["reference_sharded_questions"] == 4 and r["reference_sharded_shards"] == 2
    assert r["reference_sharded_exports_identical"] is True and r["exports_identical"] is True
    # the report divides the unrounded rates: the rounded ones give it within 0.01
    assert r["speedup_vs_sharded"] == pytest.approx(
        r["engine_qph"] / r["reference_sharded_qph"], abs=0.01)
    assert r["reference_sharded_qph_full_estimate"] > 0
    gate = r["reference_sharded_gate"]
    assert gate["sent"] > 0 and "speedup vs the reference sharded" in proc.stdout


def test_loop_preset_sets_the_latencies(tmp_path: Path) -> None:
    out = tmp_path / "loop.json"
    proc = bench("loop", "--preset", "fast", "--questions", "2", "--reference-questions", "1",
                 "--sharded-questions", "1", "--cap", "2", "--intern-latency", "0.001",
                 "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    settings = orjson.loads(out.read_bytes())["loop"]["settings"]
    assert tuple(settings["mentor_latency"]) == PRESETS["fast"][0]
    assert tuple(settings["judge_latency"]) == PRESETS["fast"][2]
    assert tuple(settings["intern_latency"]) == (0.001, 0.001)  # an explicit option wins
    bad = bench("loop", "--preset", "slow", "--json", str(tmp_path / "x.json"))
    assert bad.returncode != 0 and "preset" in (bad.stdout + bad.stderr)


@pytest.mark.parametrize("temperatures", [(1.2,), (1.2, 0.2)])
def test_local_reuse_prefills_within_1_1x_of_the_unique_token_bound(
        tiny_lm: Path, temperatures: tuple[float, ...]) -> None:
    from backends.local import LocalRollout
    from bench.prefix import build_workload, drive, prompt_keys
    from mics.config import ModelConfig

    work = build_workload(8, 3, 3, temperatures, 2, seed=0)
    model = LocalRollout(ModelConfig(name="tiny", backend="local", model=str(tiny_lm)))
    anyio.run(drive, model, work)
    keys = prompt_keys(model, work)
    bound, dedup = unique_token_bound(keys), dedup_only_tokens(keys)
    reuse = model.stats["prefill_tokens"]
    assert bound <= reuse <= 1.1 * bound
    assert reuse < 0.5 * dedup  # shared-prefix KV beats computing each prompt once, whole
