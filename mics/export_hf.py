"""``--format hf``: the SFT, preference and PRM sets as Hugging Face datasets (``[hf]`` extra).

``<out>/hf/<set>/`` is a ``datasets.save_to_disk`` folder (``datasets.load_from_disk``
opens it) and ``<out>/hf/<set>.parquet`` the same table as Parquet. Images are embedded
(bytes and the run-relative path) as a list of ``datasets.Image``, so the folder travels
without the image root. Rows are TRL's conversational shapes:

- ``sft``: ``{id, messages, images, ...}``, every message's content a list of
  ``{"type": "text"|"image"}`` blocks (TRL's vision format);
- ``preferences``: the rows of ``preferences.jsonl``;
- ``prm``: the rows of ``prm.jsonl``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from mics.export import (
    CHIRON_PACK,
    Filters,
    export_rows,
    exportable_questions,
    is_partial,
    run_image_root,
    run_pack,
    sft_record,
)
from mics.export_trainers import PRM_LABELS, prompt_blocks
from mics.records import RunStore, StoredQuestion
from mics.types import Node

HF_SETS = ("sft", "preferences", "prm")


class MissingExtra(RuntimeError):
    """The ``datasets`` package (the ``[hf]`` extra) is not installed."""


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingExtra("--format hf needs the `datasets` package: "
                           "pip install 'mics[hf]'") from None
    return datasets


def hf_sft_row(sq: StoredQuestion, nodes: Sequence[Node], answer_in_target: bool,
               pack: str = CHIRON_PACK) -> dict[str, Any]:
    """An SFT row in TRL's vision conversational shape (images still as relative paths)."""
    r = sft_record(sq, nodes, answer_in_target, pack)
    prompt, target = (t["value"] for t in r.pop("conversations"))
    images = r.pop("image", [])
    return {"id": r.pop("id"),
            "messages": [{"role": "user", "content": prompt_blocks(prompt)},
                         {"role": "assistant", "content": [{"type": "text", "text": target}]}],
            "images": images, **r}


def _rows(store: RunStore, name: str, filters: Filters, answer_in_target: bool,
          root: Path | None, prm_label: str, include_partial: bool = True,
          left_out: dict[str, int] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pack = run_pack(store)
    for sq, nodes in exportable_questions(store, filters, left_out):
        if name == "sft":
            if sq.status == "succeeded" and (include_partial or not is_partial(sq)):
                rows.append(hf_sft_row(sq, nodes, answer_in_target, pack))
        else:  # image paths relative to the root, like sft's, then embedded
            rows += export_rows(name, sq, nodes, answer_in_target, None, prm_label,
                                pack=pack)
    return rows


def _embed(rid: str, paths: list[str], root: Path | None) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        full = root / p if root is not None else Path(p)
        try:
            data = full.read_bytes()
        except OSError as e:
            raise ValueError(f"question {rid}: image {p} (under {root}) cannot be read for "
                             f"--format hf: {e.strerror}; pass the image root with "
                             "--image-root") from None
        out.append({"bytes": data, "path": p})
    return out


def _dataset(rows: list[dict[str, Any]], root: Path | None) -> Any:
    datasets = _datasets()
    digest = hashlib.sha256()
    for r in rows:
        digest.update(orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
        r["images"] = _embed(r.get("id") or r["metadata"]["rid"], r["images"], root)
    fingerprint = digest.hexdigest()[:16]
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"images": []})
    feature = datasets.List(datasets.Image()) if hasattr(datasets, "List") else \
        datasets.Sequence(datasets.Image())
    # a fingerprint from the content, so a re-export writes the same state.json
    return ds.cast_column("images", feature, new_fingerprint=fingerprint)


def export_hf(store: RunStore, out_dir: Path, filters: Filters | None = None,
              answer_in_target: bool = False, image_root: Path | None = None,
              prm_label: str = "positive", include_partial: bool = True) -> dict[str, int]:
    """Write ``out_dir/hf`` (replacing it whole); returns the row count of each set (the sft
    set holds max-depth chains without a full score only with ``include_partial``)."""
    datasets = _datasets()
    if prm_label not in PRM_LABELS:
        raise ValueError(f"unknown PRM label rule {prm_label!r}; "
                         f"choose from {', '.join(PRM_LABELS)}")
    filters = filters or Filters()
    root = image_root.resolve() if image_root is not None else run_image_root(store)
    final, tmp = out_dir / "hf", out_dir / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {}
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the CLI prints its own counts
    try:
        left_out: dict[str, int] = {}
        for name in HF_SETS:
            left_out.clear()  # every set counts the same questions; the last count is kept
            ds = _dataset(_rows(store, name, filters, answer_in_target, root, prm_label,
                                include_partial, left_out), root)
            ds.save_to_disk(str(tmp / name))
            ds.to_parquet(str(tmp / f"{name}.parquet"))
            counts[f"hf/{name}"] = len(ds)
        if filters.exclude_leaks:
            counts["leaks_left_out"] = left_out.get("leaks", 0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    return counts
