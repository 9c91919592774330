"""The content hash of a model call: the one definition of what determines a reply."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from backends.base import Call


def call_key(identity: dict[str, Any] | None, call: Call) -> str:
    """sha256 of the model's identity (left out when None), the full prompt (images by content
    hash), the sampling parameters and the sample index: the memo key when an identity is
    given, a model-independent call hash (the local backend's sampling seeds) when not."""
    material: dict[str, Any] = {
        "prompt": call.prompt.key_material(),
        "sampling": call.sampling.to_dict(),
        "sample": call.sample_index,
    }
    if identity is not None:
        material["model"] = identity
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
