"""`mics bench overhead`: what the engine itself costs, with models that cost nothing.

Zero-latency in-process simulated models (no HTTP), full LMDB persistence (memo, call log,
nodes, questions), and a synthetic JSONL of text-only questions that the run reads lazily. The
search runs in a child process so its peak RSS is the bench's alone; RSS is sampled as
questions finish, to show that memory stays flat as the run grows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from bench.common import proc_status_mb, sim_models, write_questions

ROOT = Path(__file__).resolve().parents[1]
MARK = "MICS-BENCH-RESULT "


def sim_config(concurrency: int, seed: int = 0) -> dict[str, Any]:
    """The paper-shaped cast as in-process simulated models with no latency."""
    models = sim_models()

    def entry(name: str) -> dict[str, Any]:
        opts = {k: v for k, v in models[name].items() if k != "role"}
        return {"name": name, "backend": "simulated", "model": name, "options": opts}

    return {
        "search": {"seed": seed, "concurrency": concurrency},
        "mentors": [entry(n) for n, m in models.items() if m["role"] == "mentor"],
        "interns": [entry(n) for n, m in models.items() if m["role"] == "intern"],
        "judge": entry("judge"),
    }


def _cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _memory() -> dict[str, float | None]:
    return {"rss_mb": proc_status_mb("VmRSS"), "anon_mb": proc_status_mb("RssAnon"),
            "file_mb": proc_status_mb("RssFile")}


def worker(questions: int, work_dir: Path, concurrency: int, seed: int = 0) -> dict[str, Any]:
    """Write the dataset, search it, and return the figures (runs in the child process)."""
    from mics.config import parse_config
    from mics.run import search_run, start_run
    from store import RunStore
    from store.lmdb_store import commits_in_process

    data = write_questions(work_dir / "questions.jsonl", questions, seed)
    run_dir = work_dir / "run"
    start_run(run_dir, parse_config(sim_config(concurrency, seed)), data, None, None)
    start_mem = _memory()
    samples: list[dict[str, Any]] = []
    step = max(1, questions // 20)
    done = 0

    def on_done(_outcome: Any) -> None:
        nonlocal done
        done += 1
        if done % step == 0 or done == questions:
            samples.append({"questions": done, "s": round(time.perf_counter() - t0, 2),
                            "peak_mb": proc_status_mb("VmHWM"), **_memory()})

    commits0 = commits_in_process()
    cpu0 = _cpu()
    t0 = time.perf_counter()  # on_done reads it
    summary = anyio.run(partial(search_run, run_dir, on_done=on_done))
    seconds = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    commits = commits_in_process() - commits0
    peak = proc_status_mb("VmHWM")
    with RunStore.open(run_dir, write=False) as store:
        stats = store.stats()
    sent = summary.calls.get("sent", 0)
    anon = [s["anon_mb"] for s in samples if s["anon_mb"] is not None]
    return {
        "questions": questions,
        "succeeded": summary.succeeded,
        "failed": summary.failed,
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "model_calls": sent,
        "memo_hits": summary.calls.get("memo_hits", 0),
        "joined": summary.calls.get("joined", 0),
        "calls_per_s": round(sent / seconds, 1),
        "cpu_s": round(cpu, 2),
        "calls_per_cpu_s": round(sent / cpu, 1) if cpu else None,
        "commits": commits,
        "commits_per_s": round(commits / seconds, 1),
        "questions_per_s": round(questions / seconds, 2),
        "peak_rss_mb": round(peak, 1) if peak is not None else None,
        # the peak while searching, before search_run's closing summary
        "peak_rss_search_mb": samples[-1]["peak_mb"] if samples else None,
        "start_rss_mb": start_mem["rss_mb"],
        "peak_anon_mb_sampled": max(anon) if anon else None,
        "rss_samples": samples,
        "store_bytes": stats["used_bytes"],
        "store_entries": {k: v for k, v in stats.items() if k not in ("map_size", "used_bytes")},
    }


def run_overhead(questions: int = 10_000, concurrency: int = 8, seed: int = 0,
                 work_dir: Path | None = None, timeout_s: float = 3600) -> dict[str, Any]:
    """Run the worker in a child process; return its figures."""
    with tempfile.TemporaryDirectory(prefix="mics-bench-overhead-") as tmp:
        where = Path(work_dir) if work_dir is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.overhead", "--questions", str(questions),
               "--concurrency", str(concurrency), "--seed", str(seed), "--dir", str(where)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"overhead worker failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> None:
    """Child entry point: `python -m bench.overhead --questions N --dir D`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.overhead")
    ap.add_argument("--questions", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    result = worker(args.questions, args.dir, args.concurrency, args.seed)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
