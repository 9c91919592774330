"""`mics bench resume`: how long an interrupted run of ≥ N stored nodes takes to open and resume,
and (``--finished N``) how long a run with images and N finished records takes to its first new
call.

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

PROCESS_START = time.time()  # before the heavier imports: "from start" includes them

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402

from bench.common import write_questions  # noqa: E402
from bench.overhead import sim_config  # noqa: E402
from cli.signals import run_until_signalled  # noqa: E402

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


IMAGE_FILES = 64  # distinct images the records cycle through (decoding cost is per record)


def _write_images(folder: Path, side: int, seed: int) -> list[str]:
    import random

    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(IMAGE_FILES):
        img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        name = f"img{k:03d}.png"
        img.save(folder / name)
        names.append(name)
    return names


def build_finished(run_dir: Path, finished: int, fresh: int, seed: int = 0,
                   image_side: int = 384) -> dict[str, Any]:
    """A run over `finished + fresh` records with one image each, `finished` stored as done
    (written straight to the store: searching 100k questions first would take an hour)."""
    import random

    import orjson

    from bench.common import question_record
    from mics.config import parse_config
    from mics.run import describe_dataset, mark_resume_point, record_run
    from store import RunStore

    t0 = time.perf_counter()
    image_dir = run_dir.with_name(run_dir.name + "-images")
    images = _write_images(image_dir, image_side, seed)
    data = run_dir.with_name(run_dir.name + "-questions.jsonl")
    rng = random.Random(seed)
    rids = []
    with data.open("wb") as f:
        for i in range(finished + fresh):
            rec = question_record(i, rng)
            rec["images"] = [images[i % len(images)]]
            rids.append(rec["rid"])
            f.write(orjson.dumps(rec) + b"\n")
    dataset = describe_dataset(data, image_dir, None)
    with RunStore.open(run_dir, write=True, create=True, sync=False) as store:
        record_run(store, parse_config(sim_config(8, seed)), dataset)
        for start in range(0, finished, 5_000):
            with store.transaction():
                for i in range(start, min(finished, start + 5_000)):
                    store.put_question(rids[i], {  # about the size of a real record
                        "status": "succeeded", "index": i, "stop_reason": "full_score",
                        "retryable": False,
                        "question": {"qid": rids[i], "question": "q" * 400, "gt_answer": "a",
                                     "image_paths": [images[i % len(images)]]},
                        "outcome": {"qid": rids[i], "status": "succeeded",
                                    "stop_reason": "full_score", "reasoning": "r" * 3000}})
        mark_resume_point(store, dataset)  # as the session that finished them would have
    return {"finished": finished, "fresh": fresh, "image_side": image_side,
            "build_s": round(time.perf_counter() - t0, 3)}


def first_call(run_dir: Path, t_start: float) -> dict[str, Any]:
    """Resume the run; seconds from `t_start` (process start) and from the call of
    search_run to the first new model call (the call log's first entry)."""
    from mics.run import search_run
    from store import RunStore

    t_call = time.time()
    summary = anyio.run(search_run, run_dir)
    with RunStore.open(run_dir, write=False) as store:
        first = min(e["t"] for e in store.iter_calls())
    return {"first_call_s": round(first - t_start, 3),
            "first_call_after_search_run_s": round(first - t_call, 3),
            "questions": summary.questions, "sent": summary.calls.get("sent", 0)}


def run_first_call(finished: int = 100_000, fresh: int = 8, seed: int = 0,
                   work_dir: Path | None = None, timeout_s: float = 3600) -> dict[str, Any]:
    """Time to the first new call after starting `resume` on runs with images and
    finished/10 and `finished` finished records (flat: finished questions open no image)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mics-bench-first-call-") as tmp:
        where = Path(work_dir) if work_dir is not None else Path(tmp)
        for n in sorted({max(1, finished // 10), finished}):
            run_dir = where / f"finished{n}"
            built, _ = _child("--build-finished", "--finished", str(n), "--fresh", str(fresh),
                              "--seed", str(seed), "--dir", str(run_dir), timeout_s=timeout_s)
            resumed, wall = _child("--first-call", "--dir", str(run_dir), timeout_s=timeout_s)
            rows.append({**built, **resumed, "process_s": round(wall, 3)})
    return {"runs": rows, "fresh": fresh}


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
    mode.add_argument("--build-finished", action="store_true")
    mode.add_argument("--first-call", action="store_true")
    ap.add_argument("--finished", type=int, default=100_000)
    ap.add_argument("--fresh", type=int, default=8)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=1_500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.build_finished:
        args.dir.parent.mkdir(parents=True, exist_ok=True)
        result = build_finished(args.dir, args.finished, args.fresh, args.seed)
    elif args.first_call:
        result = first_call(args.dir, PROCESS_START)
    elif args.build:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = build(args.dir, args.questions, args.concurrency, args.seed)
    else:
        result = resume(args.dir)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
