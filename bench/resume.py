"""`mics bench resume`: how long an interrupted run of ≥ N stored nodes takes to open and resume.

A child process searches enough synthetic questions (zero-latency simulated models, full
persistence) to store at least `nodes` tree nodes, and is interrupted (SIGINT, as Ctrl-C) when
all but `concurrency` questions are finished, so the last ones are left mid-search. A fresh
child process then times `mics.run.search_run` on that run: open the store, check the dataset,
skip the finished questions, replay the interrupted ones from the call memo and finish them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.common import write_questions
from bench.overhead import sim_config
from cli.signals import run_until_signalled

ROOT = Path(__file__).resolve().parents[1]
MARK = "MICS-BENCH-RESULT "
NODES_PER_QUESTION = 7  # the simulated cast stores ~8.4 per question; aim a little low


def build(run_dir: Path, questions: int, concurrency: int, seed: int = 0) -> dict[str, Any]:
    """Search `questions` questions; interrupt with `concurrency` of them left in flight."""
    from mics.config import parse_config
    from mics.run import search_run, start_run
    from store import RunStore

    questions = max(concurrency + 1, questions)
    data = write_questions(run_dir.with_name(run_dir.name + "-questions.jsonl"), questions, seed)
    start_run(run_dir, parse_config(sim_config(concurrency, seed)), data, None, None)
    done = 0

    def on_done(_outcome: Any) -> None:
        nonlocal done
        done += 1
        if done == questions - concurrency:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: in-flight questions are left running

    t0 = time.perf_counter()
    summary = run_until_signalled(lambda stop: search_run(run_dir, on_done=on_done, stop=stop))
    seconds = time.perf_counter() - t0
    with RunStore.open(run_dir, write=False) as store:
        stats = store.stats()
    return {"questions": questions, "finished": summary.succeeded + summary.failed,
            "pending": summary.pending, "interrupted": summary.interrupted,
            "nodes": stats["nodes"], "memo": stats["memo"], "store_bytes": stats["used_bytes"],
            "build_s": round(seconds, 3)}


def resume(run_dir: Path) -> dict[str, Any]:
    """Time opening the run's store alone, then a whole resume (open, scan, replay, finish)."""
    from mics.run import load_run, search_run
    from store import RunStore

    t0 = time.perf_counter()
    with RunStore.open(run_dir, write=True) as store:
        load_run(store)
        nodes = store.node_count()
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = anyio.run(search_run, run_dir)
    open_resume_s = time.perf_counter() - t0
    return {"open_resume_s": round(open_resume_s, 3), "open_s": round(open_s, 4),
            "nodes": nodes, "questions": summary.questions, "pending_after": summary.pending,
            "calls_sent": summary.calls.get("sent", 0),
            "memo_hits": summary.calls.get("memo_hits", 0)}


def _child(*args: str, timeout_s: float) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.resume", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):]), wall
    raise RuntimeError(f"bench.resume {args[0]} failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def run_resume(nodes: int = 10_000, concurrency: int = 8, seed: int = 0,
               work_dir: Path | None = None, timeout_s: float = 3600) -> dict[str, Any]:
    """Build the interrupted run in one child process, time its resume in another."""
    with tempfile.TemporaryDirectory(prefix="mics-bench-resume-") as tmp:
        where = Path(work_dir) if work_dir is not None else Path(tmp)
        questions = math.ceil(nodes / NODES_PER_QUESTION)
        for attempt in range(4):  # small runs vary; grow the dataset until it holds enough
            run_dir = where / f"run{attempt}"
            built, _ = _child("--build", "--questions", str(questions), "--concurrency",
                              str(concurrency), "--seed", str(seed), "--dir", str(run_dir),
                              timeout_s=timeout_s)
            if built["nodes"] >= nodes:
                break
            questions = math.ceil(questions * 1.2 * nodes / max(1, built["nodes"]))
        resumed, wall = _child("--resume", "--dir", str(run_dir), timeout_s=timeout_s)
    return {
        "open_resume_s": resumed["open_resume_s"],
        "open_s": resumed["open_s"],
        "process_s": round(wall, 3),
        "nodes": resumed["nodes"],
        "questions": built["questions"],
        "interrupted_questions": built["questions"] - built["finished"],
        "calls_sent_on_resume": resumed["calls_sent"],
        "memo_hits_on_resume": resumed["memo_hits"],
        "pending_after_resume": resumed["pending_after"],
        "store_mb": round(built["store_bytes"] / 2**20, 1),
        "build_s": built["build_s"],
        "concurrency": concurrency,
    }


def main(argv: list[str] | None = None) -> None:
    """Child entry point: `python -m bench.resume --build|--resume --dir RUN`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.resume")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", action="store_true")
    mode.add_argument("--resume", action="store_true")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=1_500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.build:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = build(args.dir, args.questions, args.concurrency, args.seed)
    else:
        result = resume(args.dir)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
