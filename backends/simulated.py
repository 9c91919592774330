"""The `simulated` backend: SIMULATOR models in-process (see backends.simulator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from backends import simulator
from backends.base import Call
from mics.config import ModelConfig
from mics.types import Image, Prompt, Reply, Usage

_COMMON_OPTIONS = {"latency_s": 0.0, "seed": 0}


def render_text(prompt: Prompt) -> str:
    """The text a simulated model reads: system, then user parts (images as placeholders)."""
    body = "".join("<image>" if isinstance(p, Image) else p.text for p in prompt.parts)
    return f"{prompt.system}\n{body}"


class SimulatedModel:
    """SIMULATOR mentor, intern or judge. Deterministic; optional fixed latency per call."""

    def __init__(self, config: ModelConfig, role: str) -> None:
        allowed = {**_COMMON_OPTIONS, **simulator.ROLE_OPTIONS[role]}
        unknown = sorted(set(config.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"model {config.name!r}: unknown simulated option(s) {', '.join(unknown)}; "
                f"allowed for a {role}: {', '.join(sorted(allowed))}"
            )
        self.config = config
        self.role = role
        self.options: dict[str, Any] = {**allowed, **config.options}

    def identity(self) -> dict[str, Any]:
        return {"backend": "simulated", "model": self.config.model, "role": self.role,
                "options": {k: v for k, v in sorted(self.options.items())
                            if k != "latency_s" and v is not None}}  # unset: as before

    def _reply_text(self, call: Call) -> str:
        return simulator.reply(self.role, render_text(call.prompt), self.options,
                               seed=self.options["seed"], model=self.config.model,
                               temperature=call.sampling.temperature,
                               sample_index=call.sample_index)

    def _reply(self, call: Call) -> Reply:
        text = self._reply_text(call)
        usage = Usage(  # the simulated latency is reported, so replies stay deterministic
            prompt_tokens=simulator.token_count(render_text(call.prompt)),
            completion_tokens=simulator.token_count(text),
            latency_s=float(self.options["latency_s"]),
        )
        return Reply(text=text, usage=usage)

    async def complete(self, call: Call) -> Reply:
        if self.options["latency_s"]:
            await anyio.sleep(self.options["latency_s"])
        return self._reply(call)

    async def rollout(self, calls: Sequence[Call]) -> list[Reply]:
        if self.options["latency_s"]:
            await anyio.sleep(self.options["latency_s"])
        return [self._reply(c) for c in calls]

    async def aclose(self) -> None:
        return None
