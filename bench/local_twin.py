"""Twins of a `local` intern for benchmarks and tests: the same weights, other batching options."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from backends.local import LocalRollout

TWIN_OPTIONS = ("max_batch", "prefix_cache", "prefix_cache_size", "seed")


def twin(rollout: LocalRollout, **options: Any) -> LocalRollout:
    """The same model with batching options changed (e.g. `prefix_cache=False`), sharing the
    rollout's weights and model lock: loads the weights now if needed, blocking, so not from
    the event loop. Each twin keeps its own LRU and stats."""
    bad = sorted(set(options) - set(TWIN_OPTIONS))
    if bad:
        raise ValueError(f"a twin can change only {', '.join(TWIN_OPTIONS)}, not {bad}")
    config = replace(rollout.config, options={**rollout.config.options, **options})
    other = LocalRollout(config, rollout.role)
    other.runner.share_model(rollout.runner)
    return other
