"""The `mics` command line: parse options, call mics.run / mics.export, render with rich."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.bench import register as register_bench
from cli.report import register
from cli.signals import run_until_signalled
from mics.config import ConfigError, load_config, parse_config
from mics.export import export_reference
from mics.run import (
    RunError,
    RunSummary,
    cache_hit_rates,
    describe_dataset,
    record_run,
    search_run,
    summarize,
    with_seed,
)
from mics.types import Outcome
from store import RunStore, StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Mentor-Intern Collaborative Search: verified reasoning chains.")
console = Console()
err = Console(stderr=True)

RunDir = Annotated[Path, typer.Argument(help="Run directory (holds the LMDB store).")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _search_with_progress(run_dir: Path, store: RunStore | None = None) -> RunSummary:
    with Progress(TextColumn("[bold]searching"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("ok {task.fields[ok]}  failed {task.fields[bad]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("search", total=None, ok=0, bad=0)
        tally = {"ok": 0, "bad": 0}

        def on_start(total: int | None) -> None:
            progress.update(task, total=total)

        def on_done(outcome: Outcome) -> None:
            tally["ok" if outcome.status == "succeeded" else "bad"] += 1
            progress.update(task, advance=1, **tally)

        return run_until_signalled(lambda stop: search_run(
            run_dir, on_start=on_start, on_done=on_done, store=store, stop=stop))


def _record_and_search(run: Path, cfg, data: Path, image_root: Path | None,  # noqa: ANN001
                       limit: int | None) -> RunSummary:
    """Record the run and search it under one writer lock (no second process can slip in)."""
    dataset = describe_dataset(data, image_root, limit)
    with RunStore.open(run, write=True, create=True) as store:
        record_run(store, cfg, dataset)
        return _search_with_progress(run, store)


def _print_summary(summary: RunSummary, title: str = "run summary") -> None:
    table = Table(title=title, show_header=False)
    table.add_row("questions searched", str(summary.questions))
    table.add_row("succeeded", str(summary.succeeded))
    table.add_row("failed", str(summary.failed))
    if summary.pending:
        table.add_row("not finished", str(summary.pending))
    for reason, n in summary.stop_reasons.items():
        table.add_row(f"  stop: {reason}", str(n))
    if summary.calls:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(summary.calls.items()))
        table.add_row("model calls (this session)", calls)
    if summary.seconds:
        table.add_row("seconds", f"{summary.seconds:.2f}")
    table.add_row("run directory", summary.run_dir)
    console.print(table)
    if summary.interrupted:
        console.print(f"[yellow]stopped early[/]: everything finished is stored; resume with "
                      f"[bold]mics resume {summary.run_dir}[/]")


def _guarded(fn, *args):  # noqa: ANN001, ANN202
    try:
        return fn(*args)
    except (ConfigError, RunError, StoreError) as e:
        _fail(str(e))


@app.command()
def search(
    data: Annotated[Path, typer.Argument(help="Dataset: Chiron/MMRP JSONL or a JSON list.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config (TOML).")],
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory to create/resume.")],
    image_root: Annotated[Path | None, typer.Option(help="Directory image paths are under.")]
    = None,
    seed: Annotated[int | None, typer.Option(help="Override [search].seed.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
) -> None:
    """Search every question of DATA; re-running on the same --run resumes it."""
    cfg = _guarded(lambda: with_seed(load_config(config), seed))
    _print_summary(_guarded(_record_and_search, run, cfg, data, image_root, limit))


@app.command()
def resume(run: RunDir) -> None:
    """Continue an interrupted run; stored calls are never sent again."""
    summary = _guarded(_search_with_progress, run)
    _print_summary(summary)


@app.command()
def status(
    run: RunDir,
    questions: Annotated[int, typer.Option(help="Per-question cache rows to show.")] = 20,
) -> None:
    """Show a run's progress and intern prefix-cache hit rates (works during a search)."""

    def read() -> tuple[RunSummary, float | None, dict[str, tuple[int, int]], list[str]]:
        with RunStore.open(run, write=False) as store:
            summary = summarize(store)
            summary.calls = {"stored calls": store.call_count(),
                             "recorded call failures": len(store.iter_failures())}
            rate, per_q = cache_hit_rates(store)
            cfg = store.get_meta("config") or {}
            models = [*cfg.get("mentors", []), *cfg.get("interns", []), cfg.get("judge") or {}]
            simulated = [m["name"] for m in models if m.get("backend") == "simulated"]
            return summary, rate, per_q, simulated

    summary, rate, per_q, simulated = _guarded(read)
    _print_summary(summary, title="run status")
    if simulated:
        console.print(f"[yellow]SIMULATED models[/] (no real model was called): "
                      f"{', '.join(simulated)}")
    if rate is None:
        console.print("intern cache hit rate: — (no intern calls with token counts)")
        return
    console.print(f"intern cache hit rate (cached / prompt tokens): [bold]{rate:.1%}[/]")
    table = Table(title="per question", show_lines=False)
    for col in ("question", "prompt tokens", "cached tokens", "hit rate"):
        table.add_column(col, justify="right")
    for qid, (prompt, cached) in list(per_q.items())[:questions]:
        table.add_row(qid, str(prompt), str(cached), f"{cached / prompt:.1%}" if prompt else "—")
    console.print(table)
    if len(per_q) > questions:
        console.print(f"... {len(per_q) - questions} more (--questions N)")


