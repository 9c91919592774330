"""The `mics` command line: parse options, call mics.run / mics.export, render with rich.

Imports of the engine, the store and the report modules happen inside the commands, so that
`mics --help` starts at once and no command imports torch or transformers unless a config
asks for the `local` backend.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.bench import register as register_bench
from cli.report import register
from cli.ui import cell, console, err, escape, fail, print_json, warn

if TYPE_CHECKING:
    from mics.config import RunConfig
    from mics.run import RunSummary
    from store import RunStore

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Mentor-Intern Collaborative Search: verified reasoning chains.")

RunDir = Annotated[Path, typer.Argument(help="Run directory (holds the LMDB store).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
ProgressEvery = Annotated[float, typer.Option(
    "--progress-every", min=0.1, help="Seconds between progress lines when stdout is not a "
    "terminal.")]
MAX_SEED = 2**63 - 1


def _fail(message: str, code: int = 2) -> None:
    fail(message, code)


def _version(value: bool) -> None:
    if value:
        from mics import __version__

        console.print(f"mics {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")]
        = False) -> None:
    """Mentor-Intern Collaborative Search: verified reasoning chains."""


def _guarded(fn, *args):  # noqa: ANN001, ANN202
    """Run fn; a problem the user can fix becomes one `error:` line and exit code 2."""
    from mics.config import ConfigError
    from mics.run import RunError
    from store import StoreError

    try:
        return fn(*args)
    except (ConfigError, RunError, StoreError) as e:
        _fail(str(e))
    except OSError as e:  # a path that is a file, not writable, ...
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))


# ---------------------------------------------------------------- search and resume


def _search(run_dir: Path, as_json: bool, every_s: float, **kwargs: Any) -> RunSummary:
    """search_run with whole-run progress (stderr under --json, so stdout stays JSON); the
    first SIGINT/SIGTERM stops it (exit 130/143 once in-flight calls are stored)."""
    from cli.progress import RunProgress
    from cli.signals import run_until_signalled
    from mics.run import search_run

    progress = RunProgress(err if as_json else console, every_s)
    signals: list[int] = []
    try:
        summary = run_until_signalled(lambda stop: search_run(
            run_dir, on_start=progress.on_start, on_done=progress.on_done,
            on_gate=progress.on_gate, stop=stop, **kwargs), on_signal=signals.append)
    finally:
        progress.close()
    summary.stop_signal = signals[0] if signals else None
    return summary


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (None: it exists)."""
    top, p = None, path.absolute()
    while not p.exists():
        top, p = p, p.parent
    return top


def _check_run_dir(run: Path) -> None:
    if run.exists() and not run.is_dir():
        _fail(f"--run {run} is a file, not a directory; choose a run directory")


def _start(run: Path, cfg: RunConfig, data: Path, image_root: Path | None, limit: int | None,
           as_json: bool, every_s: float) -> RunSummary:
    """Check everything (config, models, dataset, options), then record the run and search it
    under one writer lock. A start that fails leaves the run directory as it was found."""
    import anyio

    from mics.run import build_models, describe_dataset, record_run
    from store import RunStore

    _check_run_dir(run)
    dataset = _guarded(describe_dataset, data, image_root, limit)
    models = _guarded(build_models, cfg)
    created = _first_missing(run)  # what a failed start must remove again
    recorded = False
    try:
        models.preflight()  # e.g. each SGLang intern's chat template, before anything exists
        with RunStore.open(run, write=True, create=True) as store:
            record_run(store, cfg, dataset)
            recorded = True
            return _search(run, as_json, every_s, store=store, models=models)
    except BaseException:
        if not recorded:
            anyio.run(models.aclose)
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
        raise


def exit_code(summary: RunSummary) -> int:
    """The one place a finished search/resume becomes an exit code: 0 only when every question
    was decided; 130/143 after SIGINT/SIGTERM; 3 with deferred or unfinished questions (so
    `mics search ... && mics export ...` never exports partial data unnoticed); 4 when no
    record could be read."""
    return summary.exit_code


def _closing(summary: RunSummary, as_json: bool, title: str = "run summary") -> None:
    """The closing summary of search/resume (table or JSON), warnings, then the exit code."""
    if as_json:
        print_json(summary.to_dict())
    else:
        _print_summary(summary, title)
    if summary.total == 0 or (summary.questions == 0 and not summary.interrupted):
        warn("the dataset has no records; nothing was searched")
    elif summary.questions and summary.failed == summary.questions:
        warn(f"every record failed ({summary.failed}); see `mics inspect {summary.run_dir}` "
             "for why")
    line = summary.deferred_line()
    if line:
        err.print(line, markup=False, highlight=False, soft_wrap=True)
    elif summary.pending and summary.stop_signal is None:
        err.print(f"{summary.pending} questions not finished; run `mics resume "
                  f"{summary.run_dir}`", markup=False, highlight=False, soft_wrap=True)
    code = exit_code(summary)
    if code:
        raise typer.Exit(code)


