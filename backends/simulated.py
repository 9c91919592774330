"""The `simulated` backend: SIMULATOR models in-process (see backends.simulator)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from typing import Any

import anyio

from backends import simulator
from backends.base import Call
from backends.simulator import SimulatedOptions
from mics.config import ConfigError, ModelConfig, parse_options
from mics.types import Image, Prompt, Reply, Usage


def render_text(prompt: Prompt) -> str:
    """The text a simulated model reads: system, then user parts (images as placeholders)."""
    body = "".join("<image>" if isinstance(p, Image) else p.text for p in prompt.parts)
    return f"{prompt.system}\n{body}"


def parse_simulated_options(cfg: ModelConfig, role: str) -> SimulatedOptions:
    """`options` of a simulated `role` model as its frozen dataclass (simulator.OPTION_TYPES),
    checked like the rest of the config: ConfigError naming the model and the key."""
    where = f"model {cfg.name!r}"
    opts = parse_options(simulator.OPTION_TYPES[role], cfg.options, where, f"simulated {role}")
    for name in ("leak_rate", "unparsable_rate"):
        rate = getattr(opts, name, None)
        if rate is not None:  # optional, so the shared parser (which types by default) skips it
            if isinstance(rate, bool) or not isinstance(rate, int | float):
                raise ConfigError(f"{where}: options.{name}: expected float, got "
                                  f"{type(rate).__name__} {rate!r}")
            opts = replace(opts, **{name: float(rate)})  # type: ignore[arg-type]
    if opts.latency_s < 0:
        raise ConfigError(f"{where}: options.latency_s must be >= 0")
    return opts


def simulated_identity(cfg: ModelConfig, role: str, opts: SimulatedOptions) -> dict[str, Any]:
    """What goes into the memo key: backend, model, role and the options that change replies.

    Option values are the user's own (an integer stays an integer; the typed options hold it
    as a float), so the keys of runs stored before the options were typed stay the same."""
    given = {f.name: cfg.options.get(f.name, getattr(opts, f.name)) for f in fields(opts)}
    return {"backend": "simulated", "model": cfg.model, "role": role,
            "options": {k: v for k, v in sorted(given.items())
                        if k != "latency_s" and v is not None}}  # unset: as before


class SimulatedModel:
    """SIMULATOR mentor, intern or judge. Deterministic; optional fixed latency per call."""

    def __init__(self, config: ModelConfig, role: str) -> None:
        self.config = config
        self.role = role
        self.options: SimulatedOptions = parse_simulated_options(config, role)
        self._identity = simulated_identity(config, role, self.options)
        self._params = asdict(self.options)  # what simulator.reply reads

    def identity(self) -> dict[str, Any]:
        return self._identity

    def _reply_text(self, call: Call) -> str:
        return simulator.reply(self.role, render_text(call.prompt), self._params,
                               seed=self.options.seed, model=self.config.model,
                               temperature=call.sampling.temperature,
                               sample_index=call.sample_index)

    def _reply(self, call: Call) -> Reply:
        text = self._reply_text(call)
        usage = Usage(  # the simulated latency is reported, so replies stay deterministic
            prompt_tokens=simulator.token_count(render_text(call.prompt)),
            completion_tokens=simulator.token_count(text),
            latency_s=self.options.latency_s,
        )
        return Reply(text=text, usage=usage)

    async def complete(self, call: Call) -> Reply:
        if self.options.latency_s:
            await anyio.sleep(self.options.latency_s)
        return self._reply(call)

    async def rollout(self, calls: Sequence[Call]) -> list[Reply]:
        if self.options.latency_s:
            await anyio.sleep(self.options.latency_s)
        return [self._reply(c) for c in calls]

    async def aclose(self) -> None:
        return None
