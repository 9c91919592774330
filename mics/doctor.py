"""`mics doctor`: is every configured endpoint reachable and serving, with a one-token call?"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from backends.base import BackendError, Call
from backends.registry import build_chat, build_rollout
from backends.sglang_router import describe_routers
from mics.config import ConfigError, ModelConfig, RunConfig
from mics.types import Prompt, Sampling, Text

PING = Call(Prompt("You are a health check.", (Text("Reply with the word OK."),)),
            Sampling(temperature=0.0, max_tokens=1))


@dataclass
class Check:
    role: str
    name: str
    backend: str
    where: str
    ok: bool
    latency_s: float
    message: str


async def _check(role: str, cfg: ModelConfig) -> Check:
    where = cfg.base_url or cfg.model
    start = time.perf_counter()
    note = ""
    try:
        if role == "intern":
            model = build_rollout(cfg)
            try:
                [result] = await model.rollout([PING])
                if isinstance(result, BackendError):
                    raise result
                note = "".join(f"; via {line}" for line in await describe_routers(model))
            finally:
                await model.aclose()
        else:
            model = build_chat(cfg, role)
            try:
                await model.complete(PING)
            finally:
                await model.aclose()
    except (BackendError, ConfigError) as e:
        return Check(role, cfg.name, cfg.backend, where, False,
                     time.perf_counter() - start, str(e))
    return Check(role, cfg.name, cfg.backend, where, True, time.perf_counter() - start,
                 "ok" + note)


async def doctor(config: RunConfig) -> list[Check]:
    """One probe per model, all concurrently; results in config order."""
    jobs = [("mentor", m) for m in config.mentors] + [("intern", i) for i in config.interns]
    jobs.append(("judge", config.judge))
    results: list[Check | None] = [None] * len(jobs)

    async def one(i: int, role: str, cfg: ModelConfig) -> None:
        results[i] = await _check(role, cfg)

    async with anyio.create_task_group() as tg:
        for i, (role, cfg) in enumerate(jobs):
            tg.start_soon(one, i, role, cfg)
    return [r for r in results if r is not None]
