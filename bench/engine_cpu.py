"""`python bench/engine_cpu.py [--cap N] [--runs K] [--preset fast|default] [--server-tree DIR]`:
engine CPU per HTTP request in the engine phase of `mics bench loop --preset fast` (or the
default latencies), alone (no reference runs), K times.

For same-sitting comparisons of two code trees on a host whose speed drifts: run this file with
the other tree as the working directory (`cd OTHER && python /path/to/bench/engine_cpu.py`);
it imports `bench.loop` and the engine from the working directory, so each tree is measured with
its own code, its own loopback server and the same workload. Trees from before the event-loop
loopback server spent engine CPU on its thread-per-request server's wake-ups; `--server-tree
THIS_TREE` measures such an old engine against today's server, so only the engine differs.
BENCHMARKS.md's same-sitting tables come from alternating runs of it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the tree under test: the working directory's
FAST = ((0.1, 0.2), (0.025, 0.05), (0.01, 0.02))  # the fast preset: mentor, intern, judge
DEFAULT = ((1.0, 2.0), (0.25, 0.5), (0.1, 0.2))  # `mics bench loop`'s default latencies


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/engine_cpu.py", description=__doc__)
    p.add_argument("--cap", type=int, default=16)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--preset", choices=("fast", "default"), default="fast")
    p.add_argument("--server-tree", type=Path, default=None,
                   help="run the loopback server from this tree instead (so an old engine "
                        "can be measured against today's server)")
    a = p.parse_args()
    import anyio

    loop = importlib.import_module("bench.loop")
    if a.server_tree is not None:
        loop.ROOT = a.server_tree.resolve()  # ServerProcess starts `bench.loop --serve` there
    presets = getattr(loop, "PRESETS", {"fast": FAST, "default": DEFAULT})  # older trees
    mentor, intern, judge = presets[a.preset]
    st = loop.LoopSettings(cap=a.cap, mentor_latency=mentor, intern_latency=intern,
                           judge_latency=judge)
    work = Path(tempfile.mkdtemp(prefix="mics-engine-cpu-"))
    data = loop.write_questions(work / "questions.jsonl", st.questions, st.seed)
    tok = loop.write_chat_tokenizer(work / "tokenizer")
    for module in ("backends.openai_chat", "backends.sglang", "jinja2.sandbox", "jinja2.ext"):
        importlib.import_module(module)  # one-time imports outside the timed phase, as the bench
    for r in range(a.runs):
        with loop.ServerProcess(loop.sim_models(), st.latency(), st.seed) as srv:
            config = loop.loop_config(srv.url, st.cap, st.questions, st.seed, tok)
            loop.start_run(work / f"engine{r}", config, data, None, None)
            cpu0, srv0, t0 = loop._cpu_self(), srv.cpu_s(), time.perf_counter()
            anyio.run(loop.search_run, work / f"engine{r}")
            wall = time.perf_counter() - t0
            engine, server = loop._cpu_self() - cpu0, srv.cpu_s() - srv0
            n = len(srv.served())
        print(f"{a.preset}, cap {a.cap}: engine {engine:.2f} s, server {server:.2f} s of CPU, wall "
              f"{wall:.2f} s, {n} requests, {engine / n * 1000:.3f} ms per request", flush=True)


if __name__ == "__main__":
    main()
