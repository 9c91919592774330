"""`mics doctor`: is every configured endpoint reachable and serving real text?

Each model gets one short call with the output limit the run will use for its role, so a
thinking model whose reasoning eats the limit (Gemini 2.5 Pro) fails here, not mid-run. An
empty reply fails the check. The message also says at what size mentor images are sent."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import anyio

from backends.base import BackendError, Call
from backends.registry import build_chat, build_rollout
from backends.sglang_router import describe_routers
from mics.config import ConfigError, ModelConfig, RunConfig, SearchConfig
from mics.types import Prompt, Reply, Sampling, Text

PING = Call(Prompt("You are a health check.", (Text("Reply with the word OK."),)),
            Sampling(temperature=0.0, max_tokens=16))


def probe(role: str, search: SearchConfig) -> Call:
    """The health-check call with the output limit the run uses for this role."""
    limit = {"mentor": search.mentor_max_tokens, "judge": search.judge_max_tokens,
             "intern": min(16, search.intern_max_tokens)}[role]
    return replace(PING, sampling=replace(PING.sampling, max_tokens=limit))


def image_note(model: Any) -> str:
    """At what size this model is sent images (options.image_max_side; 0 = full size)."""
    options = getattr(model, "options", None)
    side = (options.get("image_max_side") if isinstance(options, dict)
            else getattr(options, "image_max_side", None))  # a backend's typed options
    if not isinstance(side, int):
        return ""
    return (f"images downsized to {side} px on the longest side (options.image_max_side)"
            if side else "images sent at full size")


def server_note(model: Any) -> str:
    """The SGLang version(s) an intern's servers reported, if any."""
    versions = getattr(model, "versions", None)
    if not isinstance(versions, dict) or not versions:
        return ""
    seen = sorted({".".join(map(str, v)) if v else "unknown" for v in versions.values()})
    return f"SGLang {', '.join(seen)}"


def _text_of(reply: Reply, cfg: ModelConfig) -> None:
    if not reply.text.strip():
        raise ConfigError(f"{cfg.name}: the probe got an empty reply (finish "
                          f"{reply.finish_reason!r}): the endpoint answers but returns no text")


@dataclass
class Check:
    role: str
    name: str
    backend: str
    where: str
    ok: bool
    latency_s: float
    message: str


async def check_model(role: str, cfg: ModelConfig, search: SearchConfig | None = None
                      ) -> Check:
    """Probe one model once as `role`, with the run's sampling limits; never raises: the
    check says what failed."""
    where = cfg.base_url or cfg.model
    call = probe(role, search or SearchConfig())
    routers: list[str] = []
    start = time.perf_counter()
    try:
        if role == "intern":
            model = build_rollout(cfg)
            try:
                [result] = await model.rollout([call])
                if isinstance(result, BackendError):
                    raise result
                routers = [f"via {line}" for line in await describe_routers(model)]
            finally:
                await model.aclose()
        else:
            model = build_chat(cfg, role)
            try:
                result = await model.complete(call)
            finally:
                await model.aclose()
        _text_of(result, cfg)
        notes = [server_note(model), image_note(model) if role != "judge" else "", *routers]
        note = "; ".join(n for n in notes if n)
    except (BackendError, ConfigError) as e:
        return Check(role, cfg.name, cfg.backend, where, False,
                     time.perf_counter() - start, str(e))
    return Check(role, cfg.name, cfg.backend, where, True, time.perf_counter() - start,
                 f"ok; {note}" if note else "ok")


async def doctor(config: RunConfig) -> list[Check]:
    """One probe per model, all concurrently; results in config order."""
    jobs = [("mentor", m) for m in config.mentors] + [("intern", i) for i in config.interns]
    jobs.append(("judge", config.judge))
    results: list[Check | None] = [None] * len(jobs)

    async def one(i: int, role: str, cfg: ModelConfig) -> None:
        results[i] = await check_model(role, cfg, config.search)

    async with anyio.create_task_group() as tg:
        for i, (role, cfg) in enumerate(jobs):
            tg.start_soon(one, i, role, cfg)
    return [r for r in results if r is not None]
