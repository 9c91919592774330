"""`mics inspect` and `mics viz`: what a search did, as rich tables, trees, JSON, HTML or DOT."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from cli.ui import cell, console, escape, fail

if TYPE_CHECKING:
    from store import RunStore

DASH = "—"

RunDir = Annotated[Path, typer.Argument(help="Run directory (holds the LMDB store).")]
Qid = Annotated[str | None, typer.Argument(
    help="Question id: the record's id (`rid` in Chiron records, `id` in generic ones; a bad "
         "record's, as `q7@line7`, also works).")]


def _fail(message: str) -> None:
    fail(message, 2)


def _open(run: Path) -> RunStore:
    from store import RunStore, StoreError

    try:
        return RunStore.open(run, write=False)
    except StoreError as e:
        _fail(str(e))
        raise  # unreachable


def resolve_qid(store: RunStore, qid: str) -> str:
    """The stored id of a question: the record's id itself, or the one bad record stored for
    that id (`q7@line7`); KeyError naming the candidates when there is none or several."""
    if store.get_question(qid) is not None:
        return qid
    lines = [q for q, _status, _reason in store.question_statuses()
             if q.startswith(f"{qid}@line") and q[len(qid) + 5:].isdigit()]
    if len(lines) == 1:
        return lines[0]
    raise KeyError(f"id {qid!r} is on several bad records: {', '.join(lines)}; name one"
                   if lines else f"no question {qid!r}")


def _num(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def _usd(x: float | None) -> str:
    return DASH if x is None else f"${x:.4f}"


_NUMERIC = re.compile(r"^[-\d$—.,%() /]*$")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """Numbers right-aligned; short text columns kept whole, long ones folded."""
    table = Table(title=escape(title), title_justify="left")
    cells = [[cell(c) for c in row] for row in rows]
    for i, col in enumerate(columns):
        values = [row[i].plain for row in cells]
        numeric = i > 0 and bool(values) and all(_NUMERIC.match(v) for v in values)
        widest = max([len(v) for v in values] + [len(col)])
        table.add_column(col, justify="right" if numeric else "left", overflow="fold",
                         min_width=widest if widest <= 14 else None)
    for row in cells:
        table.add_row(*row)
    return table


def _dataset_records(store: Any) -> int | None:
    """Records the run reads (after its --limit), as `mics status` counts them; None when the
    store records no dataset (one written by the engine alone) or the file is not where the
    run recorded it."""
    from mics.run import dataset_total

    dataset = store.get_meta("dataset")
    return dataset_total(dataset) if isinstance(dataset, dict) else None


def _summary_tables(s: dict[str, Any], max_trees: int) -> list[Table]:
    t = s["totals"]
    overview = _table("run", ["", "value"], [
        ["run directory", s["run"]],
        ["questions stored / in the dataset",
         f"{t['questions']} / {_num(t.get('dataset_records'), 0)}"],
        ["succeeded: full score (accepted) / max depth",
         f"{t['succeeded']}: {t['accepted']} / {t['max_depth']}"], ["failed", t["failed"]],
        ["not finished", t["pending"]], ["tree nodes", t["node_count"]],
        ["model calls (failed)", f"{t['calls']} ({t['failed_calls']})"],
        ["tokens in / cached / out",
         f"{t['prompt_tokens']} / {t['cached_tokens']} / {t['completion_tokens']}"],
        ["cost", _usd(t["cost"])], ["cost per accepted example", _usd(t["cost_per_accepted"])],
        ["calls per accepted example", _num(t["calls_per_accepted"], 1)],
        ["tokens per accepted example", _num(t["tokens_per_accepted"], 0)],
    ])
    depths = sorted({d for row in s["stops"] for d in row["by_depth"]}, key=int)
    stops = _table("questions by stop reason and final depth",
                   ["stop reason", *(f"depth {d}" for d in depths), "total"],
                   [[r["stop_kind"], *(r["by_depth"].get(d, 0) for d in depths), r["total"]]
                    for r in s["stops"]])
    scores = _table("MICS-Score by depth", ["depth", "candidates", "mean score", "chosen",
                                            "mean chosen score"],
                    [[r["depth"], r["candidates"], _num(r["mean_score"]), r["chosen"],
                      _num(r["mean_chosen_score"])] for r in s["score_by_depth"]])
    wins = _table("mentor win rate per depth", ["depth", "mentor", "proposed", "won",
                                                "win rate", "mean score"],
                  [[r["depth"], r["mentor"], r["proposed"], r["won"], _pct(r["win_rate"]),
                    _num(r["mean_score"])] for r in s["mentor_wins"]])
    leaks = _table("answer leaks per mentor (steps that state the correct answer)",
                   ["mentor", "steps", "leaking", "leak rate"],
                   [[r["mentor"], r["steps"], r["leaking"], _pct(r["leak_rate"])]
                    for r in s.get("answer_leaks", [])])
    acc = _table("intern accuracy per temperature", ["intern", "temp", "samples",
                                                     "correct", "accuracy", "no answer",
                                                     "failed"],
                 [[r["intern"], r["temperature"], r["samples"], r["correct"], _pct(r["accuracy"]),
                   r["no_answer"], r["failed"]] for r in s["intern_accuracy"]])
    agree = _table("agreement between interns (same candidate, same temperature)",
                   ["intern A", "intern B", "pairs", "same verdict", "same answer", "kappa"],
                   [[r["a"], r["b"], r["pairs"], _pct(r["verdict_agreement"]),
                     _pct(r["answer_agreement"]), _num(r["kappa"])]
                    for r in s["intern_agreement"]])
    usage_cols = ["calls", "failed", "tok in", "cached", "tok out", "cost"]

    def usage(r: dict[str, Any]) -> list[Any]:
        return [r["calls"], r["failed_calls"], r["prompt_tokens"], r["cached_tokens"],
                r["completion_tokens"], _usd(r["cost"])]

    roles = _table("calls, tokens and cost per role", ["role", *usage_cols],
                   [[r["role"], *usage(r)] for r in s["usage_by_role"]])
    models = _table("calls, tokens and cost per model", ["role", "model", *usage_cols],
                    [[r["role"], r["model"], *usage(r)] for r in s["usage_by_model"]])
    tables = [overview, stops, scores, wins, leaks, acc, agree, roles, models]
    if s["failed_questions"]:
        tables.append(_table("failed questions", ["question", "stop", "depth", "error"],
                             [[r["qid"], r["stop_reason"], r["depth"], r["error"]]
                              for r in s["failed_questions"]]))
    trees = s["trees"][:max_trees]
    title = "trees" + (f" (first {len(trees)} of {len(s['trees'])}; --max-trees or --json for "
                       "all)" if len(trees) < len(s["trees"]) else "")
    tables.append(_table(title, ["question", "nodes", "depth", "stop", "chosen path", "scores"],
                         [[r["qid"], r["node_count"], r["depth"], r["stop"],
                           " → ".join(r["path_mentors"]) or DASH,
                           ", ".join(f"{x:.2f}" for x in r["score_trajectory"]) or DASH]
                          for r in trees]))
    return tables


def _tree_view(data: dict[str, Any], full_steps: bool) -> Tree:
    """A rich Tree of one question: score, mentor, chosen path in bold green, samples."""
    head = Text.assemble((data["qid"], "bold"), f"  {data['stop']}  ({data['node_count']} nodes)")
    tree = Tree(head)
    tree.add(Text.assemble(("question: ", "bold"), data["question"]))
    tree.add(Text.assemble(("ground truth: ", "bold"), data["gt_answer"]))
    for m in data.get("mentor_errors", []):
        tree.add(Text.assemble((f"mentor error (depth {m['depth']}) ", "bold red"),
                               (f"{m['mentor']}: ", "bold"), m["error"]))
    by_id = {n["id"]: n for n in data["nodes"]}
    kids: dict[str, list[str]] = {n["id"]: [] for n in data["nodes"]}
    has_parent = set()
    for e in data["edges"]:
        kids[e["source"]].append(e["target"])
        has_parent.add(e["target"])

    def label(n: dict[str, Any]) -> Text:
        style = "bold green" if n["on_path"] else ""
        if n["root"]:
            return Text(f"root (attempt {n['attempt']})", style=style)
        text = Text(f"d{n['depth']} {n['mentor']}  score {n['score']:.2f} "
                    f"({n['correct']}/{n['total']})", style=style)
        if n["chosen"]:
            text.append("  ★ chosen", style="bold green")
        if n["reused"]:
            text.append("  (reused step)", style="dim")
        if n.get("leaks_answer"):
            text.append("  ⚠ states the answer", style="bold yellow")
        return text

    def add(parent: Tree, nid: str) -> None:
        n = by_id[nid]
        branch = parent.add(label(n), guide_style="bold green" if n["on_path"] else "dim")
        if not n["root"]:
            step = n["step"] if full_steps else n["step"].splitlines()[0][:120]
            branch.add(Text(step, style="italic"))
            for s in n["samples"]:
                ok = s["correct"]
                answer = DASH if s["answer"] is None else s["answer"]
                if not full_steps and len(answer) > 80:
                    answer = answer[:79] + "…"
                branch.add(Text.assemble((f"{'✓' if ok else '✗'} {s['verdict']:<3} ",
                                          "green" if ok else "red"),
                                         (f"{s['intern']} @{s['temperature']:g}  ", "dim"),
                                         answer))
        for k in kids[nid]:
            add(branch, k)

    for n in data["nodes"]:
        if n["id"] not in has_parent:
            add(tree, n["id"])
    return tree


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def inspect(
    run: RunDir,
    qid: Qid = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    prices: Annotated[Path | None, typer.Option(
        help="Price table (TOML): \\[\"model\"] input_per_mtok, output_per_mtok, "
             "cached_input_per_mtok (USD per million tokens).")] = None,
    steps: Annotated[bool, typer.Option("--steps", help="Show full step texts in a tree.")]
    = False,
    max_trees: Annotated[int, typer.Option(help="Rows of the per-question table.")] = 50,
) -> None:
    """Summarise a run (tables), or show one question's search tree.

    Costs need --prices FILE: one TOML table per model (its configured name or its model id)
    in USD per million tokens, e.g. \\["gpt-4o"] input_per_mtok = 2.5, output_per_mtok = 10,
    cached_input_per_mtok = 1.25 (optional; defaults to the input price). The tables may also
    sit under a "prices" table. A model without a price shows its cost as "—".
    """
    from mics.analysis import load_prices, load_tree, run_summary, tree_json
    from store import StoreError

    table: dict[str, dict[str, float]] = {}
    if prices is not None:
        try:
            table = load_prices(prices)
        except ValueError as e:
            _fail(str(e))
    with _open(run) as store:
        try:
            if qid is None:
                summary = run_summary(store, table)
                summary["totals"]["dataset_records"] = _dataset_records(store)
            else:
                data = tree_json(load_tree(store, resolve_qid(store, qid)))
        except KeyError as e:
            _fail(f"{e.args[0]} in {run}")
        except StoreError as e:
            _fail(str(e))
    if qid is None:
        if as_json:
            _print_json(summary)
        else:
            for t in _summary_tables(summary, max_trees):
                console.print(t)
    elif as_json:
        _print_json(data)
    else:
        console.print(_tree_view(data, steps))


def viz(
    run: RunDir,
    qid: Qid = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output file; a directory with --all.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="html or dot.")] = "html",
    all_questions: Annotated[bool, typer.Option(
        "--all", help="One page per question plus index.html.")] = False,
) -> None:
    """Draw a question's tree as one offline HTML page (or Graphviz DOT)."""
    from mics.analysis import load_tree, load_trees
    from mics.viz import page_name, to_dot, tree_html, write_all
    from store import StoreError

    if fmt not in ("html", "dot"):
        _fail(f"--format must be html or dot, not {fmt!r}")
    if (qid is None) == (not all_questions):
        _fail("give a question id, or --all for every question")
    if out is not None and out.exists() and (out.is_dir() != all_questions):
        _fail(f"--out {out} is a file; --all writes a directory of pages" if all_questions
              else f"--out {out} is a directory; give a file name for one page")
    with _open(run) as store:
        try:
            if all_questions:
                trees = load_trees(store)
            else:
                trees = [load_tree(store, resolve_qid(store, qid))]  # type: ignore[arg-type]
        except KeyError as e:
            _fail(f"{e.args[0]} in {run}")
        except StoreError as e:
            _fail(str(e))
    if all_questions:
        out_dir = out or run / "viz"
        written = write_all(trees, out_dir, str(run), fmt)
        console.print(f"wrote {len(written)} files to {escape(str(out_dir))}")
        return
    g = trees[0]
    name = page_name(g.graph["qid"])
    path = out or Path(name if fmt == "html" else name[: -len(".html")] + ".dot")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_dot(g) if fmt == "dot" else tree_html(g), encoding="utf-8")
    console.print(f"wrote {escape(str(path))} ({g.number_of_nodes()} nodes)")


def register(app: typer.Typer) -> None:
    """Add the `inspect` and `viz` commands to the mics app."""
    app.command("inspect")(inspect)
    app.command("viz")(viz)