def _print_summary(summary: RunSummary, title: str = "run summary",
                   calls_label: str = "model calls (this session)") -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    done = summary.succeeded + summary.failed
    if summary.total is not None:
        table.add_row("questions in dataset", str(summary.total))
    table.add_row("questions searched", str(summary.questions))
    table.add_row("succeeded", str(summary.succeeded))
    table.add_row("failed", str(summary.failed))
    if summary.deferred:
        table.add_row("deferred (a call failed)", str(summary.deferred))
    if summary.pending:
        table.add_row("not finished", str(summary.pending))
    for reason, n in summary.stop_reasons.items():
        table.add_row(cell(f"  stop: {reason}"), str(n))
    if summary.calls:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(summary.calls.items()))
        table.add_row(calls_label, calls)
    if summary.tokens:
        table.add_row("tokens (this session)", str(summary.tokens))
    if summary.seconds:
        table.add_row("seconds", f"{summary.seconds:.2f}")
    table.add_row("run directory", cell(summary.run_dir))
    console.print(table)
    if summary.interrupted:
        console.print(f"[yellow]stopped early[/]: {done} finished and stored; resume with "
                      f"[bold]mics resume {escape(summary.run_dir)}[/]")


@app.command()
def search(
    data: Annotated[Path, typer.Argument(help="Dataset: Chiron/MMRP JSONL or a JSON list.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config (TOML).")],
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory to create/resume.")],
    image_root: Annotated[Path | None, typer.Option(help="Directory image paths are under.")]
    = None,
    seed: Annotated[int | None, typer.Option(
        min=0, max=MAX_SEED, help="Override \\[search].seed.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N records.")] = None,
    as_json: AsJson = False,
    every_s: ProgressEvery = 30.0,
) -> None:
    """Search every question of DATA; re-running on the same --run resumes it."""
    from mics.config import load_config
    from mics.run import with_seed

    cfg = _guarded(lambda: with_seed(load_config(config), seed))
    summary = _guarded(_start, run, cfg, data, image_root, limit, as_json, every_s)
    _closing(summary, as_json)


@app.command()
def resume(
    run: RunDir,
    data: Annotated[Path | None, typer.Option(
        "--data", help="The run's dataset at a new path (accepted only with the same "
        "content).")] = None,
    image_root: Annotated[Path | None, typer.Option(
        help="With --data: the new directory image paths are under.")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Also re-search questions that failed for an infrastructure "
        "cause (a failed call), including runs made before deferral existed, and read again "
        "records that could not be read (e.g. a missing image, now restored).")] = False,
    as_json: AsJson = False,
    every_s: ProgressEvery = 30.0,
) -> None:
    """Continue an interrupted run; stored calls are never sent again."""
    from mics.run import relocate_dataset
    from store import RunStore

    if image_root is not None and data is None:
        _fail("--image-root needs --data (the moved dataset)")

    def go() -> RunSummary:
        if data is None:
            return _search(run, as_json, every_s, retry_failed=retry_failed)
        with RunStore.open(run, write=True) as store:
            relocate_dataset(store, data, image_root)
            return _search(run, as_json, every_s, store=store,
                           retry_failed=retry_failed)

    _closing(_guarded(go), as_json)


# ---------------------------------------------------------------- status


def _read_status(run: Path) -> dict[str, Any]:
    from mics.run import cache_hit_rates, run_activity, summarize
    from store import RunStore

    store: RunStore
    with RunStore.open(run, write=False) as store:
        summary = summarize(store)
        summary.calls = {"stored calls": store.call_count(),
                         "recorded call failures": len(store.iter_failures())}
        activity = run_activity(store, summary)
        summary.total = activity["total"]
        rate, per_q = cache_hit_rates(store)
        cfg = store.get_meta("config") or {}
        models = [*cfg.get("mentors", []), *cfg.get("interns", []), cfg.get("judge") or {}]
        simulated = [m["name"] for m in models if m.get("backend") == "simulated"]
    return {"summary": summary, "activity": activity, "cache_hit_rate": rate,
            "per_question": per_q, "simulated": simulated}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


