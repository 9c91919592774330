"""`mics bench ...`: loop, overhead, resume, prefix, images and parts benchmarks, each one
command, one run.

Every command prints a rich table and, with `--json FILE`, writes the figures with the machine
(cores, RAM, Python, package versions) and the exact command (see bench/common.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table


def _common():  # noqa: ANN202 - bench.common pulls in httpx; `mics --help` should not wait
    import bench.common

    return bench.common


def fmt(x: Any) -> str:
    return _common().fmt(x)


def print_machine(console: Console, machine: dict[str, Any]) -> None:
    _common().print_machine(console, machine)


def report(section: str, figures: dict[str, Any]) -> dict[str, Any]:
    return _common().report(section, figures)


def table(title: str, rows: Any) -> Table:
    return _common().table(title, rows)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    _common().write_json(path, payload)

bench_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Benchmarks: engine vs reference order, overhead, resume, "
                             "prefix, images, our own CPU per call (parts).")
console = Console()

JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")]
WorkDir = Annotated[Path | None, typer.Option(
    "--work-dir", help="Keep the runs here (default: a temporary directory, removed after).")]


def _latency(text: str, option: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{option}: expected SECONDS or LOW,HIGH, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 0 or parts[0] > parts[1]:
        raise typer.BadParameter(f"{option}: expected SECONDS or LOW,HIGH with 0 <= LOW <= HIGH")
    return parts[0], parts[1]


def _finish(section: str, figures: dict[str, Any], json_out: Path | None) -> dict[str, Any]:
    payload = report(section, figures)
    print_machine(console, payload["machine"])
    if json_out is not None:
        write_json(json_out, payload)
        console.print(f"wrote {json_out}")
    return payload


@bench_app.command("loop")
def loop(
    questions: Annotated[int, typer.Option(min=1, help="Questions the engine searches.")] = 200,
    cap: Annotated[int, typer.Option(min=1, help="Concurrent requests per endpoint.")] = 16,
    reference_questions: Annotated[int, typer.Option(
        min=1, help="Questions the sequential reference order runs (evenly spaced).")] = 3,
    concurrency: Annotated[int, typer.Option(
        min=0, help="Questions the engine searches at once (0: all).")] = 0,
    mentor_latency: Annotated[str | None, typer.Option(
        help="Seconds per mentor call: S or LO,HI (default: the preset's).")] = None,
    intern_latency: Annotated[str | None, typer.Option(
        help="Seconds per intern batch (default: the preset's).")] = None,
    judge_latency: Annotated[str | None, typer.Option(
        help="Seconds per judge call (default: the preset's).")] = None,
    preset: Annotated[str, typer.Option(
        help="Latencies: default (mentor 1-2 s, intern 0.25-0.5 s, judge 0.1-0.2 s) or fast "
             "(10x shorter).")] = "default",
    sharded_questions: Annotated[int, typer.Option(
        min=0, help="Questions the reference sharded CAP ways runs (0: 2 x cap).")] = 0,
    interns: Annotated[str, typer.Option(
        help="Intern backend: sglang (one /generate per batch) or openai.")] = "sglang",
    seed: int = 0,
    json_out: JsonOut = None,
    work_dir: WorkDir = None,
) -> None:
    """Same workload in Chiron-o1's sequential order and by the engine: speedup and efficiency."""
    from bench.loop import PRESETS, LoopSettings, run_loop

    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset: one of {', '.join(PRESETS)}, got {preset!r}")
    mentor0, intern0, judge0 = PRESETS[preset]
    settings = LoopSettings(
        questions=questions, cap=cap, reference_questions=reference_questions,
        sharded_questions=sharded_questions, concurrency=concurrency, seed=seed,
        interns=interns,
        mentor_latency=(_latency(mentor_latency, "--mentor-latency") if mentor_latency
                        else mentor0),
        intern_latency=(_latency(intern_latency, "--intern-latency") if intern_latency
                        else intern0),
        judge_latency=_latency(judge_latency, "--judge-latency") if judge_latency else judge0)
    r = run_loop(settings, work_dir, progress=lambda m: console.print(f"[dim]{m}[/]"))
    console.print(table("mics bench loop", [
        ("speedup (engine / reference q/h)", r["speedup"], "acceptance: >= 50 at 200 q, cap 16"),
        ("efficiency (bound / engine time)", r["efficiency"], "acceptance: >= 0.9"),
        ("speedup vs the reference sharded CAP ways", r["speedup_vs_sharded"],
         f"{r['reference_sharded_qph']} q/h measured on {r['reference_sharded_questions']} "
         f"questions, {r['reference_sharded_shards']} at a time"),
        ("exports identical", r["exports_identical"] and r["reference_sharded_exports_identical"],
         f"on the {r['reference_questions']} (sharded: {r['reference_sharded_questions']}) "
         "questions both ran"),
        ("engine questions/hour", r["engine_qph"], f"{r['questions']} questions"),
        ("reference questions/hour", r["reference_qph"],
         f"{r['reference_questions']} questions run one call at a time"),
        ("engine time (s)", r["engine_s"], f"{r['engine_calls']} HTTP calls"),
        ("schedule bound (s)", r["bound_s"], f"set by {r['bound_by']}"),
        ("slowest critical path (s)", r["critical_path_max_s"],
         f"mean {fmt(r['critical_path_mean_s'])} s"),
        ("reference time (s)", r["reference_s"],
         f"{r['reference_calls']} calls, {fmt(r['reference_latency_sum_s'])} s of latency"),
        ("reference q/h, full-run estimate", r["reference_qph_full_estimate"],
         "all questions' work, modelled from the engine's trees"),
        ("engine CPU per HTTP request (ms)", r["engine_cpu_ms_per_request"],
         f"engine {fmt(r['engine_cpu_s'])} s, server {fmt(r['server_cpu_s'])} s of CPU; "
         f"client {r.get('http_client', 'aiohttp')}"),
        (f"{r['bottleneck']} in flight, by tenth of the run",
         " ".join(fmt(x) for x in r["bottleneck_in_flight_by_tenth"]),
         f"busiest endpoint; cap {r['settings']['cap']}"),
    ]))
    loads = Table(title="endpoint load (engine run)", header_style="bold")
    for col in ("endpoint", "calls", "latency sum (s)", "cap", "sum / cap (s)"):
        loads.add_column(col, justify="left" if col == "endpoint" else "right")
    for name, v in r["endpoints"].items():
        loads.add_row(name, fmt(v["calls"]), fmt(v["latency_s"]), fmt(v["cap"]),
                      fmt(v["load_s"]))
    console.print(loads)
    _finish("loop", r, json_out)
    if not (r["exports_identical"] and r["reference_sharded_exports_identical"]):
        console.print("[bold red]the two orders exported different results[/]")
        raise typer.Exit(1)


