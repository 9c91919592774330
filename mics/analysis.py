"""What a search did, read from the store: one networkx tree per question and run-level tables.

Depths here are 1-based levels: the root is level 0 and the first candidate steps are level 1,
so a tree's deepest level equals the question's ``final_depth`` (the store keeps 0-based
``depth`` with -1 for the root). Costs come from an optional price table (``load_prices``);
a model without a price gives a cost of None, shown as "—".
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import networkx as nx

from mics.config import read_toml
from mics.records import RunStore, StoredQuestion, read_nodes, read_question, read_questions
from mics.steps import normalize_answer
from mics.types import Node, Outcome

__all__ = [
    "PRICE_KEYS", "ROLES", "chosen_path", "load_prices", "load_tree", "load_trees",
    "question_graph", "run_summary", "stop_kind", "stop_label", "tree_json", "tree_summary",
]

ROLES = ("mentor", "intern", "judge")
PRICE_KEYS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok")
STOP_KINDS = ("full_score", "max_depth", "all_zero", "error", "pending")
_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens")


# ---------------------------------------------------------------- one question


def stop_kind(sq: StoredQuestion) -> str:
    """full_score | max_depth | all_zero | error (no mentor, bad record) | pending."""
    if not sq.finished:
        return "pending"
    reason = sq.stop_reason or ""
    return reason if reason in ("full_score", "max_depth", "all_zero") else "error"


def stop_label(sq: StoredQuestion) -> str:
    """A short human-readable stop reason, e.g. ``full score at depth 2``."""
    kind = stop_kind(sq)
    o = sq.outcome
    depth = o.final_depth if o is not None else None
    error = o.error if o is not None else ""
    if kind == "full_score":
        return f"full score at depth {depth}"
    if kind == "max_depth":
        return f"max depth ({depth}) without a full score"
    if kind == "all_zero":
        return f"all zero at depth {depth}"
    if kind == "error":  # named by its stop reason, the word `mics status` uses too
        return f"{sq.stop_reason or 'error'}: {error}".rstrip(": ")
    if sq.status == "deferred":  # a call failed; `mics resume` decides it
        return f"deferred: {error}".rstrip(": ")
    return "not finished"


def chosen_path(nodes: Sequence[Node]) -> list[Node]:
    """Root, then the chosen node of each depth, of the question's last attempt."""
    if not nodes:
        return []
    last = max(n.attempt for n in nodes)
    path = [n for n in nodes if n.attempt == last and n.chosen]
    return sorted(path, key=lambda n: n.depth)


def _sum_usage(items: Iterable[dict[str, Any] | None]) -> dict[str, int]:
    out = dict.fromkeys(_TOKENS, 0)
    for u in items:
        for k in _TOKENS:
            out[k] += int((u or {}).get(k, 0) or 0)
    return out


_SAMPLE_KEYS = ("intern", "temperature", "answer", "correct", "verdict", "raw")


def question_graph(qid: str, sq: StoredQuestion | None, nodes: Sequence[Node]) -> nx.DiGraph:
    """A question's search tree as a DiGraph; node keys are the stored node ids."""
    o = sq.outcome if sq is not None else None
    q = sq.question if sq is not None else None
    on_path = {n.node_id for n in chosen_path(nodes)}
    g = nx.DiGraph(
        qid=qid, status=sq.status if sq is not None else "unknown",
        stop_reason=(sq.stop_reason if sq is not None else None) or "",
        stop_kind=stop_kind(sq) if sq is not None else "pending",
        stop_label=stop_label(sq) if sq is not None else "not finished",
        final_depth=o.final_depth if o is not None else None,
        question=q.question if q is not None else "",
        gt_answer=q.gt_answer if q is not None else "",
        images=list(q.image_paths) if q is not None else [],
        error=o.error if o is not None else "",
        generated_by=list(o.generated_by) if o is not None else [],
        details=dict(o.details) if o is not None else {},
        mentor_errors=mentor_errors(o),
    )
    for n in nodes:
        samples = [{k: getattr(s, k) for k in _SAMPLE_KEYS} for s in n.samples]
        usage = {"mentor": _sum_usage([n.usage.get("mentor")]),
                 "interns": _sum_usage(s.usage.get("intern") for s in n.samples)}
        g.add_node(n.node_id, depth=n.depth + 1, attempt=n.attempt, mentor=n.mentor,
                   step=n.step, score=n.score, correct=n.correct, total=n.total,
                   chosen=n.chosen, on_path=n.node_id in on_path, reused=n.reused,
                   root=n.depth < 0, samples=samples, usage=usage, leaks_answer=n.leaks_answer)
    for n in nodes:
        if n.parent_id and n.parent_id in g:
            g.add_edge(n.parent_id, n.node_id, on_path=n.node_id in on_path
                       and n.parent_id in on_path)
    return g


