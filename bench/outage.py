"""Outage storm: one mentor endpoint unreachable for the first third of a run, 20 % mixed
faults on every endpoint, then `mics resume`; the exports must equal a fault-free run's.

    python -m bench.outage --questions 30 --seed 0 --json outage.json

Mentor `m1` is served by its own loopback server on a reserved port; during the storm that
server is down (connection refused) until a third of the questions are done, then it starts.
Every other model is on a second server. Both inject `rate` faults (429 + Retry-After, 500,
503, dropped connections, truncated JSON, replies slower than the client timeout). With
`on_call_failure = "defer"` no question may be decided while a call is missing: the search ends
with the questions that met the outage deferred (exit code 3 and one line naming `m1`), the
circuit breaker having stopped calls to `m1` after `breaker_after` consecutive failures; each
`resume` sends only the missing calls, and the finished run's exports (every format) are
byte-identical to the fault-free run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from bench.chaos import MODELS, STORM_KINDS, QuietLoopbackServer, config_text, same_exports
from bench.loopback import Faults
from mics.config import load_config
from mics.demo_data import write_demo_dataset
from mics.export import FORMATS, export
from mics.run import RunSummary, search_run, start_run
from mics.types import Outcome
from store import RunStore

DOWN = "m1"


def free_port() -> int:
    """A port nothing listens on (yet): connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def outage_config(url: str, down_url: str, *, seed: int, concurrency: int,
                  timeout_s: float, cooldown_s: float) -> str:
    """The chaos config with mentor `m1` on its own endpoint and a short breaker cool-down."""
    text = config_text(url, seed=seed, concurrency=concurrency, timeout_s=timeout_s)
    block = f'name = "{DOWN}"\nbackend = "openai"\nmodel = "{DOWN}"\nbase_url = "{url}/v1"'
    if block not in text:
        raise RuntimeError("config_text changed shape; update bench.outage")
    text = text.replace(block, block.replace(f"{url}/v1", f"{down_url}/v1"))
    return text.replace("max_backoff_s = 0.5",
                        f"max_backoff_s = 0.5\nbreaker_cooldown_s = {cooldown_s}")


def _servers(seed: int, port: int, faults: Faults | None
             ) -> tuple[QuietLoopbackServer, QuietLoopbackServer]:
    rest = {k: v for k, v in MODELS.items() if k != DOWN}
    return (QuietLoopbackServer(rest, seed=seed, faults=faults),
            QuietLoopbackServer({DOWN: MODELS[DOWN]}, seed=seed, faults=faults, port=port))


def _search(run: Path, on_done: Callable[[Outcome], None] | None = None) -> RunSummary:
    return anyio.run(lambda: search_run(run, on_done=on_done))


def _export(run: Path, out: Path) -> None:
    with RunStore.open(run, write=False) as store:
        export(store, out, list(FORMATS))


def run_outage(questions: int = 30, rate: float = 0.2, seed: int = 0,
               workdir: Path | None = None, down_fraction: float = 1 / 3,
               timeout_s: float = 0.5, concurrency: int = 4, cooldown_s: float = 0.2,
               max_resumes: int = 3) -> dict[str, Any]:
    """Fault-free reference run, then the outage storm and resumes; what happened."""
    began = time.time()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mics-outage-"))
    data, images = write_demo_dataset(work / "data", n=questions, seed=seed)
    port = free_port()
    down_url = f"http://127.0.0.1:{port}"

    main, side = _servers(seed, port, None)
    with main, side:
        cfg = work / "reference.toml"
        cfg.write_text(outage_config(main.url, down_url, seed=seed, concurrency=concurrency,
                                     timeout_s=timeout_s, cooldown_s=cooldown_s))
        start_run(work / "reference", load_config(cfg), data, images, None)
        ref = _search(work / "reference")
    _export(work / "reference", work / "reference-out")

    faults = Faults(rate=rate, kinds=STORM_KINDS, slow_s=1.0, retry_after_s=0.05)
    main, side = _servers(seed, port, faults)
    done = {"n": 0, "up_at": None}

    def on_done(_outcome: Outcome) -> None:
        done["n"] += 1
        if done["up_at"] is None and done["n"] >= questions * down_fraction:
            side.start()  # the endpoint comes back
            done["up_at"] = done["n"]

    sessions: list[RunSummary] = []
    with main:
        try:
            cfg = work / "storm.toml"
            cfg.write_text(outage_config(main.url, down_url, seed=seed, concurrency=concurrency,
                                         timeout_s=timeout_s, cooldown_s=cooldown_s))
            start_run(work / "storm", load_config(cfg), data, images, None)
            sessions.append(_search(work / "storm", on_done))
            if done["up_at"] is None:
                side.start()
            while sessions[-1].exit_code and len(sessions) <= max_resumes:
                sessions.append(_search(work / "storm"))
        finally:
            side.stop()
        log = [*main.log, *side.log]
    _export(work / "storm", work / "storm-out")
    identical, differing = same_exports(work / "reference-out", work / "storm-out")
    first = sessions[0]
    by_fault = Counter(e.fault for e in log if e.fault)
    report = {
        "questions": questions, "rate": rate, "seed": seed,
        "reference_exit_code": ref.exit_code,
        "endpoint_down_until_question": done["up_at"],
        "first_session": {
            "exit_code": first.exit_code, "deferred": first.deferred,
            "deferred_by_endpoint": first.deferred_by_endpoint,
            "breakers_opened": first.breakers_opened, "line": first.deferred_line(),
            "succeeded": first.succeeded, "failed": first.failed,
        },
        "resumes": len(sessions) - 1,
        "final_exit_code": sessions[-1].exit_code,
        "final": {"succeeded": sessions[-1].succeeded, "failed": sessions[-1].failed,
                  "deferred": sessions[-1].deferred, "pending": sessions[-1].pending},
        "requests": len(log), "faults_injected": sum(by_fault.values()),
        "faults_by_kind": dict(sorted(by_fault.items())),
        "calls_sent_by_session": [s.calls.get("sent", 0) for s in sessions],
        "exports_identical": identical, "exports_differing": differing,
        "seconds": round(time.time() - began, 2),
    }
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.outage",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--questions", type=int, default=30)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    report = run_outage(args.questions, args.rate, args.seed, args.workdir)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = (report["exports_identical"] and report["final_exit_code"] == 0
          and report["first_session"]["deferred"] > 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
