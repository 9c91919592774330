"""Whole searches over real HTTP: the paper-shaped config against the loopback server,
fault storms, a bad key, secrets hygiene, `mics doctor`, and the local backend on images."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from helpers import ROOT

from bench.loopback import Faults, LoopbackServer
from store import RunStore

SENTINEL = "sk-test-SENTINEL-8c1f4e2a9b"
KEY_ENV = "MICS_TEST_API_KEY"
MODELS = {**{f"m{i}": {"role": "mentor", "quality": q} for i, q in enumerate((0.6, 0.45, 0.35))},
          **{f"i{i}": {"role": "intern", "skill": s} for i, s in enumerate((0.95, 0.85, 0.75))},
          "judge": "judge"}



def paper_config(srv: LoopbackServer, tok: Path, intern_urls: dict[str, str] | None = None
                 ) -> str:
    """3 openai mentors, 3 sglang interns, an openai judge, all on the loopback server."""
    intern_urls = intern_urls or {}
    lines = ["[search]", "seed = 0", "concurrency = 4", ""]
    for i in range(3):
        lines += ["[[mentors]]", f'name = "m{i}"', 'backend = "openai"', f'model = "m{i}"',
                  f'base_url = "{srv.url}/v1"', f'api_key_env = "{KEY_ENV}"',
                  "max_retries = 6", "backoff_s = 0.01", "timeout_s = 2.0", ""]
    for i in range(3):
        url = intern_urls.get(f"i{i}", srv.url_for(f"i{i}"))
        lines += ["[[interns]]", f'name = "i{i}"', 'backend = "sglang"', f'model = "i{i}"',
                  f'base_url = "{url}"', f'api_key_env = "{KEY_ENV}"', "max_retries = 6",
                  "backoff_s = 0.01",
                  "timeout_s = 2.0", f'options = {{ tokenizer = "{tok}" }}', ""]
    lines += ["[judge]", 'name = "judge"', 'backend = "openai"', 'model = "judge"',
              f'base_url = "{srv.url}/v1"', f'api_key_env = "{KEY_ENV}"', "max_retries = 6",
              "backoff_s = 0.01", "timeout_s = 2.0"]
    return "\n".join(lines) + "\n"


def mics(*args, key: str = SENTINEL, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: key, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def search(chiron: Path, cfg: Path, run: Path, **kw) -> subprocess.CompletedProcess[str]:
    return mics("search", chiron / "demo.jsonl", "--image-root", chiron / "images",
                "--config", cfg, "--run", run, **kw)


def grep_tree(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def intern_usage(run: Path) -> list[dict]:
    with RunStore.open(run, write=False) as store:
        return [store.memo_get(e["key"])["usage"] for e in store.iter_calls()
                if e["role"] == "intern"]


def test_paper_config_over_http_completes_and_keeps_secrets(tmp_path, chiron, tokenizer_dir):
    with LoopbackServer(MODELS, api_key=SENTINEL) as srv:
        cfg = tmp_path / "paper.toml"
        cfg.write_text(paper_config(srv, tokenizer_dir))
        proc = search(chiron, cfg, tmp_path / "R")
        assert proc.returncode == 0, proc.stderr
        assert srv.counts()["ok"] > 100
        export = mics("export", tmp_path / "R", "--out", tmp_path / "O")
        assert export.returncode == 0, export.stderr
        status = mics("status", tmp_path / "R")
    with RunStore.open(tmp_path / "R", write=False) as store:
        recs = [rec for _, rec in store.iter_questions()]
        assert len(recs) == 10 and all(r["status"] in ("succeeded", "failed") for r in recs)
    usage = intern_usage(tmp_path / "R")
    assert usage and all(u["prompt_tokens"] > 0 for u in usage)
    assert sum(u["cached_tokens"] for u in usage) > 0.5 * sum(u["prompt_tokens"] for u in usage)
    results = (tmp_path / "O" / "results.jsonl").read_bytes().splitlines()
    failed = (tmp_path / "O" / "failed.jsonl").read_bytes().splitlines()
    assert len(results) + len(failed) == 10
    # the key value reaches no file of the run or export, and no output
    assert grep_tree(tmp_path, SENTINEL) == []
    for p in (proc, export, status):
        assert SENTINEL not in p.stdout + p.stderr


def test_http_run_equals_in_process_simulated_run(tmp_path, chiron, tokenizer_dir):
    with LoopbackServer(MODELS, api_key=SENTINEL) as srv:
        cfg = tmp_path / "paper.toml"
        cfg.write_text(paper_config(srv, tokenizer_dir))
        assert search(chiron, cfg, tmp_path / "H").returncode == 0
    sim = tmp_path / "sim.toml"
    sim.write_text((ROOT / "examples" / "simulated.toml").read_text()
                   .replace("sim-mentor-a", "m0").replace("sim-mentor-b", "m1")
                   .replace("sim-mentor-c", "m2").replace(", malformed_rate = 0.1", "")
                   .replace("sim-intern-1", "i0").replace("sim-intern-2", "i1")
                   .replace("sim-intern-3", "i2").replace("sim-judge", "judge")
                   .replace("skill = 0.95", "skill = 0.95").replace("concurrency = 8",
                                                                     "concurrency = 4"))
    assert search(chiron, sim, tmp_path / "S").returncode == 0
    for run, out in (("H", "OH"), ("S", "OS")):
        assert mics("export", tmp_path / run, "--out", tmp_path / out).returncode == 0
    assert (tmp_path / "OH" / "results.jsonl").read_bytes() == (
        tmp_path / "OS" / "results.jsonl").read_bytes()


def test_fault_storm_every_question_completes(tmp_path, chiron, tokenizer_dir):
    faults = Faults(rate=0.2, kinds=("429", "500", "503", "slow", "drop", "malformed"),
                    slow_s=3.0, retry_after_s=0.01)
    with LoopbackServer(MODELS, api_key=SENTINEL, faults=faults, seed=1) as srv:
        cfg = tmp_path / "paper.toml"
        cfg.write_text(paper_config(srv, tokenizer_dir))
        proc = search(chiron, cfg, tmp_path / "R")
        counts = srv.counts()
    assert proc.returncode == 0, proc.stderr
    assert sum(counts["by_fault"].values()) > 20  # the storm really happened
    with RunStore.open(tmp_path / "R", write=False) as store:
        recs = [rec for _, rec in store.iter_questions()]
        calls = store.iter_calls()
    assert len(recs) == 10
    assert all(r.get("stop_reason") != "no_mentor" for r in recs)
    retried = [c for c in calls if c["attempts"] > 1]
    assert retried and all(len(c["errors"]) == c["attempts"] - 1 for c in retried)
    assert max(c["attempts"] for c in calls) <= 7  # max_retries = 6


def test_bad_key_stops_with_the_endpoint_named(tmp_path, chiron, tokenizer_dir):
    with LoopbackServer(MODELS, api_key=SENTINEL) as srv:
        cfg = tmp_path / "paper.toml"
        cfg.write_text(paper_config(srv, tokenizer_dir))
        proc = search(chiron, cfg, tmp_path / "R", key="sk-wrong-key")
        url = srv.url
    assert proc.returncode != 0
    assert "401" in proc.stderr and url in proc.stderr and "resume" in proc.stderr
    assert "sk-wrong-key" not in proc.stdout + proc.stderr
    assert grep_tree(tmp_path / "R", "sk-wrong-key") == []


def test_doctor_reports_a_down_endpoint(tmp_path, tokenizer_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with LoopbackServer(MODELS, api_key=SENTINEL) as srv:
        cfg = tmp_path / "paper.toml"
        cfg.write_text(paper_config(srv, tokenizer_dir))
        ok = mics("doctor", cfg)
        cfg.write_text(paper_config(srv, tokenizer_dir, intern_urls={"i1": dead}))
        down = mics("doctor", cfg)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert down.returncode == 1
    assert dead in down.stdout and "unreachable" in down.stdout
    assert down.stdout.count("yes") == 6


def test_local_backend_search_on_image_questions(tmp_path, chiron, tiny_vl):
    model = tiny_vl
    cfg = (ROOT / "examples" / "simulated.toml").read_text()
    head, _, tail = cfg.partition("[[interns]]")
    interns = "".join(
        f'[[interns]]\nname = "tiny-vl-{i}"\nbackend = "local"\nmodel = "{model}"\n'
        f"options = {{ seed = {i}, min_pixels = 3136, max_pixels = 50176 }}\n\n"
        for i in range(2))
    judge = tail[tail.index("[judge]"):]
    (tmp_path / "local.toml").write_text(head + interns + judge)
    proc = mics("search", chiron / "demo.jsonl", "--image-root", chiron / "images", "--config",
                tmp_path / "local.toml", "--run", tmp_path / "R", "--limit", "3")
    assert proc.returncode == 0, proc.stderr
    with RunStore.open(tmp_path / "R", write=False) as store:
        recs = [rec for _, rec in store.iter_questions()]
        nodes = [n for qid, _ in store.iter_questions() for n in store.get_nodes(qid)]
    assert len(recs) == 3 and all(r["status"] in ("succeeded", "failed") for r in recs)
    samples = [s for n in nodes for s in n["samples"]]
    assert samples and all(s["raw"] is not None for s in samples)  # the tiny VLM answered
    assert all(s["usage"]["intern"]["prompt_tokens"] > 0 for s in samples)
    assert orjson.dumps(recs)


@pytest.mark.parametrize("warmup", [True, False])
def test_run_level_cache_hit_rate_with_and_without_warmup(tmp_path, chiron, tokenizer_dir,
                                                          warmup):
    from mics.run import cache_hit_rates

    with LoopbackServer(MODELS, api_key=SENTINEL) as srv:
        cfg = tmp_path / "paper.toml"
        text = paper_config(srv, tokenizer_dir)
        if not warmup:
            text = text.replace(f'tokenizer = "{tokenizer_dir}"',
                                f'tokenizer = "{tokenizer_dir}", warmup = false')
        cfg.write_text(text)
        proc = search(chiron, cfg, tmp_path / "R")
        assert proc.returncode == 0, proc.stderr
        served = sorted(e.cached_tokens for e in srv.log
                        if e.path == "/generate" and e.ok and e.completion_tokens > 0)
        status = mics("status", tmp_path / "R")
    with RunStore.open(tmp_path / "R", write=False) as store:
        rate, per_q = cache_hit_rates(store)
    # every stored intern call carries exactly the cached_tokens the server's matcher computed
    assert sorted(u["cached_tokens"] for u in intern_usage(tmp_path / "R")) == served
    assert len(per_q) == 10
    assert f"{rate:.1%}" in status.stdout
    if warmup:
        assert rate >= 0.85
    else:
        assert rate < 0.75  # visibly lower: nothing primes the root or the candidates
