"""Exports from the store, one JSONL file per format, questions in dataset order.

- ``reference``: the Chiron-o1 results/failed schema (``results.jsonl``, ``failed.jsonl``).
- ``sft``: InternVL fine-tuning chains (``sft.jsonl``: ``image`` list relative to the image
  root, ``conversations``) and the ``--meta_path`` file (``internvl_meta.json``).
- ``sharegpt``: the same chains for LLaMA-Factory (``sharegpt.jsonl``: ``messages``,
  absolute ``images``), with a ``dataset_info.json`` entry describing the columns.
- ``step-values``: every evaluated prefix with its MICS-Score, a Monte Carlo estimate of the
  step's value (``step_values.jsonl``), for analysis.
- ``preferences``: the chosen step against each lower-scoring sibling, as TRL conversational
  preference data (``preferences.jsonl``) and LLaMA-Factory ranking data
  (``preferences_sharegpt.jsonl`` with a ``"ranking": true`` ``dataset_info.json`` entry).
- ``prm``: TRL stepwise supervision (``prm.jsonl``), one row per searched path.

The user turn of the training formats follows the run's prompt pack (:func:`sft_prompt`).
Every record carries ``difficulty`` (final depth, stop reason, score trajectory of the chosen
path, curriculum level) for curriculum ordering, and ``leaks_answer`` (mics.leaks: a step states
the correct answer). A mentor that had no candidate at a depth (its call failed, or its reply
was malformed) has ``null`` there in ``scores``, never 0.0. Filters select questions (see
:class:`Filters`). Docs: ``docs/exports.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mics.analysis import chosen_path, stop_kind
from mics.dataset import image_groups
from mics.leaks import leaks_answer
from mics.prompts import MEDICAL
from mics.records import RunStore, StoredQuestion, read_nodes, read_questions
from mics.steps import FINAL_MARKER, before_last_step
from mics.types import NO_MODEL_STOPS, Node, Outcome, Question

FORMATS = ("reference", "sft", "sharegpt", "step-values", "preferences", "prm")
FILES = {"sft": "sft.jsonl", "sharegpt": "sharegpt.jsonl", "step-values": "step_values.jsonl",
         "preferences": "preferences.jsonl", "preferences-sharegpt": "preferences_sharegpt.jsonl",
         "prm": "prm.jsonl"}
# the files (FILES keys) each format writes, when not just its own
OUTPUTS = {"preferences": ("preferences", "preferences-sharegpt")}
INTERNVL_META = "internvl_meta.json"
KEYFRAMES = ("Please base your response on the keyframes of the relevant medical imaging "
             "modality ({modalities}) and reason step-by-step to answer the above question.")
TEXT_ONLY = "Please reason step-by-step to answer the above question."
CHIRON_PACK = MEDICAL.pack  # its runs (and runs with no recorded pack) export Chiron-o1's turn


# ---------------------------------------------------------------- reference


def reference_result(sq: StoredQuestion) -> dict[str, Any]:
    """A success record exactly as the reference writes it (final_depth, search_id strings)."""
    q, o = sq.searched()
    return {
        "rid": q.qid,
        "images": list(q.image_paths),
        "question": q.question,
        "gt_answer": q.gt_answer,
        "reasoning": o.reasoning,
        "scores": mentor_scores(o),
        "final_depth": str(o.final_depth),
        "generated_by": o.generated_by,
        "search_id": o.search_id,
        "leaks_answer": question_leaks(sq),
    }


def mentor_scores(outcome: Outcome) -> dict[str, list[float | None]]:
    """Scores per mentor and depth; ``None`` where the mentor had no candidate (also for runs
    stored before this rule, which wrote 0.0 there: their mentor errors say where)."""
    scores = {m: list(v) for m, v in (outcome.scores or {}).items()}
    errors = (outcome.details or {}).get("mentor_errors_by_depth") or {}
    for depth, by_mentor in errors.items():
        for m in by_mentor:
            if m in scores and 0 < int(depth) <= len(scores[m]):
                scores[m][int(depth) - 1] = None
    return scores


def question_leaks(sq: StoredQuestion) -> bool:
    """Whether the exported reasoning states the correct answer before its last step (the
    mentor prompt's rule: a chain may conclude with the answer, not start from it)."""
    o, q = sq.outcome, sq.question
    return (o is not None and bool(o.reasoning)
            and leaks_answer(before_last_step(o.reasoning), q.gt_answer if q is not None else ""))


def failure_record(sq: StoredQuestion) -> dict[str, Any]:
    """One shape for every failure (B23): {rid, stage, error, details}."""
    o = sq.outcome
    if o is None:
        raise ValueError(f"question {sq.qid}: a failure without a stored outcome")
    details = dict(o.details)
    if o.scores:
        details["scores"] = mentor_scores(o)
    return {"rid": o.qid, "stage": o.stage, "error": o.error, "details": details}


def export_reference(store: RunStore, out_dir: Path,
                     keep: Callable[[StoredQuestion], bool] | None = None
                     ) -> dict[str, int]:
    """Write results.jsonl and failed.jsonl in dataset order; returns the line counts.

    ``keep(question)`` selects the successes written (failures are always written).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"results": 0, "failed": 0, "pending": 0}
    results_tmp = out_dir / "results.jsonl.tmp"
    failed_tmp = out_dir / "failed.jsonl.tmp"
    with results_tmp.open("wb") as res, failed_tmp.open("wb") as bad:
        for sq in read_questions(store):
            if sq.status == "succeeded":
                if keep is not None and not keep(sq):
                    continue
                res.write(orjson.dumps(reference_result(sq)) + b"\n")
                counts["results"] += 1
            elif sq.status == "failed":
                bad.write(orjson.dumps(failure_record(sq)) + b"\n")
                counts["failed"] += 1
            else:
                counts["pending"] += 1
    results_tmp.replace(out_dir / "results.jsonl")
    failed_tmp.replace(out_dir / "failed.jsonl")
    return counts


# ---------------------------------------------------------------- difficulty and filters


def difficulty(sq: StoredQuestion, nodes: Sequence[Node]) -> dict[str, Any]:
    """Curriculum signals of one question.

    ``level``: d for a full score at depth d, final depth + 1 for max depth without a full
    score, None for a failed question.
    """
    kind = stop_kind(sq)
    final = int(sq.outcome.final_depth or 0) if sq.outcome is not None else 0
    level = final if kind == "full_score" else final + 1 if kind == "max_depth" else None
    return {
        "final_depth": final, "stop_reason": sq.stop_reason or "", "stop_kind": kind,
        "score_trajectory": [n.score for n in chosen_path(nodes) if n.depth >= 0],
        "level": level,
    }


@dataclass(frozen=True)
class Filters:
    """Question filters shared by every format.

    ``min_score``: the last chosen step's score is at least this (failed questions score 0);
    ``only_full_score``: the search stopped on a full score; ``max_depth``: the final depth is
    at most this; ``exclude_leaks``: no step of the chosen path, and nothing in the exported
    reasoning before its last step, states the correct answer (and, in the questions kept,
    step-level formats leave out every step that states it and every step continuing from one:
    see `prune`).
    """

    min_score: float | None = None
    only_full_score: bool = False
    max_depth: int | None = None
    exclude_leaks: bool = False

    def keep(self, sq: StoredQuestion, nodes: Sequence[Node]) -> bool:
        """Whether a question passes every filter."""
        if self.exclude_leaks and self.leaks(sq, nodes):
            return False
        diff = difficulty(sq, nodes)
        if self.only_full_score and diff["stop_kind"] != "full_score":
            return False
        if self.max_depth is not None and diff["final_depth"] > self.max_depth:
            return False
        if self.min_score is not None:
            trajectory = diff["score_trajectory"]
            # the last chosen step of a success; a failed search accepted no last step
            final = trajectory[-1] if sq.status == "succeeded" and trajectory else 0.0
            if final < self.min_score:
                return False
        return True

    @staticmethod
    def leaks(sq: StoredQuestion, nodes: Sequence[Node]) -> bool:
        """The question's chosen path, or its exported reasoning, states the correct answer."""
        return question_leaks(sq) or any(n.leaks_answer for n in chosen_path(nodes)
                                         if n.depth >= 0)

    def prune(self, nodes: Sequence[Node]) -> list[Node]:
        """The nodes step-level exports (step values, preferences, prm) draw from: with
        ``exclude_leaks``, none that states the answer and none below one (its prefix carries
        the answer, so its interns' pass rate is no label either)."""
        if not self.exclude_leaks:
            return list(nodes)
        tainted: dict[str, bool] = {}
        for n in sorted(nodes, key=lambda n: n.depth):  # a parent is one depth above its child
            tainted[n.node_id] = n.leaks_answer or tainted.get(n.parent_id or "", False)
        return [n for n in nodes if not tainted[n.node_id]]

    def admits(self, sq: StoredQuestion, nodes: Sequence[Node],
               left_out: dict[str, int] | None = None) -> bool:
        """`keep`, counting in ``left_out["leaks"]`` a question left out because it leaks."""
        if self.keep(sq, nodes):
            return True
        if left_out is not None and self.exclude_leaks and self.leaks(sq, nodes):
            left_out["leaks"] = left_out.get("leaks", 0) + 1
        return False

    @property
    def active(self) -> bool:
        return (self.min_score is not None or self.only_full_score
                or self.max_depth is not None or self.exclude_leaks)


# ---------------------------------------------------------------- SFT prompt and target

# Placeholder tokens trainers read out of text: InternVL's <image>, <img>, </img>,
# <IMG_CONTEXT>; LLaMA-Factory's <image>, <video>, <audio>.
_PLACEHOLDER = re.compile(r"<(/?)(image|video|audio|img|IMG_CONTEXT)>", re.I)


def escape_placeholders(text: str) -> str:
    """Literal placeholder tokens in free text as ``[image]``-style text, so only the
    placeholders the exporter writes stand for images (``<image>`` -> ``[image]``)."""
    return _PLACEHOLDER.sub(r"[\1\2]", text)


def absolute_images(images: list[str], image_root: Path | None) -> list[str]:
    """Image paths joined to the run's image root (kept as stored when it is unknown)."""
    if image_root is None:
        return list(images)
    return [str(image_root / p) for p in images]


def run_image_root(store: RunStore) -> Path | None:
    """The directory a run's image paths are relative to: ``--image-root``, else the
    dataset file's directory; None for a run without a recorded dataset."""
    dataset = store.get_meta("dataset") or {}
    if dataset.get("image_root"):
        return Path(dataset["image_root"])
    if dataset.get("path"):
        return Path(dataset["path"]).parent
    return None


def run_pack(store: RunStore) -> str:
    """The prompt pack a run was searched with; "medical" for a run that recorded none."""
    prompts = (store.get_meta("config") or {}).get("prompts") or {}
    return prompts.get("pack") or CHIRON_PACK


def _case_fields(case_info: str) -> dict[str, str]:
    fields = {"Gender": "N/A", "Age": "N/A", "Chief complaint": "N/A"}
    for line in case_info.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in fields:
            fields[key.strip()] = value.strip()
    return fields


def ordered_images(image_paths: list[str]) -> tuple[list[str], list[int]]:
    """Images in modality order (by ``_group<k>``) and the number of images per modality."""
    if not image_paths:
        return [], []
    groups = image_groups(image_paths) or [list(range(1, len(image_paths) + 1))]
    return [image_paths[n - 1] for g in groups for n in g], [len(g) for g in groups]


def plain_prompt(question: Question) -> tuple[str, list[str]]:
    """A user turn with no domain wording: the question, one ``<image>`` line per image in
    record order, then the step-by-step instruction (the context, mentor-only, is left out)."""
    images = list(question.image_paths)
    lines = [escape_placeholders(question.question), *["<image>"] * len(images), TEXT_ONLY]
    return "\n".join(lines), images


def sft_prompt(question: Question, pack: str = CHIRON_PACK) -> tuple[str, list[str]]:
    """The SFT user turn (one ``<image>`` per image) and its images in order: Chiron-o1's
    format for the "medical" pack, :func:`plain_prompt` for any other."""
    if pack != CHIRON_PACK:
        return plain_prompt(question)
    f = {k: escape_placeholders(v) for k, v in _case_fields(question.case_info).items()}
    text = (f"{escape_placeholders(question.question)} "
            f"(Supplementary information is as follows:\n"
            f"Gender: {f['Gender']}, Age: {f['Age']}, Chief complaint: {f['Chief complaint']})\n")
    images, sizes = ordered_images(list(question.image_paths))
    if not images:
        return text + TEXT_ONLY, []
    modalities = ",\n".join(f"Modality {i}: " + "\n".join(["<image>"] * n)
                            for i, n in enumerate(sizes, start=1))
    return text + KEYFRAMES.format(modalities=modalities), images


def split_answer(reasoning: str) -> tuple[str, str | None]:
    """(reasoning without the final-answer section, the final answer or None)."""
    idx = reasoning.lower().rfind(FINAL_MARKER.lower())
    if idx < 0:
        return reasoning.strip(), None
    answer = reasoning[idx + len(FINAL_MARKER):].strip()
    return reasoning[:idx].rstrip(), answer or None


def _chain(sq: StoredQuestion, nodes: Sequence[Node], answer_in_target: bool, pack: str
           ) -> tuple[str, list[str], str, dict[str, Any]]:
    q, o = sq.searched()
    prompt, images = sft_prompt(q, pack)
    steps, answer = split_answer(o.reasoning)
    target = escape_placeholders(o.reasoning.strip() if answer_in_target else steps)
    meta = {"answer": answer if answer is not None else q.gt_answer,
            "gt_answer": q.gt_answer, "generated_by": o.generated_by,
            "difficulty": difficulty(sq, nodes), "leaks_answer": question_leaks(sq)}
    return prompt, images, target, meta


def sft_record(sq: StoredQuestion, nodes: Sequence[Node], answer_in_target: bool = False,
               pack: str = CHIRON_PACK) -> dict[str, Any]:
    """One InternVL fine-tuning record (``image`` omitted for a text-only question)."""
    prompt, images, target, meta = _chain(sq, nodes, answer_in_target, pack)
    out: dict[str, Any] = {"id": sq.qid}
    if images:
        out["image"] = images
    out["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": target}]
    return {**out, **meta}


