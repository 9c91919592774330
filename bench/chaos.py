"""Chaos run: SIGKILL a real `mics` search at seeded random moments, resume, compare with an
uninterrupted run, and prove from the server's own request log that no stored call was re-sent.

    python -m bench.chaos --questions 50 --kills 20 --seed 0 --json chaos.json
    python -m bench.chaos --storm 0.2 --questions 50 --seed 0 --json storm.json

Every model (3 mentors, 3 interns, judge) is an OpenAI-compatible endpoint of an in-process
`bench.loopback.LoopbackServer` with per-role latency, so a run takes a few seconds and every
request is logged by the server. `mics` itself always runs as a subprocess.

Kill points (mixed, seeded): `time` (SIGKILL after a random delay: lands in start-up, replay,
model calls or store commits), `calls` (`bench.crash_store`, MICS_KILL_AFTER_CALLS: SIGKILL right
after the commit of the Nth stored call of the session), `export` (SIGKILL a `mics export
--format all`; the files left must be whole, and a re-run of the export must succeed). Each
search kill is followed by `mics resume`.

"No completed call sent twice" is checked twice:
(a) the store: no call key is in the call log twice (sending needs a memo miss);
(b) the server: a request it completed more than once must be one whose reply was lost in flight
at a kill. Per session, `lost = completed by the server - stored by that session`; each repeat
is charged to the session of its earlier completion and must fit in that session's `lost`.
`completed_calls_repeated` counts repeats that do not fit (stored, then re-sent): must be 0.
`in_flight_lost` counts replies the server completed while the client was being killed: allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.crash_store import KILL_AFTER_ENV, MODULE
from bench.loopback import Faults, LogEntry, LoopbackServer
from mics.demo_data import write_demo_dataset
from store import RunStore

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, dict[str, Any]] = {
    **{f"m{i}": {"role": "mentor", "quality": q} for i, q in enumerate((0.6, 0.45, 0.35))},
    **{f"i{i}": {"role": "intern", "skill": s} for i, s in enumerate((0.95, 0.85, 0.75))},
    "judge": {"role": "judge"},
}
ROLES = {"mentors": ("m0", "m1", "m2"), "interns": ("i0", "i1", "i2"), "judge": ("judge",)}
LATENCY: dict[str, tuple[float, float]] = {
    "mentor": (0.02, 0.08), "intern": (0.01, 0.05), "judge": (0.005, 0.02)}
STORM_KINDS = ("429", "500", "503", "slow", "drop", "malformed")
DRAIN_S = 0.3  # after a kill: let the server finish requests the dead client had sent
# every file `mics export --format all` writes, but internvl_meta.json (it holds its own folder)
EXPORT_FILES = ("results.jsonl", "failed.jsonl", "sft.jsonl", "sharegpt.jsonl",
                "step_values.jsonl", "preferences.jsonl", "preferences_sharegpt.jsonl",
                "prm.jsonl", "dataset_info.json")


def config_text(url: str, *, seed: int = 0, concurrency: int = 8, max_retries: int = 6,
                backoff_s: float = 0.01, timeout_s: float = 10.0, key_env: str = "",
                max_depth: int = 3) -> str:
    """A run config with every model on the OpenAI-compatible endpoint at `url`/v1."""
    common = [f'base_url = "{url}/v1"', f"max_retries = {max_retries}",
              f"backoff_s = {backoff_s}", "max_backoff_s = 0.5", f"timeout_s = {timeout_s}"]
    if key_env:
        common.append(f'api_key_env = "{key_env}"')
    lines = ["[search]", f"seed = {seed}", f"concurrency = {concurrency}",
             f"max_depth = {max_depth}", ""]
    for table, names in ROLES.items():
        for name in names:
            header = "[judge]" if table == "judge" else f"[[{table}]]"
            lines += [header, f'name = "{name}"', 'backend = "openai"', f'model = "{name}"',
                      *common, ""]
    return "\n".join(lines)


class QuietLoopbackServer(LoopbackServer):
    """A LoopbackServer that prints nothing for clients killed mid-request. The asyncio
    transport never does; the name stays for the scripts and tests that import it."""


# ---------------------------------------------------------------- running mics


@dataclass
class Session:
    """One `mics` subprocess: what ran, when, and how it ended."""

    label: str
    args: list[str]
    start: float
    end: float = 0.0
    rc: int | None = None
    killed: bool = False
    stdout: str = ""
    stderr: str = ""

    @property
    def searching(self) -> bool:
        return self.args[0] in ("search", "resume")


def run_mics(args: Sequence[str | Path], *, label: str = "", env: dict[str, str] | None = None,
             kill_after_s: float | None = None, timeout_s: float = 600.0) -> Session:
    """Run `mics ARGS` as a subprocess; SIGKILL it after `kill_after_s` if still running."""
    argv = [str(a) for a in args]
    full_env = {k: v for k, v in os.environ.items() if k != KILL_AFTER_ENV}
    full_env.update({"COLUMNS": "200", **(env or {})})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        session = Session(label or argv[0], argv, time.time())
        proc = subprocess.Popen([sys.executable, "-m", MODULE, *argv], cwd=ROOT, env=full_env,
                                stdout=out, stderr=err)
        try:
            proc.wait(timeout=kill_after_s if kill_after_s is not None else timeout_s)
        except subprocess.TimeoutExpired:
            if kill_after_s is None:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"mics {' '.join(argv)} ran past {timeout_s}s") from None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        session.end = time.time()
        session.rc = proc.returncode
        session.killed = proc.returncode == -signal.SIGKILL
        out.seek(0)
        err.seek(0)
        session.stdout = out.read().decode(errors="replace")
        session.stderr = err.read().decode(errors="replace")
    return session


def check_ok(session: Session) -> Session:
    if session.rc != 0:
        raise RuntimeError(f"mics {' '.join(session.args)} exited {session.rc}:\n"
                           f"{session.stdout[-2000:]}\n{session.stderr[-4000:]}")
    return session


def stored_calls(run: Path) -> list[dict[str, Any]]:
    if not (run / "store" / "data.mdb").exists():
        return []
    with RunStore.open(run, write=False) as store:
        return store.iter_calls()


def recorded(run: Path) -> bool:
    """The run's config and dataset are stored, so `mics resume` can carry on (a kill during
    start-up may come before that; then the same `mics search` is run again)."""
    if not (run / "store" / "data.mdb").exists():
        return False
    with RunStore.open(run, write=False) as store:
        return store.get_meta("config") is not None and store.get_meta("dataset") is not None


def whole_files(out: Path) -> tuple[bool, list[str]]:
    """Every export file present parses completely (JSONL line by line); .tmp files ignored."""
    problems = []
    for p in sorted(out.glob("*")):
        if p.suffix == ".tmp" or not p.is_file():
            continue
        raw = p.read_bytes()
        try:
            if p.suffix == ".jsonl":
                if raw and not raw.endswith(b"\n"):
                    raise ValueError("no final newline")
                for line in raw.splitlines():
                    orjson.loads(line)
            else:
                orjson.loads(raw)
        except ValueError as e:
            problems.append(f"{p.name}: {e}")
    return not problems, problems


def same_exports(a: Path, b: Path) -> tuple[bool, list[str]]:
    """Byte-equal export files (EXPORT_FILES) in both directories."""
    diff = [n for n in EXPORT_FILES
            if not (a / n).is_file() or not (b / n).is_file()
            or (a / n).read_bytes() != (b / n).read_bytes()]
    return not diff, diff


def tree_digest(run: Path) -> list[Any]:
    """Questions and their trees without usage (latencies and cache hits differ run to run)."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "usage"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    with RunStore.open(run, write=False) as store:
        return [(qid, strip(rec), strip(store.get_nodes(qid)))
                for qid, rec in store.iter_questions()]