@app.command()
def status(
    run: RunDir,
    questions: Annotated[int, typer.Option(min=0, help="Per-question cache rows to show.")] = 20,
    as_json: AsJson = False,
) -> None:
    """Show a run's progress, rate, ETA, whether it runs now, and intern cache hit rates."""
    from rich.table import Table

    st = _guarded(_read_status, run)
    summary, activity, rate, per_q = (st["summary"], st["activity"], st["cache_hit_rate"],
                                      st["per_question"])
    if as_json:
        print_json({**summary.to_dict(), **activity, "cache_hit_rate": rate,
                    "simulated_models": st["simulated"],
                    "per_question": {q: {"prompt_tokens": p, "cached_tokens": c}
                                     for q, (p, c) in per_q.items()}})
        return
    _print_summary(summary, title="run status", calls_label="model calls (whole run)")
    pid = activity["running_pid"]
    console.print(f"running now: [bold green]yes[/] (pid {pid})" if pid else
                  "running now: [bold]no[/] (no process holds the run; "
                  f"`mics resume {escape(str(run))}` continues it)")
    qph = activity["questions_per_hour"]
    console.print(f"finished {activity['finished']} of {activity['total'] or '?'}; rate "
                  f"{'—' if qph is None else f'{qph:g} questions/hour'} over "
                  f"{_duration(activity['searching_s'])} of searching "
                  f"({activity['sessions']} session(s)); ETA {_duration(activity['eta_s'])}")
    if st["simulated"]:
        console.print(f"[yellow]SIMULATED models[/] (no real model was called): "
                      f"{escape(', '.join(st['simulated']))}")
    if rate is None:
        console.print("intern cache hit rate: — (no intern calls with token counts)")
        return
    console.print(f"intern cache hit rate (cached / prompt tokens): [bold]{rate:.1%}[/]")
    table = Table(title="per question", show_lines=False)
    for col in ("question", "prompt tokens", "cached tokens", "hit rate"):
        table.add_column(col, justify="right")
    for qid, (prompt, cached) in list(per_q.items())[:questions]:
        table.add_row(cell(qid), str(prompt), str(cached),
                      f"{cached / prompt:.1%}" if prompt else "—")
    console.print(table)
    if len(per_q) > questions:
        console.print(f"... {len(per_q) - questions} more (--questions N)")


# ---------------------------------------------------------------- export


def _format_name(f: str) -> str:
    return f.strip().lower().replace("_", "-")


@app.command()
def export(
    run: RunDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    fmt: Annotated[list[str] | None, typer.Option(
        "--format", "-f", help="reference | sft | sharegpt | step-values | preferences | prm | "
        "all | hf (repeatable; step_values works too; `all` is every JSONL format; `hf` writes "
        "<out>/hf, Hugging Face datasets, with the [hf] extra). See docs/exports.md.")] = None,
    min_score: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="Only questions whose last chosen step scored at least this.")]
    = None,
    only_full_score: Annotated[bool, typer.Option(
        "--only-full-score", help="Only questions that stopped on a full score.")] = False,
    include_partial: Annotated[bool, typer.Option(
        "--include-partial", help="sft/sharegpt: also the chains that reached max depth "
        "without a full score (left out by default).")] = False,
    max_depth: Annotated[int | None, typer.Option(
        min=0, help="Only questions whose final depth is at most this.")] = None,
    answer_in_target: Annotated[bool, typer.Option(
        "--answer-in-target", help="sft/sharegpt: keep the final-answer line in the target.")]
    = False,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Where the run's images are now (default: the root the run "
        "recorded); training formats write paths under it.")] = None,
    prm_label: Annotated[str, typer.Option(
        "--prm-label", help="prm step labels: positive (value > 0, Math-Shepherd's hard "
        "label) | full (value == 1).")] = "positive",
    exclude_leaks: Annotated[bool, typer.Option(
        "--exclude-leaks", help="Leave out whole questions whose chosen path has a step that "
        "states the correct answer; in the others, step-values / preferences / prm also leave "
        "out each step that states it and the steps continuing from it.")] = False,
) -> None:
    """Write training data; `reference` is results.jsonl + failed.jsonl (Chiron-o1 schema).

    sft and sharegpt hold, by default, only the chains that reached a full score (every
    intern sample right); --include-partial adds those that stopped at max depth.
    """
    from mics.export import FORMATS, Filters, export_reference
    from mics.export import export as write_formats
    from store import RunStore

    names = [_format_name(f) for f in fmt or ["reference"]]
    asked = list(dict.fromkeys(names))
    hf = "hf" in asked
    formats = list(FORMATS) if "all" in asked else [f for f in asked if f != "hf"]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        _fail(f"unknown --format {', '.join(bad)}; choose from {', '.join(FORMATS)}, all or hf")
    if prm_label not in ("positive", "full"):
        _fail(f"unknown --prm-label {prm_label}; choose from positive, full")
    if image_root is not None and not image_root.is_dir():
        _fail(f"--image-root is not a directory: {image_root}")
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; export writes a directory of files")
    filters = Filters(min_score=min_score, only_full_score=only_full_score, max_depth=max_depth,
                      exclude_leaks=exclude_leaks)

    def write() -> dict[str, int]:
        from mics.export_hf import MissingExtra, export_hf

        with RunStore.open(run, write=False) as store:
            counts: dict[str, int] = {}
            if formats == ["reference"] and not filters.active:
                counts = export_reference(store, out)
            elif formats:
                counts = write_formats(store, out, formats, filters, answer_in_target,
                                       image_root, prm_label, include_partial)
            if hf:
                try:
                    counts.update(export_hf(store, out, filters, answer_in_target, image_root,
                                            prm_label, include_partial))
                except (MissingExtra, ValueError) as e:
                    _fail(str(e))
            return counts

    counts = _guarded(write)
    where = escape(str(out))
    if "reference" in formats:
        console.print(f"wrote {counts['results']} results and {counts['failed']} failures to "
                      f"{where}" + (f" ({counts['pending']} questions not finished)"
                                    if counts["pending"] else ""))
    for f, n in counts.items():
        if f not in ("results", "failed", "pending", "partial", "leaks_left_out"):
            console.print(f"wrote {n} {escape(f)} records to {where}")
    if {"sft", "sharegpt"} & set(formats):
        partial = counts.get("partial", 0)
        console.print("sft/sharegpt: " + (
            f"chains that reached a full score, and {partial} that stopped at max depth "
            "without one (--include-partial)" if include_partial else
            f"only chains that reached a full score; {partial} that stopped at max depth "
            "without one left out (--include-partial adds them)"))
    if exclude_leaks:
        console.print(f"--exclude-leaks: {counts.get('leaks_left_out', 0)} questions left out "
                      "(their chosen path states the answer); step-level files also leave out "
                      "leaking steps and the steps continuing from them")