def sharegpt_record(sq: StoredQuestion, nodes: Sequence[Node], answer_in_target: bool = False,
                    image_root: Path | None = None, pack: str = CHIRON_PACK) -> dict[str, Any]:
    """One LLaMA-Factory ShareGPT record (``messages`` with role/content, absolute
    ``images``: LLaMA-Factory joins relative ones to ``media_dir``, not the image root)."""
    prompt, images, target, meta = _chain(sq, nodes, answer_in_target, pack)
    return {"id": sq.qid,
            "messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": target}],
            "images": absolute_images(images, image_root), **meta}


SHAREGPT_INFO = {"mics": {
    "file_name": FILES["sharegpt"], "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
             "assistant_tag": "assistant"},
}}
PREFERENCE_INFO = {"mics_preferences": {
    "file_name": FILES["preferences-sharegpt"], "formatting": "sharegpt", "ranking": True,
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                "images": "images"},
}}


def internvl_meta(out_dir: Path, image_root: Path | None, length: int) -> dict[str, Any]:
    """The InternVL ``--meta_path`` entry for ``sft.jsonl`` (absolute annotation path)."""
    return {"mics": {"root": str(image_root) if image_root is not None else "",
                     "annotation": str((out_dir / FILES["sft"]).resolve()),
                     "data_augment": False, "repeat_time": 1, "length": length}}