@bench_app.command("overhead")
def overhead(
    questions: Annotated[int, typer.Option(min=1, help="Questions streamed through.")] = 10_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Questions at once.")] = 8,
    seed: int = 0,
    json_out: JsonOut = None,
    work_dir: WorkDir = None,
) -> None:
    """Zero-latency models, full persistence: calls/s, commits/s, peak RSS (child process)."""
    from bench.overhead import run_overhead

    with console.status(f"searching {questions:,} questions with zero-latency models"):
        r = run_overhead(questions, concurrency, seed, work_dir)
    rss = r["rss_samples"]
    console.print(table("mics bench overhead", [
        ("model calls per second", r["calls_per_s"], "acceptance: >= 2,000 with persistence"),
        ("model calls per CPU second", r["calls_per_cpu_s"],
         f"{fmt(r['cpu_s'])} s of CPU: independent of other load"),
        ("store commits per second", r["commits_per_s"], f"{r['commits']:,} commits"),
        ("peak RSS (MB)", r["peak_rss_mb"], "acceptance: < 400 at 10,000 questions"),
        ("peak RSS before the closing summary (MB)", r["peak_rss_search_mb"],
         "before search_run's closing summary"),
        ("heap (RssAnon) first -> last sample (MB)",
         f"{fmt(rss[0]['anon_mb'])} -> {fmt(rss[-1]['anon_mb'])}" if rss else None,
         f"{len(rss)} samples as questions finish"),
        ("questions", r["questions"], f"{r['succeeded']:,} succeeded, {r['failed']:,} failed"),
        ("model calls", r["model_calls"], f"{r['joined']:,} joined in flight"),
        ("seconds", r["seconds"], f"concurrency {r['concurrency']}"),
        ("store size (MB)", r["store_bytes"] / 2**20, ""),
    ]))
    _finish("overhead", r, json_out)


