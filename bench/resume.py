"""`mics bench resume`: how long a fresh process takes to resume a run.

``--nodes N`` (`run_resume`): a child process searches enough synthetic questions (zero-latency
simulated models, full persistence) to store at least N tree nodes, and is interrupted (SIGINT,
as Ctrl-C) when all but `concurrency` questions are finished, so the last ones are left
mid-search. A fresh child process then times `mics.run.search_run` on that run: open the store,
check the dataset, skip the finished questions, replay the interrupted ones from the call memo
and finish them. Only those few questions are replayed, so this hardly grows with N; the
finished records are what `--finished` grows.

``--finished N`` (`run_finished`): whether resuming grows with the finished records. Four runs,
N/10 and N records finished (stored as the session that finished them leaves them: records,
resume point, dataset stat and record count, synced), each with no image and with one 384x384
PNG per record (64 distinct files), and `fresh` (8) records still to search. A fresh child
process (`python -m bench.resume --timed-resume`) resumes each as `mics resume` does; the
figures are seconds from the moment that process is started (interpreter start-up and imports
included), and from the call of search_run, to the first new model call and to done (every
question searched, resume point marked, closing summary counted), plus the last new call to
done. Each run is then checked: no finished question was called again, and the fresh questions'
trees and export rows equal those of a run that searched only them from scratch.
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


def _finished_record(rid: str, i: int, image: str | None) -> dict[str, Any]:
    """A finished question's stored record, about the size of a real one (~3.5 KB)."""
    return {"status": "succeeded", "index": i, "stop_reason": "full_score", "retryable": False,
            "question": {"qid": rid, "question": "q" * 400, "gt_answer": "a",
                         "image_paths": [image] if image else []},
            "outcome": {"qid": rid, "status": "succeeded", "stop_reason": "full_score",
                        "reasoning": "r" * 3000}}