# ---------------------------------------------------------------- step values


def _base(sq: StoredQuestion) -> dict[str, Any]:
    q = sq.question
    if q is None:
        return {"rid": sq.qid, "question": "", "gt_answer": "", "images": []}
    return {"rid": sq.qid, "question": q.question, "gt_answer": q.gt_answer,
            "images": list(q.image_paths)}


def step_value_records(sq: StoredQuestion, nodes: Sequence[Node]) -> list[dict[str, Any]]:
    """Every evaluated candidate (roots excluded) with its MICS-Score as the step value."""
    base, diff = _base(sq), difficulty(sq, nodes)
    return [{**base, "node_id": n.node_id, "parent_id": n.parent_id,
             "attempt": n.attempt, "depth": n.depth + 1, "mentor": n.mentor,
             "prefix": n.prefix, "step": n.step, "value": n.score,
             "correct": n.correct, "total": n.total, "chosen": n.chosen,
             "reused": n.reused, "leaks_answer": n.leaks_answer,
             "difficulty": diff}
            for n in nodes if n.depth >= 0]


# ---------------------------------------------------------------- writing


def exportable_questions(store: RunStore, filters: Filters,
                         left_out: dict[str, int] | None = None
                         ) -> Iterator[tuple[StoredQuestion, list[Node]]]:
    """(question record, tree nodes) of every finished question the filters keep, the nodes
    pruned by `Filters.prune`; `left_out["leaks"]` counts the questions left out because
    they leak (with ``exclude_leaks``)."""
    for sq in read_questions(store):
        if not sq.finished or sq.question is None:
            continue  # pending questions and unreadable records have no tree to export
        nodes = read_nodes(store, sq.qid)
        if filters.admits(sq, nodes, left_out):
            yield sq, filters.prune(nodes)