@bench_app.command("resume")
def resume(
    nodes: Annotated[int, typer.Option(min=1, help="Stored tree nodes, at least.")] = 10_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Questions at once.")] = 8,
    seed: int = 0,
    finished: Annotated[int, typer.Option(
        min=0, help="Instead: time a resume from start to its first new call and to done on "
        "runs with N/10 and N finished records, with and without images (e.g. 100000).")] = 0,
    fresh: Annotated[int, typer.Option(
        min=1, help="With --finished: questions left to search.")] = 8,
    image_side: Annotated[int, typer.Option(
        min=8, help="With --finished: side of the square PNG each record has (images runs).")
    ] = 384,
    json_out: JsonOut = None,
    work_dir: WorkDir = None,
) -> None:
    """Time to open an interrupted run of >= NODES nodes and resume it (fresh process), or
    with --finished N the time from start to the first new call and to done on runs with
    N/10 and N finished records, with and without images."""
    if finished:
        _resume_finished(finished, fresh, image_side, seed, json_out, work_dir)
        return
    from bench.resume import run_resume

    with console.status(f"building an interrupted run of >= {nodes:,} nodes"):
        r = run_resume(nodes, concurrency, seed, work_dir)
    console.print(table("mics bench resume", [
        ("open + resume (s)", r["open_resume_s"], "acceptance: < 1 s at 10,000 nodes"),
        ("open store + load run (s)", r["open_s"], ""),
        ("whole resume process (s)", r["process_s"], "interpreter start and imports included"),
        ("nodes", r["nodes"], f"{r['questions']:,} questions, {fmt(r['store_mb'])} MB store"),
        ("questions interrupted", r["interrupted_questions"], "left mid-search by SIGINT"),
        ("calls sent / memo hits on resume",
         f"{r['calls_sent_on_resume']:,} / {r['memo_hits_on_resume']:,}", ""),
        ("unfinished after resume", r["pending_after_resume"], ""),
    ]))
    _finish("resume", r, json_out)


def _resume_finished(finished: int, fresh: int, image_side: int, seed: int,
                     json_out: Path | None, work_dir: Path | None) -> None:
    from bench.resume import run_finished

    with console.status(f"building runs with up to {finished:,} finished records"):
        r = run_finished(finished, fresh, seed=seed, work_dir=work_dir, image_side=image_side)
    t = Table(title=f"mics bench resume --finished {finished}: a fresh resume process, "
              f"{fresh} questions left", show_header=True, header_style="bold")
    for name in ("finished", "images", "first new call (s)", "done (s)",
                 "first call / done after search_run began (s)", "last call to done (s)",
                 "store / dataset (MB)", "exports of the new ones identical"):
        t.add_column(name, justify="left" if name == "images" else "right")
    for row in r["runs"]:
        t.add_row(fmt(row["finished"]), f"{row['image_side']}px PNG" if row["images"] else "no",
                  fmt(row["first_call_s"]), fmt(row["done_s"]),
                  f"{fmt(row['first_call_after_search_run_s'])} / "
                  f"{fmt(row['done_after_search_run_s'])}",
                  fmt(row["last_call_to_done_s"]),
                  f"{fmt(row['store_mb'])} / {fmt(row['dataset_mb'])}",
                  fmt(row["fresh_exports_identical"] and row["calls_for_finished"] == 0))
    console.print(t)
    console.print("[dim]Times from the moment the resume process is started (interpreter "
                  "start-up and imports included); done: every question searched and the closing "
                  "summary counted. Exports: the new questions' rows equal those of a run that "
                  "searched only them, and no finished question was called.[/]")
    _finish("resume-finished", r, json_out)


