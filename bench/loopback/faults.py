"""Fault injection for the loopback server: which faults exist, the seeded draw, and the reply
each fault gives (429/5xx, slow, dropped, malformed, 4xx, out of quota, a generation the server
aborted, a reply stopped by a content filter), per target."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bench import targets
from bench.loopback.wire import Response, json_response

FAULT_KINDS = frozenset({"400", "401", "404", "429", "500", "503", "slow", "drop", "malformed",
                         "quota", "abort", "content_filter"})
# Faults answered with a 200 whose reply says so (the request is otherwise served as usual):
# `abort` cuts the text and sets finish reason "abort" (a chat reply; the first item of a
# /generate batch, as SGLang aborts one request of a batch); `content_filter` (chat only: a
# /generate request is served normally) empties the content, finish reason "content_filter".
IN_REPLY = frozenset({"slow", "abort", "content_filter"})


@dataclass(frozen=True)
class Faults:
    """Fault injection. Each request draws from an RNG seeded by (seed, request hash, how many
    times that request was seen), so faults do not depend on arrival order and retries redraw.

    rate: chance that a chat or /generate request fails; kinds: what it fails with (one at
    random); forced: model -> kind applied to every request for that model; slow_s: how long a
    `slow` request sleeps before answering; retry_after_s: the Retry-After header of a 429.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500", "503", "drop", "malformed")
    forced: Mapping[str, str] = field(default_factory=dict)
    slow_s: float = 1.0
    retry_after_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be in [0, 1], got {self.rate}")
        bad = sorted((set(self.kinds) | set(self.forced.values())) - FAULT_KINDS)
        if bad:
            raise ValueError(f"unknown fault kind(s) {', '.join(bad)}; "
                             f"allowed: {', '.join(sorted(FAULT_KINDS))}")
        if self.rate > 0 and not self.kinds:
            raise ValueError("a fault rate above 0 needs at least one fault kind")
        object.__setattr__(self, "kinds", tuple(sorted(self.kinds)))
        object.__setattr__(self, "forced", dict(self.forced))


def as_faults(value: Faults | Mapping[str, Any] | None) -> Faults:
    """A Faults from a Faults, a dict of its fields, or None (no faults)."""
    if value is None:
        return Faults()
    if isinstance(value, Faults):
        return value
    d = dict(value)
    if "kinds" in d:
        d["kinds"] = tuple(str(k) for k in d["kinds"])
    return Faults(**d)


def pick(faults: Faults, model: str, rng: random.Random) -> str | None:
    """The fault kind for one request to `model`: forced for it, else drawn at `faults.rate`."""
    kind = faults.forced.get(model)
    if kind is None and faults.rate > 0 and rng.random() < faults.rate:
        kind = faults.kinds[rng.randrange(len(faults.kinds))]
    return kind


def status(kind: str, target: str) -> int:
    """The HTTP status a fault is logged with (0: the connection is dropped)."""
    return (0 if kind == "drop" else 200 if kind == "malformed" else
            targets.out_of_quota(target)[0] if kind == "quota" else int(kind))


def response(kind: str, *, model: str, target: str, faults: Faults, chat: bool) -> Response:
    """What the server sends for fault `kind` (chat or /generate wire format, as `target`)."""
    if kind == "drop":
        return Response(drop=True)
    if kind == "malformed":
        body = b'{"id": "x", "object": "chat.completion", "choices": [{"ind' if chat else \
            b'[{"text": "### The final ans'
        return Response(200, body, {"Content-Type": "application/json"})
    if kind == "quota":
        code, body = targets.out_of_quota(target)
        return json_response(code, body)
    if kind == "429":
        code, body, extra = targets.rate_limited(target, faults.retry_after_s)
        return json_response(code, body, **extra)
    message = {"400": "bad request (injected)", "401": "invalid api key",
               "404": f"The model `{model}` does not exist.", "500": "internal error "
               "(injected)", "503": "service unavailable (injected)"}[kind]
    return json_response(int(kind), {"error": {"message": message}} if chat or kind != "400"
                         else {"error": message})