def is_partial(sq: StoredQuestion) -> bool:
    """A success that stopped at max depth without a full score (left out of sft/sharegpt
    unless asked for: a trainer expects chains every intern sample confirmed)."""
    return sq.status == "succeeded" and stop_kind(sq) != "full_score"


def export_rows(fmt: str, sq: StoredQuestion, nodes: Sequence[Node], answer_in_target: bool,
                image_root: Path | None = None, prm_label: str = "positive",
                include_partial: bool = True, pack: str = CHIRON_PACK) -> list[dict[str, Any]]:
    """One question's rows in export format `fmt` (sft, sharegpt, preferences, prm, ...);
    `pack` is the run's prompt pack (:func:`run_pack`), which picks the user turn."""
    from mics import export_trainers as trainers  # it builds on this module

    if sq.stop_reason in NO_MODEL_STOPS:
        return []  # no working model (count_wrong): its scores are outage, not labels
    if fmt in ("sft", "sharegpt"):
        if sq.status != "succeeded" or (is_partial(sq) and not include_partial):
            return []
        if fmt == "sft":
            return [sft_record(sq, nodes, answer_in_target, pack)]
        return [sharegpt_record(sq, nodes, answer_in_target, image_root, pack)]
    if fmt == "step-values":
        return step_value_records(sq, nodes)
    if fmt == "preferences":
        return trainers.preference_records(sq, nodes, image_root, pack)
    if fmt == "preferences-sharegpt":
        return trainers.preference_sharegpt_records(sq, nodes, image_root, pack)
    return trainers.prm_records(sq, nodes, image_root, prm_label, pack)