@bench_app.command("prefix")
def prefix(
    models: Annotated[str, typer.Option(help="Comma-separated bench.models names.")] = "",
    questions: int = 8,
    depths: int = 3,
    candidates: int = 3,
    temperatures: str = "1.2,0.2",
    new_tokens: int = 16,
    sglang_url: Annotated[str | None, typer.Option(help="Also run against this SGLang.")] = None,
    vlm: Annotated[bool, typer.Option("--vlm/--no-vlm", help="Add the tiny VL model.")] = True,
    seed: int = 0,
    json_out: JsonOut = None,
) -> None:
    """Prefix KV reuse off vs on, on a MICS-shaped intern workload (bench/prefix.py)."""
    try:
        from bench.prefix import run_prefix_bench
    except ImportError as e:
        console.print(f"[red]bench/prefix.py is not available: {e}[/]")
        raise typer.Exit(2) from None
    from bench.common import command_line

    wanted: dict[str, Any] = {
        "questions": questions, "depths": depths, "candidates": candidates,
        "temperatures": tuple(float(t) for t in temperatures.split(",") if t),
        "new_tokens": new_tokens, "sglang_url": sglang_url, "vlm": vlm, "seed": seed,
        "command": command_line(),
    }
    if models:
        wanted["models"] = [m for m in models.split(",") if m]
    accepted = inspect.signature(run_prefix_bench).parameters
    out = run_prefix_bench(**{k: v for k, v in wanted.items() if k in accepted})
    results = out.get("results", []) if isinstance(out, dict) else []
    t = Table(title="mics bench prefix", header_style="bold")
    keys = ["prefill_token_ratio", "prefill_vs_dedup_only", "prefill_vs_unique_bound",
            "wall_speedup", "greedy_equal"]
    t.add_column("model")
    for k in keys:
        t.add_column(k, justify="right")
    for res in results:
        t.add_row(str(res.get("model", res.get("name", "?"))), *(fmt(res.get(k)) for k in keys))
    console.print(t)
    # its own machine facts (torch, threads) stay in the section, next to the figures
    figures = ({k: v for k, v in out.items() if k != "command"} if isinstance(out, dict)
               else {"results": out})
    _finish("prefix", figures, json_out)


@bench_app.command("images")
def images(
    count: Annotated[int, typer.Option("--images", min=1, help="Distinct images.")] = 2000,
    concurrency: Annotated[int, typer.Option(min=1, help="Calls at once.")] = 64,
    passes: Annotated[int, typer.Option(min=1, help="Calls per image (one per pass).")] = 2,
    max_side: Annotated[int, typer.Option(help="Downscale limit, as image_max_side.")] = 512,
    seed: int = 0,
    json_out: JsonOut = None,
    work_dir: WorkDir = None,
) -> None:
    """Many distinct images at once: each encoded once per run (bench/images.py)."""
    from bench.images import run_images

    with console.status(f"{count:,} images x {passes} calls, {concurrency} at once"):
        r = run_images(count, concurrency, passes, max_side=max_side, seed=seed,
                       work_dir=work_dir)
    console.print(table("mics bench images", [
        ("encodes", r["encodes"], f"acceptance: = distinct images ({r['distinct_images']:,})"),
        ("image cache hits: disk / memory", f"{r['disk_hits']:,} / {r['memory_hits']:,}",
         f"memory {fmt(r['memory_mb'])} MB of {fmt(r['memory_budget_mb'])} MB"),
        ("requests", r["requests"], f"{r['failed']} failed; {fmt(r['seconds'])} s"),
        ("client CPU per request (ms)", r["cpu_ms_per_request"], "image cache and HTTP"),
        ("encodes on a second run, same run dir", r["resume_encodes"],
         f"{r['resume_disk_hits']:,} read back from disk"),
    ]))
    _finish("images", r, json_out)
    if not r["encodes_equal_distinct"] or r["resume_encodes"]:
        raise typer.Exit(1)


