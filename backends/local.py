"""The `local` backend: interns run in-process with HF transformers (text LMs and Qwen2(.5)-VL).

Concurrent `rollout()` calls are queued; whoever holds the model lock takes the oldest group of
calls with the same `max_tokens` (up to `max_batch`) and runs it as one batched `generate` in a
worker thread, so the event loop never blocks. Greedy and sampled calls share a batch: every row
is sampled with its own parameters and generator (see `local_sampling.RowSampler`). torch and
transformers are imported lazily (on the first rollout, in the worker), never at package import.

The parts live in their own modules: options, model folder and identity (`local_options`),
per-row sampling (`local_sampling`), the prefix cache and token trie (`local_prefix`), loading
the model (`local_loading`), the torch runner (`local_runner`) and the async batching queue
(`local_queue`); this module puts them together as `LocalRollout`.

Options (`[[interns]].options`):
  device      "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N", "mps"
  dtype       "auto" (bfloat16 on CUDA when supported, float16 on other GPUs, float32 on CPU),
              "float32", "bfloat16", "float16"
  max_batch   most calls per `generate` (default 16)
  min_pixels, max_pixels  image processor pixel budget (default 256*28*28 / 1280*28*28)
  seed        base of every call's sampling seed (default 0)
  kind        "auto" (a `vision_config` in config.json means "vl"), "text", "vl"
  prefix_cache       reuse the KV cache of shared prompt prefixes (default true)
  prefix_cache_size  prefix caches kept across batches, LRU (default 32; 0: within a batch only)

Rendering: one system message, then one user message whose content is the prompt's parts in
order (images as {"type": "image"}), with `add_generation_prompt=True`. A text LM cannot see
images: its image parts are dropped and the user message is the concatenated text.

Prefix KV reuse (`prefix_cache`): each distinct prompt of a batch is tokenized on its own, and the
prompts minus their last token form a token trie. Every trie node (the system + images + question
block shared by one question's rows, the selected path shared by one depth's candidates, then each
row) is prefilled once, level by level (one forward pass per level, or a few when segment lengths
differ by more than ~10%, so padding stays small), starting from its parent's KV or from a longer
match in a bounded LRU of earlier nodes (an entry longer than the match is cropped); a shared node
saving under 32 tokens is not worth its own level. Then ONE batched `generate` runs with every
row's cache left-padded to a common length (attention mask 0 on the padding) and only each row's
last prompt token uncached; explicit position ids keep every token at its unpadded position. Shared
nodes and every row's context go into the LRU (the next depth extends one of this depth's
candidates; an entry that is a prefix of another is dropped, as cropping the longer one gives it).
Qwen2-VL works the same way: image tokens are keyed by the image's content hash, the rows' 3D mrope
positions come from the model's `get_rope_index`, and pixel values go with the segment holding the
image; greedy outputs matched reuse-off exactly (Qwen2-VL in the tests, Qwen2.5-VL in a one-off
check). Other VL architectures, and models whose KV cache is not a plain `DynamicCache` (sliding-
window layers), run without reuse. `LocalRollout.stats` counts prompt tokens, prefill tokens
actually computed (padding included), cached tokens and LRU hits/misses; `Usage.cached_tokens` is
the number of a reply's prompt tokens served from the LRU.

Determinism: greedy calls use no randomness, so a reply is exactly reproducible for the same batch;
across batch compositions and with or without prefix reuse it matched one-at-a-time generation in
every test (only floating-point reassociation under different padding could ever move an argmax
tie). Sampled calls draw every token from their own torch.Generator, seeded from (seed, hash of
prompt, sampling, sample index), so on a given device and dtype a sampled reply does not depend on
which calls shared its batch. The folder's generation_config sampling defaults are never used:
every parameter is explicit (B8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends.base import Call
from backends.keys import call_key
from backends.local_options import (
    LocalOptions,
    call_seed,
    model_dir,
    resolve_kind,
    weights_fingerprint,
)
from backends.local_prefix import KV, PrefixLRU, PrefixMatch
from backends.local_queue import BatchQueue
from backends.local_runner import Runner
from mics.config import ModelConfig
from mics.types import Reply

__all__ = ["KV", "LocalOptions", "LocalRollout", "PrefixLRU", "PrefixMatch", "call_hash",
           "call_seed", "weights_fingerprint"]


def call_hash(call: Call) -> str:
    """Content hash of what determines one call's reply (prompt, sampling, sample index)."""
    return call_key(None, call)


class LocalRollout:
    """An intern served in-process by transformers; see the module docstring for options."""

    def __init__(self, config: ModelConfig, role: str = "intern") -> None:
        self.config = config
        self.role = role
        self.options = LocalOptions.parse(config)
        self.path = model_dir(config)
        self.kind = resolve_kind(self.path, self.options.kind)
        self._identity = {
            "backend": "local", "model": config.model, "weights": weights_fingerprint(self.path),
            "options": self.options.reply_options(),
        }
        self.runner = Runner(config.name, self.path, self.kind, self.options)
        self._queue = BatchQueue(config.name, lambda calls, seeds: self.runner.run(calls, seeds),
                                 max_batch=self.options.max_batch, seed=self.options.seed)

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @property
    def stats(self) -> dict[str, int]:
        """Live counters (see `local_runner.STATS`): prefill_tokens, prefix_hits, ..."""
        return self.runner.stats

    def reset_stats(self) -> None:
        """Zero the counters (the LRU is kept)."""
        for key in self.runner.stats:
            self.runner.stats[key] = 0

    async def rollout(self, calls: Sequence[Call]) -> list[Reply]:
        """One reply per call, in order; concurrent callers share batched `generate`s."""
        return await self._queue.submit(calls)

    async def aclose(self) -> None:
        await self._queue.run_alone(self.runner.close)