def _write_json(path: Path, value: Any) -> None:
    """Write a JSON file whole or not at all (a killed export leaves the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(path)


def export(store: RunStore, out_dir: Path, formats: list[str], filters: Filters | None = None,
           answer_in_target: bool = False, image_root: Path | None = None,
           prm_label: str = "positive", include_partial: bool = True) -> dict[str, int]:
    """Write each format's file(s) into ``out_dir``; returns record counts per file key and,
    as ``partial``, the max-depth chains without a full score (in sft/sharegpt only with
    ``include_partial``; `mics export` leaves them out unless asked).

    ``image_root`` (default: the run's recorded one) is the InternVL meta file's ``root``
    and makes the image paths of the other training formats absolute. ``prm_label`` is the
    PRM step-label rule (see ``export_trainers.step_label``). The user turn follows the
    run's prompt pack (:func:`sft_prompt`).
    """
    from mics.export_trainers import PRM_LABELS

    filters = filters or Filters()
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(FORMATS)}")
    if prm_label not in PRM_LABELS:
        raise ValueError(f"unknown PRM label rule {prm_label!r}; "
                         f"choose from {', '.join(PRM_LABELS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    root = image_root.resolve() if image_root is not None else run_image_root(store)
    pack = run_pack(store)
    counts: dict[str, int] = {}
    if "reference" in formats:
        left_ref: dict[str, int] = {}

        def keep(sq: StoredQuestion) -> bool:
            return filters.admits(sq, read_nodes(store, sq.qid), left_ref)

        counts.update(export_reference(store, out_dir, keep if filters.active else None))
        if filters.exclude_leaks:
            counts["leaks_left_out"] = left_ref.get("leaks", 0)
    others = [k for f in FORMATS if f in formats and f != "reference"
              for k in OUTPUTS.get(f, (f,))]
    if not others:
        return counts
    tmp = {f: out_dir / (FILES[f] + ".tmp") for f in others}
    handles = {f: p.open("wb") for f, p in tmp.items()}
    left_out: dict[str, int] = {}
    try:
        for f in others:
            counts[f] = 0
        counts["partial"] = 0
        for sq, nodes in exportable_questions(store, filters, left_out):
            counts["partial"] += is_partial(sq)
            for f in others:
                for r in export_rows(f, sq, nodes, answer_in_target, root, prm_label,
                                     include_partial, pack):
                    handles[f].write(orjson.dumps(r) + b"\n")
                    counts[f] += 1
    finally:
        for h in handles.values():
            h.close()
    if filters.exclude_leaks:
        counts["leaks_left_out"] = left_out.get("leaks", 0)
    for f, p in tmp.items():
        p.replace(out_dir / FILES[f])
    if "sft" in others:
        _write_json(out_dir / INTERNVL_META, internvl_meta(out_dir, root, counts["sft"]))
    info = {**(SHAREGPT_INFO if "sharegpt" in others else {}),
            **(PREFERENCE_INFO if "preferences" in others else {})}
    if info:
        _write_json(out_dir / "dataset_info.json", {**_existing_info(out_dir), **info})
    return counts


def _existing_info(out_dir: Path) -> dict[str, Any]:
    """The entries an earlier export wrote into ``dataset_info.json`` (kept: a second export
    of another format into the folder adds its entry instead of dropping theirs)."""
    try:
        old = orjson.loads((out_dir / "dataset_info.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return old if isinstance(old, dict) else {}
