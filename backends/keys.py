"""The content hash of a model call: the one definition of what determines a reply."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from operator import methodcaller
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from backends.base import Call
    from mics.types import Prompt, Sampling

_SORT = orjson.OPT_SORT_KEYS
_IDENTITIES: dict[int, tuple[dict[str, Any], bytes]] = {}  # id -> (the dict, its JSON)
_SAMPLINGS: dict[int, tuple[Sampling, bytes]] = {}  # id -> (the Sampling, its JSON)
_PREFIXES: dict[tuple[bytes | None, Prompt], Any] = {}  # -> sha256 state after the prompt
_MAX_PREFIXES = 4096


def call_key(identity: dict[str, Any] | None, call: Call) -> str:
    """sha256 of the model's identity (left out when None), the full prompt (images by content
    hash), the sampling parameters and the sample index: the memo key when an identity is
    given, a model-independent call hash (the local backend's sampling seeds) when not.

    The hashed bytes are `orjson.dumps({"model": identity, "prompt": prompt.key_material(),
    "sample": index, "sampling": sampling.to_dict()}, OPT_SORT_KEYS)` (the keys sort in that
    order). The hash of the part up to the prompt is kept per (identity, prompt), so the
    samples and temperatures of one prompt hash it once; the sampling's JSON is kept per
    Sampling object (the engine shares one per setting among its calls); the key is kept on
    the call with its identity's JSON, so hashing the same call object again (the gate, then
    an SGLang intern's sampling seed) returns it as it is. Equal but distinct calls and
    Samplings are serialized afresh: equal values can serialize apart (0.0 and -0.0, 1 and
    1.0), so nothing is shared by value."""
    ident = _identity_json(identity) if identity is not None else None
    memo = call._key_memo
    if memo is not None and memo[0] == ident:
        return memo[1]
    slot = (ident, call.prompt)
    head = _PREFIXES.get(slot)
    if head is None:
        head = hashlib.sha256(b'{"model":' + ident + b',"prompt":' if ident is not None
                              else b'{"prompt":')
        head.update(orjson.dumps(call.prompt.key_material(), option=_SORT))
        _PREFIXES[slot] = head
        if len(_PREFIXES) > _MAX_PREFIXES:
            del _PREFIXES[next(iter(_PREFIXES))]  # the oldest
    h = head.copy()
    h.update(b',"sample":' + orjson.dumps(call.sample_index) + b',"sampling":'
             + _sampling_json(call.sampling) + b"}")
    key = h.hexdigest()
    object.__setattr__(call, "_key_memo", (ident, key))  # a frozen dataclass's own cache
    return key


def _identity_json(identity: dict[str, Any]) -> bytes:
    """An identity's JSON, kept per dict object (identities are built once per model and
    never changed)."""
    return _kept_json(_IDENTITIES, identity, dict)


def _sampling_json(sampling: Sampling) -> bytes:
    """A Sampling's JSON, kept per object as identities are (keyed by the object, not its
    value: 0.0 == -0.0 and 1 == 1.0, but their JSON differs)."""
    return _kept_json(_SAMPLINGS, sampling, _TO_DICT)


_TO_DICT = methodcaller("to_dict")


def _kept_json(cache: dict[int, tuple[Any, bytes]], obj: Any,
               to_data: Callable[[Any], Any]) -> bytes:
    """The sorted-key JSON of `to_data(obj)`, kept per object (by id; the cache holds the
    object, so its id cannot be reused while cached); at most 256 objects."""
    hit = cache.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    raw = orjson.dumps(to_data(obj), option=_SORT)
    if len(cache) >= 256:
        cache.clear()
    cache[id(obj)] = (obj, raw)
    return raw
