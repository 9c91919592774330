"""The generic dataset schema: one JSON object per record, for any domain (docs/datasets.md).

    {"id": "q1", "question": "...", "answer": "...", "images": ["a.png"], "context": "..."}

``id``, ``question`` and ``answer`` are required; ``images`` (paths, resolved like the Chiron
reader's) and ``context`` (shown to mentors only, never to interns) are optional; ``meta`` may
hold anything and is ignored. Any other key is an error naming it, so a misspelt optional field
is never dropped silently. Selected by ``[dataset] format = "generic"``; the Chiron/MMRP reader
in mics.dataset is the other adapter, and both share the image checks and error reporting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mics.dataset import (
    MAX_RID_BYTES,
    BadField,
    image_entries,
    json_kind,
    load_image,
    storable,
)
from mics.types import Question

FIELDS = ("id", "question", "answer", "images", "context", "meta")
NO_CONTEXT = "None"  # what {context} renders to when a record has none


def generic_id(obj: dict[str, Any]) -> str:
    """The record's ``id`` as a string: a non-empty string or an integer."""
    if "id" not in obj:
        raise BadField("id", "missing id")
    rid = obj["id"]
    if isinstance(rid, int) and not isinstance(rid, bool):
        return str(rid)
    if not isinstance(rid, str):
        raise BadField("id", f"id must be a string or integer, got {json_kind(rid)}")
    if not rid.strip():
        raise BadField("id", "id is empty")
    if "\x00" in rid or len(storable(rid, "id")) > MAX_RID_BYTES:
        raise BadField("id", f"id must be at most {MAX_RID_BYTES} UTF-8 bytes without NUL")
    return rid


def build_generic(obj: dict[str, Any], qid: str, index: int, root: Path,
                  load_images: bool = True) -> Question:
    """A validated Question from one generic record (raises BadField naming the field)."""
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise BadField(unknown[0], f"unknown field(s) {', '.join(map(repr, unknown))}; the generic "
                                   f"schema has {', '.join(FIELDS)} (put extras under \"meta\")")
    question = _text(obj, "question", required=True)
    answer = _text(obj, "answer", required=True)
    context = _text(obj, "context", required=False)
    entries = image_entries(obj)
    for i, entry in enumerate(entries):
        storable(entry, f"images[{i}]")
    images = tuple(load_image(e, i, root) for i, e in enumerate(entries)) if load_images else ()
    return Question(qid=qid, index=index, question=question, gt_answer=answer, images=images,
                    image_paths=tuple(entries), case_info=context or NO_CONTEXT)


def _text(obj: dict[str, Any], key: str, *, required: bool) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise BadField(key, f"missing {key}")
    if key == "answer" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # integer answers are common in math data: 42 reads as "42"
    if key == "answer" and isinstance(value, float):
        raise BadField(key, f"answer {value!r} is a JSON float; write it as a string (\"{value}\") "
                            "so its exact form is kept")
    if not isinstance(value, str):
        raise BadField(key, f"{key} must be a string, got {json_kind(value)}")
    text = value.strip()
    if required and not text:
        raise BadField(key, f"empty {key}")
    return storable(text, key).decode("utf-8")
