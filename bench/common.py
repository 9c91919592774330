"""Shared pieces of `mics bench`: synthetic questions, machine facts, JSON reports, rich tables.

Every bench writes one JSON object: ``machine`` (cores, RAM, Python, package versions),
``command`` (the exact command line) and one top-level section named after the bench
(``loop``, ``overhead``, ``resume``, ``prefix``) holding its figures.
"""

from __future__ import annotations

import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from mics.demo_data import DEMO_CASES

PACKAGES = ("mics", "anyio", "httpx", "aiohttp", "lmdb", "orjson", "rich", "typer", "pillow")


# ---------------------------------------------------------------- workload


def question_record(i: int, rng: random.Random) -> dict[str, Any]:
    """One text-only synthetic record in the Chiron/MMRP schema; unique text per ``i``.

    The case number is part of the question, so no two questions share a prompt (the call memo
    is keyed by content and must not answer one question from another's calls).
    """
    case = DEMO_CASES[i % len(DEMO_CASES)]
    age = rng.randint(18, 85)
    question = case.question.format(age=age, sex=case.sex)
    return {
        "rid": f"bench-{i + 1:06d}",
        "messages": [
            {"role": "user", "content": f"**Question:** (case {i + 1}) {question}"},
            {"role": "assistant", "content": f"**Correct Answer:** {case.answer}"},
        ],
        "images": [],
        "presentation": case.complaint,
        "age_label": f"{age} years",
        "gender_label": case.sex.capitalize(),
        "caption": [],
    }


def write_questions(path: Path, n: int, seed: int = 0) -> Path:
    """Stream ``n`` synthetic text-only questions to a JSONL file (constant memory)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for i in range(n):
            f.write(orjson.dumps(question_record(i, rng)) + b"\n")
    return path


def sim_models(quality: tuple[float, ...] = (0.6, 0.45, 0.35),
               skill: tuple[float, ...] = (0.95, 0.85, 0.75)) -> dict[str, dict[str, Any]]:
    """The paper-shaped cast (3 mentors, 3 interns, a judge) as simulator specs by name."""
    return {**{f"m{i}": {"role": "mentor", "quality": q} for i, q in enumerate(quality)},
            **{f"i{i}": {"role": "intern", "skill": s} for i, s in enumerate(skill)},
            "judge": {"role": "judge"}}


# ---------------------------------------------------------------- machine and memory


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """Cores, RAM, Python and the versions of the packages that shape the figures."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    ram = _ram_bytes()
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python_loop_s": python_loop_s(),
        "packages": versions,
    }


def python_loop_s(n: int = 3_000_000, repeats: int = 3) -> float:
    """CPU seconds for a fixed pure-Python loop (`n` additions), best of `repeats`: a gauge of
    how fast this host runs Python when the figures were written. A shared VM's speed drifts
    by up to 2x from hour to hour, and every CPU-per-request figure drifts with it; compare
    figures taken at different times only together with this."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        total = 0
        for i in range(n):
            total += i
        best = min(best, time.process_time() - t0)
    return round(best, 3)


def proc_status_mb(field: str = "VmHWM") -> float | None:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS), in MB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM, else getrusage)."""
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command_line() -> str:
    """The exact command that is running, as a shell would type it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "mics":
        argv[0] = "mics"
    elif argv and Path(argv[0]).parts[-2:] == ("cli", "app.py"):
        argv[0:1] = ["python", "-m", "cli.app"]
    return shlex.join(argv)


# ---------------------------------------------------------------- reports


def report(section: str, figures: Mapping[str, Any], *, command: str | None = None
           ) -> dict[str, Any]:
    """The JSON object every bench writes: machine, command, time and its own section."""
    return {
        "machine": machine_info(),
        "command": command if command is not None else command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        section: dict(figures),
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write a report as indented JSON (atomically: a temp file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
                    + b"\n")
    tmp.replace(path)
    return path


def fmt(value: Any) -> str:
    """A compact human rendering of a figure."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if value is None:
        return "-"
    return str(value)


def table(title: str, rows: Iterable[tuple[str, Any] | tuple[str, Any, str]]) -> Table:
    """A two- or three-column rich table: figure, value, note."""
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("note", style="dim")
    for row in rows:
        name, value, *note = row
        t.add_row(name, fmt(value), note[0] if note else "")
    return t


def print_machine(console: Console, machine: Mapping[str, Any]) -> None:
    """One dim line naming the machine the figures come from."""
    pk = machine.get("packages", {})
    console.print(f"[dim]{machine.get('cores')} cores, {machine.get('ram_gb')} GB RAM, "
                  f"Python {machine.get('python')}, mics {pk.get('mics')}, "
                  f"lmdb {pk.get('lmdb')}, httpx {pk.get('httpx')}; host speed: a fixed "
                  f"Python loop in {machine.get('python_loop_s')} s[/]")
