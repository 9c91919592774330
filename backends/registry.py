"""Config -> backend instances. The `backend` key picks the class; model names never do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backends.base import ChatModel, RolloutModel
from mics.config import ConfigError, ModelConfig


def _simulated(cfg: ModelConfig, role: str) -> Any:
    from backends.simulated import SimulatedModel

    return SimulatedModel(cfg, role)


def _openai(cfg: ModelConfig, role: str) -> Any:
    from backends.openai_chat import OpenAIChat

    return OpenAIChat(cfg, role)


def _exact(cfg: ModelConfig, role: str) -> Any:
    from backends.exact import ExactJudge

    return ExactJudge(cfg, role)


def _local(cfg: ModelConfig, role: str) -> Any:
    from backends.local import LocalRollout

    return LocalRollout(cfg, role)


def _sglang(cfg: ModelConfig, role: str) -> Any:
    from backends.sglang import SGLangRollout

    return SGLangRollout(cfg)


# backend name -> factory(config, role); role is "mentor", "judge" or "intern".
CHAT_BACKENDS: dict[str, Callable[[ModelConfig, str], Any]] = {
    "simulated": _simulated, "openai": _openai, "exact": _exact,
}
ROLLOUT_BACKENDS: dict[str, Callable[[ModelConfig, str], Any]] = {
    "simulated": _simulated, "local": _local, "openai": _openai, "sglang": _sglang,
}


def _build(table: dict[str, Callable[[ModelConfig, str], Any]], cfg: ModelConfig, role: str):
    factory = table.get(cfg.backend)
    if factory is None:
        raise ConfigError(
            f"model {cfg.name!r}: backend {cfg.backend!r} cannot serve a {role}; "
            f"choose one of {', '.join(sorted(table))}"
        )
    try:
        return factory(cfg, role)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_chat(cfg: ModelConfig, role: str) -> ChatModel:
    """A chat model for a mentor or the judge."""
    return _build(CHAT_BACKENDS, cfg, role)


def build_rollout(cfg: ModelConfig) -> RolloutModel:
    """A batched rollout model for an intern."""
    return _build(ROLLOUT_BACKENDS, cfg, "intern")