def build_finished(run_dir: Path, finished: int, fresh: int, seed: int = 0,
                   image_side: int = 384, images: bool = True) -> dict[str, Any]:
    """A run over `finished + fresh` records (with one image each, or none), the first
    `finished` stored as done, as the session that finished them would have left the run
    (records, resume point, dataset stat, synced to disk). The records are written straight
    to the store: searching 100k questions first would take an hour."""
    import random

    import orjson

    from bench.common import question_record
    from mics.config import parse_config
    from mics.run import dataset_items, dataset_total, describe_dataset, record_run
    from store import RunStore

    t0 = time.perf_counter()
    image_dir = run_dir.with_name(run_dir.name + "-images") if images else None
    names = _write_images(image_dir, image_side, seed) if image_dir else []
    data = run_dir.with_name(run_dir.name + "-questions.jsonl")
    rng = random.Random(seed)
    rids = []
    with data.open("wb") as f:
        for i in range(finished + fresh):
            rec = question_record(i, rng)
            rec["images"] = [names[i % len(names)]] if names else []
            rids.append(rec["rid"])
            f.write(orjson.dumps(rec) + b"\n")
    dataset = describe_dataset(data, image_dir, None)
    with RunStore.open(run_dir, write=True, create=True, sync=False) as store:
        record_run(store, parse_config(sim_config(8, seed)), dataset)
        for start in range(0, finished, 5_000):
            with store.transaction():
                for i in range(start, min(finished, start + 5_000)):
                    store.put_question(rids[i], _finished_record(
                        rids[i], i, names[i % len(names)] if names else None))
        # as the finishing session: dataset checked (stat stored), resume point marked,
        # records counted once
        dataset_items(dataset, store)
        dataset_total(dataset, store)
    _fsync(run_dir / "store" / "data.mdb")  # that session's close fsynced; sync=False did not
    return {"finished": finished, "fresh": fresh, "images": images,
            "image_side": image_side if images else None,
            "store_mb": round(_size(run_dir / "store") / 2**20, 1),
            "dataset_mb": round(data.stat().st_size / 2**20, 1),
            "fresh_rids": rids[finished:], "build_s": round(time.perf_counter() - t0, 3)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def timed_resume(run_dir: Path, t_start: float) -> dict[str, Any]:
    """Resume the run as `mics resume` does (search_run); seconds from `t_start` (process
    start) and from the call of search_run to its first new model call (the call log's first
    entry) and to done (search_run returned: every question searched, resume point marked,
    closing summary counted from the store)."""
    from mics.run import search_run
    from store import RunStore

    t_call = time.time()
    summary = anyio.run(search_run, run_dir)
    t_done = time.time()
    with RunStore.open(run_dir, write=False) as store:
        calls = store.iter_calls()
    first = min(e["t"] for e in calls) if calls else math.nan
    last = max(e["t"] for e in calls) if calls else math.nan
    return {"first_call_s": round(first - t_start, 3), "done_s": round(t_done - t_start, 3),
            "first_call_after_search_run_s": round(first - t_call, 3),
            "done_after_search_run_s": round(t_done - t_call, 3),
            "last_call_to_done_s": round(t_done - last, 3),
            "questions": summary.questions, "succeeded": summary.succeeded,
            "failed": summary.failed, "pending": summary.pending,
            "sent": summary.calls.get("sent", 0),
            "called_qids": sorted({e.get("qid", "") for e in calls})}


def fresh_exports_identical(run_dir: Path, fresh_rids: list[str]) -> bool:
    """The resumed run's exports of its fresh questions equal those of a run that searched
    only those records from scratch (same config, same images), never resumed."""
    from mics.run import load_run, search_run, start_run
    from store import RunStore

    data = run_dir.with_name(run_dir.name + "-questions.jsonl")
    ref_data = run_dir.with_name(run_dir.name + "-fresh.jsonl")
    with RunStore.open(run_dir, write=False) as store:
        config, dataset = load_run(store)
        resumed = _export_rows(store, fresh_rids)
    wanted = set(fresh_rids)
    with data.open("rb") as src, ref_data.open("wb") as out:
        for line in src:
            if json.loads(line)["rid"] in wanted:
                out.write(line)
    ref = run_dir.with_name(run_dir.name + "-fresh-run")
    root = dataset["image_root"]
    start_run(ref, config, ref_data, Path(root) if root else None, None)
    anyio.run(search_run, ref)
    with RunStore.open(ref, write=False) as store:
        return resumed == _export_rows(store, fresh_rids) and len(resumed) == len(fresh_rids)


def _export_rows(store: Any, qids: list[str]) -> dict[str, Any]:
    """Every export format's rows of `qids`, with the stored trees (finished questions only)."""
    from mics.export import FORMATS, export_rows, run_image_root
    from mics.records import read_nodes, read_question

    root = run_image_root(store)
    rows: dict[str, Any] = {}
    for qid in qids:
        sq = read_question(store, qid)
        if sq is None or sq.status not in ("succeeded", "failed"):
            continue
        nodes = read_nodes(store, qid)
        rows[qid] = {"outcome": store.get_question(qid).get("outcome"),
                     "nodes": store.get_nodes(qid), **{
            f: export_rows(f, sq, nodes, False, root) for f in FORMATS if f != "reference"}}
    return rows


def run_finished(finished: int = 100_000, fresh: int = 8, seed: int = 0,
                 work_dir: Path | None = None, timeout_s: float = 3600,
                 image_side: int = 384) -> dict[str, Any]:
    """Time a fresh `resume` process, from its start to the first new call and to done, on
    runs with finished/10 and `finished` finished records, each with and without images.

    Each run is built in one child process and resumed in another; the fresh questions'
    exports are then checked against a run that searched only them."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mics-bench-resume-finished-") as tmp:
        where = Path(work_dir) if work_dir is not None else Path(tmp)
        for n in sorted({max(1, finished // 10), finished}):
            for images in (False, True):
                run_dir = where / f"finished{n}-{'images' if images else 'text'}"
                built, _ = _child("--build-finished", "--finished", str(n), "--fresh",
                                  str(fresh), "--seed", str(seed), "--image-side",
                                  str(image_side), "--images" if images else "--no-images",
                                  "--dir", str(run_dir), timeout_s=timeout_s)
                spawned = time.time()  # "process start": the moment the child is started
                resumed, wall = _child("--timed-resume", "--dir", str(run_dir), "--t-start",
                                       repr(spawned), timeout_s=timeout_s)
                fresh_rids = built.pop("fresh_rids")
                called = resumed.pop("called_qids")
                rows.append({**built, **resumed, "process_s": round(wall, 3),
                             "calls_for_finished": len(set(called) - set(fresh_rids)),
                             "fresh_exports_identical": fresh_exports_identical(
                                 run_dir, fresh_rids)})
    return {"runs": rows, "fresh": fresh, "seed": seed}


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
    """Child entry point: `python -m bench.resume --build|--resume|--build-finished|
    --timed-resume --dir RUN`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.resume")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", action="store_true")
    mode.add_argument("--resume", action="store_true")
    mode.add_argument("--build-finished", action="store_true")
    mode.add_argument("--timed-resume", action="store_true")
    ap.add_argument("--finished", type=int, default=100_000)
    ap.add_argument("--fresh", type=int, default=8)
    ap.add_argument("--images", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--image-side", type=int, default=384)
    ap.add_argument("--t-start", type=float, default=None)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=1_500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.build_finished:
        args.dir.parent.mkdir(parents=True, exist_ok=True)
        result = build_finished(args.dir, args.finished, args.fresh, args.seed,
                                args.image_side, args.images)
    elif args.timed_resume:
        result = timed_resume(args.dir, PROCESS_START if args.t_start is None else args.t_start)
    elif args.build:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = build(args.dir, args.questions, args.concurrency, args.seed)
    else:
        result = resume(args.dir)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
