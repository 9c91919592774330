"""The content hash of a model call: the one definition of what determines a reply."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from backends.base import Call
    from mics.types import Prompt

_SORT = orjson.OPT_SORT_KEYS
_IDENTITIES: dict[int, tuple[dict[str, Any], bytes]] = {}  # id -> (the dict, its JSON)


def call_key(identity: dict[str, Any] | None, call: Call) -> str:
    """sha256 of the model's identity (left out when None), the full prompt (images by content
    hash), the sampling parameters and the sample index: the memo key when an identity is
    given, a model-independent call hash (the local backend's sampling seeds) when not.

    The hashed bytes are `orjson.dumps({"model": identity, "prompt": prompt.key_material(),
    "sample": index, "sampling": sampling.to_dict()}, OPT_SORT_KEYS)`, assembled from parts
    serialised once per prompt and per identity (the keys sort in that order)."""
    head = b'{"model":' + _identity_json(identity) + b"," if identity is not None else b"{"
    return hashlib.sha256(
        head + b'"prompt":' + _prompt_json(call.prompt)
        + b',"sample":' + orjson.dumps(call.sample_index)
        + b',"sampling":' + orjson.dumps(call.sampling.to_dict(), option=_SORT) + b"}"
    ).hexdigest()


@lru_cache(maxsize=8192)
def _prompt_json(prompt: Prompt) -> bytes:
    return orjson.dumps(prompt.key_material(), option=_SORT)


def _identity_json(identity: dict[str, Any]) -> bytes:
    """An identity's JSON, kept per dict object (identities are built once per model and
    never changed); the cache holds the dict, so its id cannot be reused while cached."""
    hit = _IDENTITIES.get(id(identity))
    if hit is not None and hit[0] is identity:
        return hit[1]
    raw = orjson.dumps(identity, option=_SORT)
    if len(_IDENTITIES) >= 256:
        _IDENTITIES.clear()
    _IDENTITIES[id(identity)] = (identity, raw)
    return raw