# ---------------------------------------------------------------- accounting


def account(log: Sequence[LogEntry], sessions: Sequence[Session],
            calls: Sequence[dict[str, Any]], *, window_s: float = 2.0) -> dict[str, Any]:
    """Server completions vs stored calls, session by session (see the module docstring).

    Server entries belong to the last session started at or before them; a stored call belongs
    to the session whose window holds its timestamp. `window_s`: how long before its session
    ended a lost (later repeated) completion may have happened.
    """
    searches = [s for s in sessions if s.searching]
    starts = [s.start for s in searches]

    def session_at(t: float) -> int:
        i = -1
        for k, start in enumerate(starts):
            if start <= t:
                i = k
        return i

    served: Counter[int] = Counter()
    completions: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for e in log:
        if e.ok:
            s = session_at(e.t)
            served[s] += 1
            completions[e.key].append((e.t, s))
    stored: Counter[int] = Counter(session_at(c["t"]) for c in calls)
    gate_sessions: dict[str, set[int]] = defaultdict(set)
    for c in calls:
        gate_sessions[c["session"]].add(session_at(c["t"]))
    lost = {i: served[i] - stored[i] for i in range(len(searches))}
    charged: Counter[int] = Counter()
    within, outside, gaps = 0, 0, []
    for times in completions.values():
        times.sort()
        for (t_a, s_a), (_t_b, s_b) in zip(times, times[1:], strict=False):
            if s_a == s_b:
                within += 1  # completed twice by one process: never explained by a kill
                continue
            charged[s_a] += 1
            gap = searches[s_a].end - t_a
            gaps.append(gap)
            outside += gap > window_s
    unexplained = within + sum(
        max(0, n - (lost[i] if searches[i].killed else 0)) for i, n in charged.items())
    keys = [c["key"] for c in calls]
    return {
        "server_completions": sum(served.values()),
        "server_distinct_completed": len(completions),
        "server_repeats": sum(len(t) - 1 for t in completions.values()),
        "stored_calls": len(keys),
        "stored_twice": len(keys) - len(set(keys)),
        "gate_sessions_split": sum(len(v) > 1 for v in gate_sessions.values()),
        "in_flight_lost": sum(v for i, v in lost.items() if searches[i].killed),
        "lost_in_unkilled_sessions": sum(v for i, v in lost.items() if not searches[i].killed),
        "negative_lost_sessions": sum(v < 0 for v in lost.values()),
        "completed_calls_repeated": unexplained,
        "repeats_outside_kill_window": outside,
        "max_lost_to_kill_s": round(max(gaps), 3) if gaps else 0.0,
        "lost_by_session": {searches[i].label: v for i, v in lost.items() if v},
    }