# ---------------------------------------------------------------- doctor and demo


@app.command()
def doctor(config: Annotated[Path, typer.Argument(help="Run config (TOML).")],
           as_json: AsJson = False) -> None:
    """Probe every configured model with one small call at the run's limits; exit 1 if any fails."""
    from dataclasses import asdict

    import anyio
    from rich.table import Table

    from mics.config import load_config
    from mics.doctor import doctor as run_doctor

    cfg = _guarded(load_config, config)
    checks = anyio.run(run_doctor, cfg)
    if as_json:
        print_json({"config": str(config), "ok": all(c.ok for c in checks),
                    "checks": [asdict(c) for c in checks]})
    else:
        table = Table(title=f"mics doctor: {escape(str(config))}")
        for col in ("role", "name", "backend", "endpoint", "ok", "latency", "message"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(cell(c.role), cell(c.name), cell(c.backend), cell(c.where),
                          "[green]yes[/]" if c.ok else "[red]NO[/]",
                          f"{c.latency_s * 1000:.0f} ms", cell(c.message))
        console.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command()
def demo(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory.")] = Path(
        "mics-demo-run"),
    fresh: Annotated[bool, typer.Option(help="Delete the run directory first.")] = False,
    as_json: AsJson = False,
) -> None:
    """Search a bundled synthetic dataset with SIMULATED models, then summarise."""
    import tomllib

    from mics.config import parse_config
    from mics.demo_data import write_demo_dataset

    _check_run_dir(run)
    if fresh and run.exists():
        shutil.rmtree(run)
    text = resources.files("mics").joinpath("resources/simulated.toml").read_text()
    cfg = parse_config(tomllib.loads(text), where="bundled simulated.toml")
    data, images = write_demo_dataset(run / "demo-data")
    (err if as_json else console).print(
        "[yellow]SIMULATED models[/] on a synthetic dataset (no model is called)")
    summary = _guarded(_start, run, cfg, data, images, None, as_json, 30.0)
    _closing(summary, as_json, title="demo summary (simulated models)")
    if not as_json:
        console.print(f"next: [bold]mics export {escape(str(run))} --out "
                      f"{escape(str(run / 'export'))}[/]")


def _usage_error(e: Exception) -> int:
    """A bad option or argument (click's exceptions, as typer vendors them): one line, exit 2."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
        console.print(ctx.get_help(), markup=False)
        return 0
    hint = f" (see `{ctx.command_path} -h`)" if ctx is not None else ""
    err.print(f"[bold red]error:[/] {escape(e.format_message() + hint)}",  # type: ignore[attr-defined]
              soft_wrap=True)
    return e.exit_code  # type: ignore[attr-defined]


def main() -> None:
    """Console-script entry point: errors are one line (exit 2 for bad options), no traceback
    ever reaches a user."""
    try:
        code = app(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted; resume with `mics resume RUN_DIR`", markup=False)
        code = 130
    except Exception as e:  # noqa: BLE001 - the last net: one line, never a traceback
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            code = _usage_error(e)
        else:
            err.print(f"[bold red]error:[/] {escape(f'{type(e).__name__}: {e}')} (an internal "
                      "error; please report it with the command you ran)", soft_wrap=True)
            code = 1
    sys.exit(code if isinstance(code, int) else 0)


register(app)
register_bench(app)

if __name__ == "__main__":
    main()
