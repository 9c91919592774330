"""Exports from the store. `reference`: the Chiron-o1 results/failed JSONL schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def reference_result(rec: dict[str, Any]) -> dict[str, Any]:
    """A success record exactly as the reference writes it (final_depth, search_id strings)."""
    q, o = rec["question"], rec["outcome"]
    return {
        "rid": q["qid"],
        "images": list(q["image_paths"]),
        "question": q["question"],
        "gt_answer": q["gt_answer"],
        "reasoning": o["reasoning"],
        "scores": o["scores"],
        "final_depth": str(o["final_depth"]),
        "generated_by": o["generated_by"],
        "search_id": o["search_id"],
    }


def failure_record(qid: str, rec: dict[str, Any]) -> dict[str, Any]:
    """One shape for every failure (B23): {rid, stage, error, details}."""
    o = rec["outcome"]
    details = dict(o.get("details", {}))
    if o.get("scores"):
        details["scores"] = o["scores"]
    return {"rid": qid, "stage": o["stage"], "error": o["error"], "details": details}


def export_reference(store: Any, out_dir: Path) -> dict[str, int]:
    """Write results.jsonl and failed.jsonl in dataset order; returns the line counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"results": 0, "failed": 0, "pending": 0}
    results_tmp = out_dir / "results.jsonl.tmp"
    failed_tmp = out_dir / "failed.jsonl.tmp"
    with results_tmp.open("wb") as res, failed_tmp.open("wb") as bad:
        for qid, rec in store.iter_questions():
            if rec["status"] == "succeeded":
                res.write(orjson.dumps(reference_result(rec)) + b"\n")
                counts["results"] += 1
            elif rec["status"] == "failed":
                bad.write(orjson.dumps(failure_record(qid, rec)) + b"\n")
                counts["failed"] += 1
            else:
                counts["pending"] += 1
    results_tmp.replace(out_dir / "results.jsonl")
    failed_tmp.replace(out_dir / "failed.jsonl")
    return counts
