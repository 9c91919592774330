"""Preference and process-reward rows in the shapes TRL and LLaMA-Factory load as they are.

- :func:`preference_records`: TRL conversational preference rows ``{prompt, chosen,
  rejected, images, metadata}``; the prompt is the SFT user turn (of the run's prompt pack)
  with each ``<image>`` placeholder as a ``{"type": "image"}`` block, so images keep their
  places and order.
- :func:`preference_sharegpt_records`: LLaMA-Factory ranking rows ``{conversations,
  chosen: {from, value}, rejected: {from, value}, images, metadata}``.
- :func:`prm_records`: TRL stepwise supervision ``{prompt, completions, labels}``, one row
  per searched path, one ``### Step`` section per completion.

Each side of a pair is the whole chain up to and including its step (the shared prefix
cancels in DPO). Nodes never evaluated (no intern sample, so no score) take part in no pair and
no path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mics.export import CHIRON_PACK, absolute_images, difficulty, escape_placeholders, sft_prompt
from mics.records import StoredQuestion
from mics.types import Node

PRM_LABELS = ("positive", "full")
_SECTION = re.compile(r"^(?=### Step \d+)", re.M)


def _scored(n: Node) -> bool:
    return n.depth >= 0 and n.evaluated


def preference_pairs(nodes: Sequence[Node]) -> list[tuple[Node, Node]]:
    """(chosen, rejected) nodes: at each expansion, the chosen step against every scored
    sibling with a strictly lower score, in stored order."""
    pairs = []
    for c in nodes:
        if not _scored(c) or not c.chosen:
            continue
        pairs += [(c, r) for r in nodes if r.parent_id == c.parent_id and r is not c
                  and _scored(r) and r.score < c.score]
    return pairs


def _node_meta(n: Node) -> dict[str, Any]:
    return {"node_id": n.node_id, "mentor": n.mentor, "score": n.score,
            "correct": n.correct, "total": n.total, "leaks_answer": n.leaks_answer}


def _pair_meta(sq: StoredQuestion, diff: dict[str, Any], c: Node, r: Node) -> dict[str, Any]:
    return {"rid": sq.qid, "gt_answer": sq.question.gt_answer if sq.question else "",
            "depth": c.depth + 1, "parent_id": c.parent_id, "chosen": _node_meta(c),
            "rejected": _node_meta(r), "margin": c.score - r.score, "difficulty": diff}


def prompt_blocks(prompt: str) -> list[dict[str, str]]:
    """A prompt with ``<image>`` placeholders as TRL content blocks (text, image, ...)."""
    blocks: list[dict[str, str]] = []
    for i, text in enumerate(prompt.split("<image>")):
        if i:
            blocks.append({"type": "image"})
        if text:
            blocks.append({"type": "text", "text": text})
    return blocks


def preference_records(sq: StoredQuestion, nodes: Sequence[Node], image_root: Path | None,
                       pack: str = CHIRON_PACK) -> list[dict[str, Any]]:
    """TRL conversational preference rows (explicit prompt, absolute image paths)."""
    pairs = preference_pairs(nodes)
    if not pairs:
        return []
    prompt, images = sft_prompt(sq.searched()[0], pack)
    user = [{"role": "user", "content": prompt_blocks(prompt)}]
    paths, diff = absolute_images(images, image_root), difficulty(sq, nodes)
    return [{"prompt": user,
             "chosen": [{"role": "assistant", "content": escape_placeholders(c.prefix)}],
             "rejected": [{"role": "assistant", "content": escape_placeholders(r.prefix)}],
             "images": paths, "metadata": _pair_meta(sq, diff, c, r)}
            for c, r in pairs]


def preference_sharegpt_records(sq: StoredQuestion, nodes: Sequence[Node],
                                image_root: Path | None, pack: str = CHIRON_PACK
                                ) -> list[dict[str, Any]]:
    """LLaMA-Factory ranking rows: one human turn, then chosen and rejected gpt turns."""
    pairs = preference_pairs(nodes)
    if not pairs:
        return []
    prompt, images = sft_prompt(sq.searched()[0], pack)
    paths, diff = absolute_images(images, image_root), difficulty(sq, nodes)
    return [{"conversations": [{"from": "human", "value": prompt}],
             "chosen": {"from": "gpt", "value": escape_placeholders(c.prefix)},
             "rejected": {"from": "gpt", "value": escape_placeholders(r.prefix)},
             "images": paths, "metadata": _pair_meta(sq, diff, c, r)}
            for c, r in pairs]


def step_sections(step: str) -> list[str]:
    """A node's step text split into its ``### Step k`` sections (one if it has none)."""
    parts = [p.strip() for p in _SECTION.split(step)]
    return [p for p in parts if p] or [step.strip()]


def step_label(value: float, rule: str) -> bool:
    """``positive``: some intern sample was judged correct (Math-Shepherd's hard label,
    value > 0); ``full``: every sample was (value == 1)."""
    if rule not in PRM_LABELS:
        raise ValueError(f"unknown PRM label rule {rule!r}; choose from {', '.join(PRM_LABELS)}")
    return value > 0 if rule == "positive" else value >= 1.0


def search_paths(nodes: Sequence[Node]) -> list[list[Node]]:
    """Root-to-leaf paths of scored candidates: one per candidate that was not expanded,
    in stored order; a path stops before the first node without a score."""
    by_id = {n.node_id: n for n in nodes}
    parents = {n.parent_id for n in nodes}
    paths = []
    for leaf in nodes:
        if not _scored(leaf) or leaf.node_id in parents:
            continue
        path: list[Node] = []
        n: Node | None = leaf
        while n is not None and n.depth >= 0:
            path.append(n)
            n = by_id.get(n.parent_id) if n.parent_id is not None else None
        path.reverse()
        if all(_scored(p) for p in path):
            paths.append(path)
    return paths


def prm_records(sq: StoredQuestion, nodes: Sequence[Node], image_root: Path | None,
                rule: str = "positive", pack: str = CHIRON_PACK) -> list[dict[str, Any]]:
    """TRL stepwise-supervision rows: every section of a node takes the node's label."""
    paths = search_paths(nodes)
    if not paths:
        return []
    prompt, images = sft_prompt(sq.searched()[0], pack)
    abs_paths, diff = absolute_images(images, image_root), difficulty(sq, nodes)
    out = []
    for path in paths:
        completions, labels, values, ids, leaks = [], [], [], [], []
        for n in path:
            for section in step_sections(n.step):
                completions.append(escape_placeholders(section))
                labels.append(step_label(n.score, rule))
                values.append(n.score)
                ids.append(n.node_id)
                leaks.append(n.leaks_answer)
        out.append({"prompt": prompt, "completions": completions, "labels": labels,
                    "values": values, "images": abs_paths,
                    "metadata": {"rid": sq.qid, "node_ids": ids, "leaks_answer": leaks,
                                 "label_rule": rule,
                                 "leaf_chosen": path[-1].chosen, "difficulty": diff}})
    return out