# ---------------------------------------------------------------- the chaos run


@dataclass
class KillPoint:
    index: int
    kind: str  # time | calls | export
    target: float  # seconds after start (time, export) or stored calls (calls)
    landed: bool = False  # the process died of SIGKILL
    phase: str = ""  # before-first-call | calls | after-commit | export
    stored_before: int = 0
    stored_after: int = 0
    resumed: bool = False  # the next resume (or export re-run) succeeded
    files_whole: bool = True
    tries: int = 1  # export kills that came after the export finished are retried
    seconds: float = 0.0


@dataclass
class ChaosReport:
    questions: int
    kills_planned: int
    seed: int
    kill_points: list[KillPoint] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)
    accounting: dict[str, Any] = field(default_factory=dict)
    exports_identical: bool = False
    export_diff: list[str] = field(default_factory=list)
    trees_identical: bool = False
    same_calls_as_reference: bool = False
    leftover_tmp_files: list[str] = field(default_factory=list)
    sessions: int = 0
    seconds: float = 0.0

    @property
    def kills_landed(self) -> int:
        return sum(k.landed for k in self.kill_points)

    @property
    def kills_resumed(self) -> int:
        return sum(k.landed and k.resumed and k.files_whole for k in self.kill_points)

    @property
    def passed(self) -> bool:
        a = self.accounting
        return (self.kills_resumed == self.kills_planned and self.exports_identical
                and self.trees_identical and self.same_calls_as_reference
                and a.get("stored_twice") == 0 and a.get("completed_calls_repeated") == 0
                and a.get("lost_in_unkilled_sessions") == 0
                and a.get("negative_lost_sessions") == 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(kills_landed=self.kills_landed, kills_resumed=self.kills_resumed,
                 passed=self.passed, kinds=dict(Counter(k.kind for k in self.kill_points)),
                 phases=dict(Counter(k.phase for k in self.kill_points)))
        return d


def _plan(kills: int, rng: random.Random) -> list[str]:
    """About 40% time, 40% calls, 20% export kill points; never an export first."""
    n_export = kills // 5
    n_time = (kills - n_export + 1) // 2
    plan = ["export"] * n_export + ["time"] * n_time + ["calls"] * (kills - n_export - n_time)
    rng.shuffle(plan)
    if plan and plan[0] == "export":
        j = next((i for i, k in enumerate(plan) if k != "export"), 0)
        plan[0], plan[j] = plan[j], plan[0]
    return plan


def run_chaos(questions: int = 50, kills: int = 20, seed: int = 0, workdir: Path | None = None,
              log: Callable[[str], None] = lambda _m: None) -> ChaosReport:
    """The whole chaos experiment (see the module docstring); returns its report."""
    began = time.time()
    rng = random.Random(seed)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mics-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    data, images = write_demo_dataset(work / "data", n=questions, seed=seed)
    report = ChaosReport(questions=questions, kills_planned=kills, seed=seed)
    with QuietLoopbackServer(MODELS, seed=seed, latency=LATENCY) as srv:
        cfg = work / "chaos.toml"
        cfg.write_text(config_text(srv.url, seed=seed))
        search = ["search", data, "--image-root", images, "--config", cfg]

        # 1. the uninterrupted reference run
        ref_run, ref_out = work / "reference", work / "reference-export"
        ref = check_ok(run_mics([*search, "--run", ref_run], label="reference"))
        ref_log = srv.log
        srv.clear_log()
        t0 = time.time()
        check_ok(run_mics(["export", ref_run, "--out", ref_out, "--format", "all"]))
        export_s = time.time() - t0
        ref_calls = stored_calls(ref_run)
        ref_acc = account(ref_log, [ref], ref_calls)
        total = len(ref_calls)
        startup = min((e.t for e in ref_log), default=ref.start + 1.0) - ref.start
        per_call = max(1e-4, (ref.end - ref.start - startup) / max(1, total))
        report.reference = {"calls": total, "seconds": round(ref.end - ref.start, 3),
                            "startup_s": round(startup, 3), "export_s": round(export_s, 3),
                            "server_repeats": ref_acc["server_repeats"],
                            "server_completions": ref_acc["server_completions"]}
        log(f"reference: {total} calls in {ref.end - ref.start:.1f}s "
            f"(start-up {startup:.2f}s, export {export_s:.2f}s)")

        # 2. the chaos run
        run, out = work / "chaos", work / "chaos-export"
        sessions: list[Session] = []
        queue = deque(_plan(kills, rng))
        for k in range(kills):
            kind = queue.popleft()
            if kind == "export" and not recorded(run) and any(x != "export" for x in queue):
                # nothing to export yet (a kill came before the run was recorded): swap in the
                # next search kill point
                j = next(i for i, x in enumerate(queue) if x != "export")
                kind = queue[j]
                del queue[j]
                queue.appendleft("export")
            before = len(stored_calls(run))
            point = KillPoint(index=k + 1, kind=kind, target=0.0, stored_before=before, tries=0)
            if kind == "export":
                point.phase, point.stored_after, problems = "export", before, []
                span = export_s
                for _ in range(5):  # an export is idempotent: a kill that came late is retried
                    point.tries += 1
                    point.target = round(rng.uniform(0.2, 0.8) * span, 3)
                    s = run_mics(["export", run, "--out", out, "--format", "all"],
                                 label=f"export-kill-{k + 1}", kill_after_s=point.target)
                    sessions.append(s)
                    whole, bad = whole_files(out)
                    point.files_whole, problems = point.files_whole and whole, problems + bad
                    if s.killed:
                        break
                    span = min(span, s.end - s.start)  # it finished: aim inside its duration
                point.landed = s.killed
                again = run_mics(["export", run, "--out", out, "--format", "all"])
                whole_again, more = whole_files(out)
                point.resumed = again.rc == 0 and whole_again
                point.files_whole = point.files_whole and whole_again
                if problems or more:
                    log(f"  export files not whole: {problems + more}")
                sessions.append(again)
            else:
                remaining = total - before
                left = 1 + sum(1 for x in queue if x != "export")
                share = remaining / (left + 1)
                args = ["resume", run] if recorded(run) else [*search, "--run", run]
                label = f"{kind}-kill-{k + 1}"
                if kind == "calls":
                    n = rng.randint(1, max(1, min(remaining - 1, int(2 * share))))
                    point.target = n
                    s = run_mics(args, label=label, env={KILL_AFTER_ENV: str(n)})
                else:
                    budget = min(2 * share, 0.7 * remaining) * per_call
                    point.target = round(rng.uniform(0.25, 1.0) * startup
                                         + rng.uniform(0.0, budget), 3)
                    s = run_mics(args, label=label, kill_after_s=point.target)
                point.tries = 1
                sessions.append(s)
                point.landed = s.killed
                time.sleep(DRAIN_S)
                if s.rc not in (0, -signal.SIGKILL):
                    check_ok(s)
                after = len(stored_calls(run))
                point.stored_after = after
                mine = [e.t for e in srv.log if e.t >= s.start]
                served = len(mine)
                if mine:  # resumes start later as the replay grows: aim after the start-up
                    startup = max(startup, min(mine) - s.start)
                point.phase = ("after-commit" if kind == "calls" else
                               "calls" if served else "before-first-call")
            point.seconds = round(time.time() - began, 2)
            report.kill_points.append(point)
            log(f"kill {k + 1:2d}/{kills} {kind:6s} at {point.target:>8} -> "
                f"{'killed' if point.landed else 'MISSED'} ({point.phase}); "
                f"stored {point.stored_before} -> {point.stored_after}/{total}")
        final = check_ok(run_mics(["resume", run] if recorded(run) else
                                  [*search, "--run", run], label="final"))
        sessions.append(final)
        # every session after a search kill resumed from the store it left and ended in a kill
        # or in exit 0 (anything else raised above), and the last one finished the run
        for p in report.kill_points:
            if p.kind != "export":
                p.resumed = True
        check_ok(run_mics(["export", run, "--out", out, "--format", "all"]))
        chaos_log = srv.log
    calls = stored_calls(run)
    report.accounting = account(chaos_log, sessions, calls)
    report.same_calls_as_reference = (sorted(c["key"] for c in calls)
                                      == sorted(c["key"] for c in ref_calls))
    report.exports_identical, report.export_diff = same_exports(ref_out, out)
    report.trees_identical = tree_digest(ref_run) == tree_digest(run)
    report.leftover_tmp_files = sorted(p.name for p in out.glob("*.tmp"))
    report.sessions = sum(s.searching for s in sessions)
    report.seconds = round(time.time() - began, 2)
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


# ---------------------------------------------------------------- the fault storm


def run_storm(questions: int = 50, rate: float = 0.2, seed: int = 0,
              workdir: Path | None = None, max_retries: int = 6,
              kinds: Sequence[str] = STORM_KINDS) -> dict[str, Any]:
    """One search under a storm of injected faults; what was injected and what was absorbed.

    `slow` replies take 1 s against a 0.5 s client timeout; a 429 carries Retry-After 0.05 s.
    """
    began = time.time()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mics-storm-"))
    data, images = write_demo_dataset(work / "data", n=questions, seed=seed)
    faults = Faults(rate=rate, kinds=tuple(kinds), slow_s=1.0, retry_after_s=0.05)
    with QuietLoopbackServer(MODELS, seed=seed, faults=faults) as srv:
        cfg = work / "storm.toml"
        cfg.write_text(config_text(srv.url, seed=seed, max_retries=max_retries, timeout_s=0.5))
        s = run_mics(["search", data, "--image-root", images, "--config", cfg,
                      "--run", work / "run"], label="storm")
        server_log = srv.log
    with RunStore.open(work / "run", write=False) as store:
        recs = [rec for _, rec in store.iter_questions()]
        calls = store.iter_calls()
        failures = store.iter_failures()
    retried = [c for c in calls if c["attempts"] > 1]
    by_fault = Counter(e.fault for e in server_log if e.fault)
    completions: dict[str, list[LogEntry]] = defaultdict(list)
    for e in server_log:
        if e.ok:
            completions[e.key].append(e)
    # a repeat after a `slow` completion: the client had timed out and never got the reply;
    # any other repeat re-bought a reply that had been delivered
    after_timeout: Counter[str] = Counter()
    delivered_resent: Counter[str] = Counter()
    for entries in completions.values():
        for a, b in zip(entries, entries[1:], strict=False):
            (after_timeout if a.fault == "slow" else delivered_resent)[b.role] += 1
    report = {
        "questions": questions, "rate": rate, "seed": seed, "exit_code": s.rc,
        "requests": len(server_log), "faults_injected": sum(by_fault.values()),
        "faults_by_kind": dict(sorted(by_fault.items())),
        "questions_finished": sum(r["status"] in ("succeeded", "failed") for r in recs),
        "questions_succeeded": sum(r["status"] == "succeeded" for r in recs),
        "questions_no_mentor": sum(r.get("stop_reason") == "no_mentor" for r in recs),
        "stored_calls": len(calls), "retried_calls": len(retried),
        # failed attempts recorded on stored calls (a batch's are recorded on each of its calls)
        "retries_absorbed": sum(c["attempts"] - 1 for c in calls),
        "retries_recorded_on_call": all(len(c["errors"]) == c["attempts"] - 1 for c in calls),
        "max_attempts": max((c["attempts"] for c in calls), default=0),
        "attempt_bound": max_retries + 1,
        "failed_calls": len(failures),  # a failed intern batch is one entry for its calls
        "failed_calls_by_role": dict(sorted(Counter(f["role"] for f in failures).items())),
        "failed_call_items": sum(len(f["keys"]) for f in failures),
        "failed_call_attempts_max": max((f["attempts"] for f in failures), default=0),
        "server_completed_twice": sum(len(v) - 1 for v in completions.values()),
        "resent_after_client_timeout": sum(after_timeout.values()),
        "delivered_replies_resent": sum(delivered_resent.values()),
        "delivered_replies_resent_by_role": dict(sorted(delivered_resent.items())),
        "seconds": round(time.time() - began, 2),
    }
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


# ---------------------------------------------------------------- command line


def _print_chaos(report: ChaosReport) -> None:
    from rich.console import Console
    from rich.table import Table

    a = report.accounting
    table = Table(title=f"mics chaos: {report.questions} questions, {report.kills_planned} "
                        f"kill points, seed {report.seed}", show_header=False)
    rows = [
        ("kill points landed (SIGKILL)", f"{report.kills_landed}/{report.kills_planned}"),
        ("kill points resumed", f"{report.kills_resumed}/{report.kills_planned}"),
        ("kinds", ", ".join(f"{k} {v}" for k, v in
                            sorted(Counter(p.kind for p in report.kill_points).items()))),
        ("phases", ", ".join(f"{k} {v}" for k, v in
                             sorted(Counter(p.phase for p in report.kill_points).items()))),
        ("search sessions", str(report.sessions)),
        ("exports identical (all formats)", str(report.exports_identical)),
        ("trees identical", str(report.trees_identical)),
        ("same stored calls as reference", str(report.same_calls_as_reference)),
        ("reference calls", str(report.reference.get("calls"))),
        ("stored twice (store)", str(a.get("stored_twice"))),
        ("server completions / distinct", f"{a.get('server_completions')} / "
                                          f"{a.get('server_distinct_completed')}"),
        ("completed calls repeated", str(a.get("completed_calls_repeated"))),
        ("in-flight replies lost at kills", str(a.get("in_flight_lost"))),
        ("leftover .tmp export files", str(len(report.leftover_tmp_files))),
        ("seconds", f"{report.seconds:.1f}"),
        ("verdict", "[green]PASS[/]" if report.passed else "[red]FAIL[/]"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storm", type=float, default=None, metavar="RATE",
                    help="run a fault storm at this failure rate instead of the kill run")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.storm is not None:
        result = run_storm(args.questions, args.storm, args.seed, args.workdir)
        ok = (result["exit_code"] == 0 and result["questions_finished"] == args.questions
              and result["max_attempts"] <= result["attempt_bound"]
              and result["retries_recorded_on_call"])
        print(json.dumps(result, indent=2))
    else:
        report = run_chaos(args.questions, args.kills, args.seed, args.workdir,
                           log=lambda m: print(m, flush=True))
        _print_chaos(report)
        result, ok = report.to_dict(), report.passed
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