@app.command()
def export(
    run: RunDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    fmt: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="reference | sft | sharegpt | step-values | preferences | all "
        "(repeatable).")] = None,
    min_score: Annotated[float | None, typer.Option(
        help="Only questions whose last chosen step scored at least this.")] = None,
    only_full_score: Annotated[bool, typer.Option(
        "--only-full-score", help="Only questions that stopped on a full score.")] = False,
    max_depth: Annotated[int | None, typer.Option(
        help="Only questions whose final depth is at most this.")] = None,
    answer_in_target: Annotated[bool, typer.Option(
        "--answer-in-target", help="sft/sharegpt: keep the final-answer line in the target.")]
    = False,
) -> None:
    """Write training data; `reference` is results.jsonl + failed.jsonl (Chiron-o1 schema)."""
    from mics.export import FORMATS, Filters
    from mics.export import export as write_formats

    formats = list(FORMATS) if "all" in (fmt or []) else list(dict.fromkeys(fmt or ["reference"]))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        _fail(f"unknown --format {', '.join(bad)}; choose from {', '.join(FORMATS)} or all")
    filters = Filters(min_score=min_score, only_full_score=only_full_score, max_depth=max_depth)

    def write() -> dict[str, int]:
        with RunStore.open(run, write=False) as store:
            if formats == ["reference"] and not filters.active:
                return export_reference(store, out)
            return write_formats(store, out, formats, filters, answer_in_target)

    counts = _guarded(write)
    if "reference" in formats:
        console.print(f"wrote {counts['results']} results and {counts['failed']} failures to "
                      f"{out}" + (f" ({counts['pending']} questions not finished)"
                                  if counts["pending"] else ""))
    for f in formats:
        if f != "reference":
            console.print(f"wrote {counts[f]} {f} records to {out}")


@app.command()
def doctor(config: Annotated[Path, typer.Argument(help="Run config (TOML).")]) -> None:
    """Probe every configured model with a one-token call; exit 1 if any fails."""
    from mics.doctor import doctor as run_doctor

    cfg = _guarded(load_config, config)
    checks = anyio.run(run_doctor, cfg)
    table = Table(title=f"mics doctor: {config}")
    for col in ("role", "name", "backend", "endpoint", "ok", "latency", "message"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.role, c.name, c.backend, c.where, "[green]yes[/]" if c.ok else
                      "[red]NO[/]", f"{c.latency_s * 1000:.0f} ms", c.message)
    console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command()
def demo(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory.")] = Path(
        "mics-demo-run"),
    fresh: Annotated[bool, typer.Option(help="Delete the run directory first.")] = False,
) -> None:
    """Search a bundled synthetic dataset with SIMULATED models, then summarise."""
    from mics.demo_data import write_demo_dataset

    if fresh and run.exists():
        shutil.rmtree(run)
    text = resources.files("mics").joinpath("resources/simulated.toml").read_text()
    import tomllib

    cfg = parse_config(tomllib.loads(text), where="bundled simulated.toml")
    data, images = write_demo_dataset(run / "demo-data")
    console.print("[yellow]SIMULATED models[/] on a synthetic dataset (no model is called)")
    summary = _guarded(_record_and_search, run, cfg, data, images, None)
    _print_summary(summary, title="demo summary (simulated models)")
    console.print(f"next: [bold]mics export {run} --out {run}/export[/]")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; resume with `mics resume RUN_DIR`")
        sys.exit(130)


register(app)
register_bench(app)

if __name__ == "__main__":
    main()