@bench_app.command("parts")
def parts(
    replies: Annotated[int, typer.Option(min=1, help="Replies stored per path.")] = 4000,
    puts_per_turn: Annotated[float | None, typer.Option(
        min=1.0, help="Gate calls whose replies arrive in one event-loop turn (default: 1.77, "
        "as measured on the loop workload, --preset fast --cap 16).")] = None,
    calls: Annotated[int, typer.Option(min=1, help="Calls per task through the gate.")] = 500,
    tasks: Annotated[str, typer.Option(help="Concurrent tasks through the gate, e.g. 16,64.")
                     ] = "16,64",
    cap: Annotated[int, typer.Option(min=1, help="The endpoint's max_concurrency.")] = 16,
    prompts: Annotated[int, typer.Option(min=1, help="Intern prompts rendered per family.")
                       ] = 1000,
    repeats: Annotated[int, typer.Option(min=1, help="Best of this many, interleaved.")] = 3,
    seed: int = 0,
    json_out: JsonOut = None,
    work_dir: WorkDir = None,
) -> None:
    """Our own CPU per call, before and after issue 15: storing replies, gate primitives and
    prompt rendering, old and new side by side in one run (bench/parts.py)."""
    from dataclasses import replace

    from bench.parts import PartsSettings, run_parts

    try:
        counts = tuple(int(t) for t in tasks.split(",") if t.strip())
    except ValueError:
        raise typer.BadParameter(f"--tasks: comma-separated numbers, got {tasks!r}") from None
    if not counts or min(counts) < 1:
        raise typer.BadParameter(f"--tasks: comma-separated numbers >= 1, got {tasks!r}")
    settings = PartsSettings(replies=replies, calls=calls, tasks=counts, cap=cap,
                             prompts=prompts, repeats=repeats, seed=seed)
    if puts_per_turn is not None:
        settings = replace(settings, puts_per_turn=puts_per_turn)
    r = run_parts(settings, work_dir, progress=lambda m: console.print(f"[dim]{m}[/]"))
    st, issue = r["storing"], r["issue_ms"]
    t = Table(title="mics bench parts: our own CPU per call (ms), old and new in one run",
              header_style="bold")
    for col in ("item", "old", "new", "new / old", "issue 15 (old)", "note"):
        t.add_column(col, justify="left" if col in ("item", "note") else "right")

    def row(item: str, fig: dict[str, Any], issue_ms: float | None, note: str) -> None:
        t.add_row(item, fmt(fig["old_ms"]), fmt(fig["new_ms"]), fmt(fig["ratio"]),
                  fmt(issue_ms), note)

    row("storing a reply", st["measured"], issue["storing"],
        f"{fmt(st['puts_per_turn'])} calls' replies per turn; commits per reply "
        f"{fmt(st['measured']['old_commits_per_reply'])} -> "
        f"{fmt(st['measured']['new_commits_per_reply'])}")
    row("  one reply per turn (worst case)", st["one_per_turn"], None,
        f"commits per reply {fmt(st['one_per_turn']['new_commits_per_reply'])}")
    for n, g in r["gate"].items():
        row(f"gate primitives, {n} tasks", g, issue["gate"] if n == str(counts[0]) else None,
            f"cap {g['cap']}; the call alone {fmt(g['call_ms'])} ms, subtracted")
    for family, g in r["render"].items():
        row(f"rendering a prompt, {family}", g, None,
            f"{g['prompts']:,} prompts, {g['images']:,} images; strings equal")
    text = r["render"]["text"]
    t.add_row("  text, old = transformers", fmt(text["transformers_ms"]), fmt(text["new_ms"]),
              fmt(text["ratio_vs_transformers"]), fmt(issue["render"]),
              "apply_chat_template, the renderer before issue 15")
    for n, tot in r["total"].items():
        row(f"total, gate at {n} tasks", tot, issue["total"],
            f"goal: new <= old / 2 ({fmt(tot['halved'])}); issue's goal "
            f"{fmt(r['goal_ms'])} ms ({fmt(tot['within_issue_goal'])})")
        t.add_row("  old renderer = transformers", fmt(tot["old_transformers_ms"]),
                  fmt(tot["new_ms"]), fmt(tot["ratio_vs_transformers"]), "", "")
    console.print(t)
    console.print(f"[dim]stores identical (memo and call log, old and new): "
                  f"{fmt(st['stores_identical'])}; harness {fmt(st['harness_ms_per_reply'])} ms "
                  "per reply subtracted; issue 15's figures were measured before the change, "
                  "on its own machine and code[/]")
    _finish("parts", r, json_out)
    if not st["stores_identical"]:
        console.print("[bold red]the old and new paths stored different memos or call logs[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to the mics app."""
    app.add_typer(bench_app, name="bench")