def mentor_errors(outcome: Outcome | None) -> list[dict[str, str]]:
    """Why mentors had no candidate (call failed, malformed, leaked under `reject`), by depth;
    for a deferred question, every call that still failed."""
    details = outcome.details if outcome is not None else {}
    rows = [{"depth": str(d), "mentor": m, "error": e}
            for d, by_mentor in (details.get("mentor_errors_by_depth") or {}).items()
            for m, e in by_mentor.items()]
    if not rows and details.get("mentor_errors"):
        depth = str(int(details.get("depth", 0)) + 1)
        rows = [{"depth": depth, "mentor": m, "error": e}
                for m, e in details["mentor_errors"].items()]
    for f in details.get("failures") or []:
        rows.append({"depth": str(int(details.get("depth", 0)) + 1), "mentor": f["model"],
                     "error": f"{f['role']} call failed: {f['error']}"})
    return rows


def leak_rates(trees: list[nx.DiGraph]) -> list[dict[str, Any]]:
    """Per mentor: candidate steps, how many state the correct answer, and the rate."""
    steps: Counter[str] = Counter()
    leaks: Counter[str] = Counter()
    for g in trees:
        for _, a in g.nodes(data=True):
            if not a["root"]:
                steps[a["mentor"] or "?"] += 1
                leaks[a["mentor"] or "?"] += bool(a.get("leaks_answer"))
    return [{"mentor": m, "steps": n, "leaking": leaks[m], "leak_rate": _ratio(leaks[m], n)}
            for m, n in sorted(steps.items())]


def load_tree(store: RunStore, qid: str) -> nx.DiGraph:
    """The tree of one stored question; KeyError if the run has no such question."""
    sq = read_question(store, qid)
    if sq is None:
        raise KeyError(qid)
    return question_graph(qid, sq, read_nodes(store, qid))


def load_trees(store: RunStore) -> list[nx.DiGraph]:
    """The tree of every stored question (bad records included), in dataset order."""
    return [question_graph(sq.qid, sq, read_nodes(store, sq.qid)) for sq in read_questions(store)]


def tree_summary(g: nx.DiGraph) -> dict[str, Any]:
    """Nodes, depth reached, stop reason and chosen path of one tree."""
    path = sorted((n for n, a in g.nodes(data=True) if a["on_path"]),
                  key=lambda n: g.nodes[n]["depth"])
    depths = [a["depth"] for _, a in g.nodes(data=True)]
    final = g.graph["final_depth"]
    return {
        "qid": g.graph["qid"], "status": g.graph["status"], "node_count": g.number_of_nodes(),
        "depth": final if final is not None else max(depths, default=0),
        "stop_kind": g.graph["stop_kind"], "stop_reason": g.graph["stop_reason"],
        "stop": g.graph["stop_label"],
        "attempts": 1 + max((a["attempt"] for _, a in g.nodes(data=True)), default=0),
        "chosen_path": path,
        "path_mentors": [g.nodes[n]["mentor"] for n in path if not g.nodes[n]["root"]],
        "score_trajectory": [g.nodes[n]["score"] for n in path if not g.nodes[n]["root"]],
    }


def tree_json(g: nx.DiGraph) -> dict[str, Any]:
    """Everything about one tree as plain JSON: summary, question, nodes and edges."""
    return {
        **tree_summary(g),
        "question": g.graph["question"], "gt_answer": g.graph["gt_answer"],
        "images": g.graph["images"], "error": g.graph["error"],
        "mentor_errors": g.graph.get("mentor_errors", []),
        "nodes": [{"id": n, **a} for n, a in g.nodes(data=True)],
        "edges": [{"source": u, "target": v, "on_path": a["on_path"]}
                  for u, v, a in g.edges(data=True)],
    }


# ---------------------------------------------------------------- prices


