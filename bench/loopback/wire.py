"""Wire formats the loopback server speaks: responses, SGLang `/generate` request checks,
OpenAI chat message parsing, ChatML unwrapping, stop/length clipping and request digests."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from backends.stops import clip_at_stop
from bench.loopback.tokens import PLACEHOLDER_RE, tokenize


@dataclass
class Response:
    """One HTTP answer (or a dropped connection), sent after `delay_s`."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False


def json_response(status: int, obj: Any, **headers: str) -> Response:
    """A JSON body with `status` and extra `headers`."""
    return Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json",
                                                        **headers})


class BadRequest(Exception):
    """A request the server answers with 400 and this message."""


# ---------------------------------------------------------------- SGLang /generate

SGLANG_SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
    "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)
_INT_KEYS = {"max_new_tokens", "top_k", "min_new_tokens", "n", "sampling_seed", "beam_width",
             "stream_interval"}
_NUM_KEYS = {"temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
             "repetition_penalty"}


def check_sampling(sp: Any) -> dict[str, Any]:
    """One item's `sampling_params`, refused as SGLang's strict parser refuses them."""
    if not isinstance(sp, dict):
        raise BadRequest(f"invalid type: {type(sp).__name__}, expected struct SamplingParams")
    for key, value in sp.items():
        if key not in SGLANG_SAMPLING_KEYS:
            expected = ", ".join(f"`{k}`" for k in SGLANG_SAMPLING_KEYS)
            raise BadRequest(f"unknown field `{key}`, expected one of {expected}")
        if value is None:
            continue
        if key in _INT_KEYS and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadRequest(f"invalid type: {value!r} for `{key}`, expected an integer")
        if key in _NUM_KEYS and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise BadRequest(f"invalid type: {value!r} for `{key}`, expected a number")
        if key == "stop" and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(s, str) for s in value))):
            raise BadRequest(f"invalid type: {value!r} for `stop`, expected a string or list")
    if sp.get("n") not in (None, 1):
        raise BadRequest("the loopback server supports only n=1")
    _check_ranges(sp)
    return sp


def _check_ranges(sp: dict[str, Any]) -> None:
    """The range checks of SGLang's `SamplingParams.verify` (a 400 for the whole request)."""
    t, p, k, m = (sp.get(key) for key in ("temperature", "top_p", "top_k", "max_new_tokens"))
    if t is not None and t < 0:
        raise BadRequest(f"temperature must be non-negative, got {t}.")
    if p is not None and not 0 < p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {p}.")
    if k is not None and k != -1 and k < 1:
        raise BadRequest(f"top_k must be -1 (disable), or at least 1, got {k}.")
    if m is not None and m < 0:
        raise BadRequest(f"max_new_tokens must be at least 0, got {m}.")


def per_item(value: Any, n: int, what: str) -> list[Any]:
    """A batch field: one value per item, or one value for all `n`."""
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"The length of {what} should be equal to the batch size")
        return value
    return [value] * n


_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|\Z)", re.S)


@lru_cache(maxsize=512)  # a prompt comes once per sample; the bench's server reads it twice
def sim_text_from_generate(text: str) -> str:
    """The text a simulator reads from a /generate prompt: ChatML is unwrapped to
    `system + "\\n" + user + assistant continuation` and vision placeholders become `<image>`,
    so a client that renders Qwen-style ChatML gets the same replies as in-process."""
    turns = _CHATML.findall(text)
    if turns:
        system = "".join(body for role, body in turns if role == "system")
        rest = "".join(body for role, body in turns if role != "system")
        text = f"{system}\n{rest}"
    return PLACEHOLDER_RE.sub("<image>", text)


def clip(text: str, max_tokens: int | None, stop: Any) -> tuple[str, dict[str, Any]]:
    """`text` cut at the first stop string, then at `max_tokens` tokens; with the finish reason."""
    text, matched = clip_at_stop(text, stop)
    finish: dict[str, Any] = {"type": "stop", "matched": matched}
    if max_tokens is not None:
        toks = tokenize(text)
        if len(toks) > max_tokens:
            text, finish = "".join(toks[:max_tokens]), {"type": "length", "length": max_tokens}
    return text, finish


_DIGEST_JSON = json.JSONEncoder(sort_keys=True, default=str)  # = json.dumps(..., these options)


def digest(*parts: Any) -> str:
    """A content hash of JSON-able parts (request keys, fault and latency draws)."""
    return hashlib.sha256(_DIGEST_JSON.encode(parts).encode()).hexdigest()


# ---------------------------------------------------------------- OpenAI chat


def chat_prompt(messages: Any) -> tuple[str, list[str]]:
    """The text a simulator reads from OpenAI chat `messages` (system, a newline, the rest;
    images as `<image>`) and the image URLs in order."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    system, rest, images = "", "", []
    for msg in messages:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequest("each message needs a `role` and `content`")
        text = ""
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind in ("image_url", "input_image"):
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise BadRequest("image_url part without a url")
                    images.append(url)
                    text += "<image>"
                else:
                    raise BadRequest(f"unsupported content part: {kind!r}")
        else:
            raise BadRequest("message content must be a string or a list of parts")
        if msg["role"] == "system":
            system += text
        else:
            rest += text
    return f"{system}\n{rest}", images


def chat_sampling(body: dict[str, Any]) -> tuple[float, int | None]:
    """(temperature, max_tokens) of a chat request, checked."""
    temperature = body.get("temperature", 1.0)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise BadRequest(f"`temperature` must be a number, got {temperature!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int)
                                   or isinstance(max_tokens, bool) or max_tokens < 0):
        raise BadRequest(f"`max_tokens` must be a non-negative integer, got {max_tokens!r}")
    return float(temperature), max_tokens


# ---------------------------------------------------------------- /generate items


def generate_images(data: Any, single: bool, n: int) -> list[list[str]]:
    """The images of each of `n` items from `image_data` (one item's list when `single`)."""
    if data is None:
        return [[] for _ in range(n)]
    if single:
        out = [data if isinstance(data, list) else [data]]
    else:
        if not isinstance(data, list) or len(data) != n:
            raise BadRequest("The length of image_data should be equal to the batch size")
        out = [d if isinstance(d, list) else ([] if d is None else [d]) for d in data]
    if not all(isinstance(u, str) for imgs in out for u in imgs):
        raise BadRequest("image_data items must be strings (data URLs, base64 or paths)")
    return out


def _uuid4_hex(n: int) -> list[str]:
    """`[uuid.uuid4().hex for _ in range(n)]` with one `os.urandom` call."""
    raw = bytearray(os.urandom(16 * n))
    out = []
    for i in range(0, 16 * n, 16):
        raw[i + 6] = raw[i + 6] & 0x0F | 0x40  # version 4
        raw[i + 8] = raw[i + 8] & 0x3F | 0x80  # RFC 4122 variant
        out.append(raw[i:i + 16].hex())
    return out


def generate_rids(rid: Any, n: int) -> list[str]:
    """One request id per item: the given ones, `rid_i` for a string, else fresh ones."""
    if rid is None:
        return _uuid4_hex(n)
    if isinstance(rid, str):
        return [rid] if n == 1 else [f"{rid}_{i}" for i in range(n)]
    if not isinstance(rid, list) or len(rid) != n or len(set(rid)) != n:
        raise BadRequest("`rid` must be a string or a list of unique ids, one per item")
    return [str(r) for r in rid]