def load_prices(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a TOML price table: ``["model name"]`` tables of USD per million tokens.

    Keys: ``input_per_mtok``, ``output_per_mtok`` and optional ``cached_input_per_mtok``
    (default: the input price). The tables may also sit under a ``[prices]`` table.
    Raises ValueError naming the problem.
    """
    p = Path(path)
    data = read_toml(p, "price file")
    if set(data) == {"prices"} and isinstance(data["prices"], dict):
        data = data["prices"]
    out: dict[str, dict[str, float]] = {}
    for model, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"{p}: [{model}] must be a table of prices")
        unknown = sorted(set(table) - set(PRICE_KEYS))
        if unknown:
            raise ValueError(f"{p}: [{model}]: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(PRICE_KEYS)}")
        for key, value in table.items():  # a wrong value first: it may be why one is missing
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{p}: [{model}].{key}: expected a number >= 0, got {value!r}")
        for key in PRICE_KEYS[:2]:
            if key not in table:
                raise ValueError(f"{p}: [{model}].{key} missing")
        out[model] = {k: float(table.get(k, table["input_per_mtok"])) for k in PRICE_KEYS}
    return out


def _cost(usage: dict[str, int], price: dict[str, float] | None) -> float | None:
    if price is None:
        return None
    cached = min(usage["cached_tokens"], usage["prompt_tokens"])
    return (((usage["prompt_tokens"] - cached) * price["input_per_mtok"]
             + cached * price["cached_input_per_mtok"]
             + usage["completion_tokens"] * price["output_per_mtok"]) / 1e6)


def _model_ids(config: dict[str, Any] | None) -> dict[str, str]:
    """Configured name -> underlying model id, from the stored run config."""
    if not config:
        return {}
    models = [*config.get("mentors", []), *config.get("interns", []), config.get("judge") or {}]
    return {m["name"]: m.get("model", "") for m in models if m.get("name")}


# ---------------------------------------------------------------- run level


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _usage_rows(store: RunStore, prices: dict[str, dict[str, float]], ids: dict[str, str]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Calls, tokens, latency and cost per (role, model) and per role, from the call log."""
    per: dict[tuple[str, str], dict[str, Any]] = {}

    def row(role: str, model: str) -> dict[str, Any]:
        if (role, model) not in per:
            per[(role, model)] = {"role": role, "model": model, "calls": 0, "failed_calls": 0,
                                  **dict.fromkeys(_TOKENS, 0), "latency_s": 0.0}
        return per[(role, model)]

    for entry in store.iter_calls():
        r = row(entry.get("role", "?"), entry.get("model", "?"))
        r["calls"] += 1
        usage = ((store.memo_get(entry["key"]) or {}).get("usage")) or {}
        for k in _TOKENS:
            r[k] += int(usage.get(k, 0) or 0)
        r["latency_s"] += float(usage.get("latency_s", 0.0) or 0.0)
    for f in store.iter_failures():
        if f.get("kind") == "call":
            row(f.get("role", "?"), f.get("model", "?"))["failed_calls"] += len(f.get("keys", []))
    order = {r: i for i, r in enumerate(ROLES)}
    models = sorted(per.values(), key=lambda r: (order.get(r["role"], 9), r["role"], r["model"]))
    for r in models:
        price = prices.get(r["model"]) or prices.get(ids.get(r["model"], ""))
        r["priced"] = price is not None
        r["cost"] = _cost(r, price)
    roles: dict[str, dict[str, Any]] = {}
    for r in models:
        agg = roles.setdefault(r["role"], {"role": r["role"], "calls": 0, "failed_calls": 0,
                                           **dict.fromkeys(_TOKENS, 0), "latency_s": 0.0,
                                           "cost": 0.0})
        for k in ("calls", "failed_calls", *_TOKENS, "latency_s"):
            agg[k] += r[k]
        agg["cost"] = None if agg["cost"] is None or r["cost"] is None else agg["cost"] + r["cost"]
    return list(roles.values()), models


def _kappa(pairs: list[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa of two raters' correct/incorrect labels; None when undefined."""
    n = len(pairs)
    if not n:
        return None
    po = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def _interns(trees: list[nx.DiGraph]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    acc: dict[tuple[str, float], Counter[str]] = defaultdict(Counter)
    pairs: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
    for g in trees:
        for _, a in g.nodes(data=True):
            by_temp: dict[float, dict[str, dict[str, Any]]] = defaultdict(dict)
            for s in a["samples"]:
                c = acc[(s["intern"], s["temperature"])]
                c["samples"] += 1
                c["correct"] += bool(s["correct"])
                c["no_answer"] += s["verdict"] == "no-answer"
                c["failed"] += s["verdict"] in ("call-failed", "judge-failed", "unparsable")
                by_temp[s["temperature"]].setdefault(s["intern"], s)
            for group in by_temp.values():
                for x, y in combinations(sorted(group), 2):
                    sx, sy = group[x], group[y]
                    same = (sx["answer"] is not None and sy["answer"] is not None
                            and normalize_answer(sx["answer"]) == normalize_answer(sy["answer"]))
                    pairs[(x, y)].append((bool(sx["correct"]), bool(sy["correct"]), same))
    order = sorted(acc, key=lambda k: (k[0], -k[1]))  # per intern, hottest first
    accuracy = [{"intern": i, "temperature": t, "samples": acc[(i, t)]["samples"],
                 "correct": acc[(i, t)]["correct"],
                 "accuracy": _ratio(acc[(i, t)]["correct"], acc[(i, t)]["samples"]),
                 "no_answer": acc[(i, t)]["no_answer"], "failed": acc[(i, t)]["failed"]}
                for i, t in order]
    agreement = []
    for (x, y), ps in sorted(pairs.items()):
        agreement.append({
            "a": x, "b": y, "pairs": len(ps),
            "verdict_agreement": _ratio(sum(p[0] == p[1] for p in ps), len(ps)),
            "answer_agreement": _ratio(sum(p[2] for p in ps), len(ps)),
            "kappa": _kappa([(p[0], p[1]) for p in ps]),
        })
    return accuracy, agreement


def _by_depth(trees: list[nx.DiGraph]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    scores: dict[int, list[float]] = defaultdict(list)
    chosen: dict[int, list[float]] = defaultdict(list)
    proposed: dict[tuple[int, str], list[float]] = defaultdict(list)
    won: Counter[tuple[int, str]] = Counter()
    decisions: Counter[int] = Counter()
    for g in trees:
        for _, a in g.nodes(data=True):
            if a["root"]:
                continue
            d = a["depth"]
            scores[d].append(a["score"])
            proposed[(d, a["mentor"] or "?")].append(a["score"])
            if a["chosen"]:
                chosen[d].append(a["score"])
                won[(d, a["mentor"] or "?")] += 1
                decisions[d] += 1
    score_rows = [{"depth": d, "candidates": len(v), "mean_score": sum(v) / len(v),
                   "chosen": len(chosen[d]),
                   "mean_chosen_score": _ratio(sum(chosen[d]), len(chosen[d]))}
                  for d, v in sorted(scores.items())]
    mentor_rows = [{"depth": d, "mentor": m, "proposed": len(v), "won": won[(d, m)],
                    "decisions": decisions[d], "win_rate": _ratio(won[(d, m)], decisions[d]),
                    "mean_score": sum(v) / len(v)}
                   for (d, m), v in sorted(proposed.items())]
    return score_rows, mentor_rows


def run_summary(store: RunStore, prices: dict[str, dict[str, float]] | None = None
                ) -> dict[str, Any]:
    """Every run-level table (see module docstring) as plain JSON-ready data."""
    trees = load_trees(store)
    summaries = [tree_summary(g) for g in trees]
    status = Counter(s["status"] for s in summaries)
    stops: dict[str, Counter[int]] = defaultdict(Counter)
    for s in summaries:  # one word per stop reason, as `mics status` says it
        word = s["stop_kind"] if s["stop_kind"] != "error" else s["stop_reason"] or "error"
        stops[word][s["depth"] or 0] += 1
    score_rows, mentor_rows = _by_depth(trees)
    accuracy, agreement = _interns(trees)
    roles, models = _usage_rows(store, prices or {}, _model_ids(store.get_meta("config")))
    succeeded = status.get("succeeded", 0)
    # accepted: the chains a trainer gets by default (`mics export -f sft`): full score only;
    # a success that stopped at max depth is not one of them
    accepted = sum(s["status"] == "succeeded" and s["stop_kind"] == "full_score"
                   for s in summaries)
    cost: float | None = None
    if roles:
        cost = None if any(r["cost"] is None for r in roles) else sum(r["cost"] for r in roles)
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in roles)
    totals = {
        "questions": len(summaries), "succeeded": succeeded, "accepted": accepted,
        "max_depth": succeeded - accepted, "failed": status.get("failed", 0),
        "pending": len(summaries) - succeeded - status.get("failed", 0),
        "node_count": sum(s["node_count"] for s in summaries),
        "calls": sum(r["calls"] for r in roles),
        "failed_calls": sum(r["failed_calls"] for r in roles),
        **{k: sum(r[k] for r in roles) for k in _TOKENS}, "cost": cost,
        "cost_per_accepted": None if cost is None or not accepted else cost / accepted,
        "tokens_per_accepted": _ratio(tokens, accepted),
        "calls_per_accepted": _ratio(sum(r["calls"] for r in roles), accepted),
    }
    failed = []
    for g, s in zip(trees, summaries, strict=True):
        if s["status"] == "failed":
            failed.append({"qid": s["qid"], "stop_kind": s["stop_kind"],
                           "stop_reason": s["stop_reason"], "depth": s["depth"],
                           "error": g.graph["error"]})
    return {
        "run": str(store.run_dir), "totals": totals,
        "stops": [{"stop_kind": k, "by_depth": {str(d): n for d, n in sorted(stops[k].items())},
                   "total": sum(stops[k].values())}
                  for k in sorted(stops, key=lambda k: (k not in STOP_KINDS, STOP_KINDS.index(k)
                                                        if k in STOP_KINDS else 0, k))],
        "score_by_depth": score_rows, "mentor_wins": mentor_rows,
        "answer_leaks": leak_rates(trees),
        "intern_accuracy": accuracy, "intern_agreement": agreement,
        "usage_by_role": roles, "usage_by_model": models,
        "failed_questions": failed, "trees": summaries,
    }
