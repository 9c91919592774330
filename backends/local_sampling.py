"""Per-row sampling for batched `generate` (torch and transformers, worker threads only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mics.types import Sampling


class RowSampler:
    """Logits processor that picks each row's token with its own parameters; returns a one-hot.

    Greedy rows take the argmax; sampled rows apply their temperature, top-k and top-p and draw
    from their own generator, so a draw depends only on the row's seed and logits. `generate`'s
    own warpers and multinomial then keep that single token.
    """

    def __init__(self, samplings: Sequence[Sampling], seeds: Sequence[int], device: Any) -> None:
        import torch

        self._groups: dict[Sampling, list[int]] = {}
        for i, s in enumerate(samplings):
            self._groups.setdefault(s, []).append(i)
        self._warps = {s: warpers(s) for s in self._groups if not s.greedy}
        self._gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        picks = torch.empty(scores.shape[0], 1, dtype=torch.long, device=scores.device)
        for sampling, rows in self._groups.items():
            if sampling.greedy:
                picks[rows] = scores[rows].argmax(dim=-1, keepdim=True)
                continue
            idx = torch.tensor(rows, device=scores.device)
            warped = self._warps[sampling](input_ids[idx], scores[idx])
            probs = torch.softmax(warped.float(), dim=-1)
            for j, i in enumerate(rows):
                picks[i] = torch.multinomial(probs[j], 1, generator=self._gens[i])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


def warpers(sampling: Sampling) -> Any:
    """transformers' temperature, top-k and top-p warpers for one sampled row."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out: list[Any] = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        out.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=sampling.top_p))
    return LogitsProcessorList(out)


def generation_args(samplings: Sequence[Sampling], seeds: Sequence[int], device: Any,
                    eos_ids: list[int], pad_id: int) -> tuple[Any, Any]:
    """An explicit GenerationConfig (the folder's sampling defaults are never used, B8) and,
    unless every row is greedy, the row sampler."""
    from transformers import GenerationConfig, LogitsProcessorList

    first = samplings[0]
    explicit: dict[str, Any] = {"do_sample": False}
    processors = None
    if not all(s.greedy for s in samplings):
        if all(s == first for s in samplings):
            explicit.update(temperature=first.temperature, top_p=first.top_p,
                            top_k=first.top_k if first.top_k > 0 else 0)  # 0: no top-k
        else:  # mixed rows: the row sampler does all the work, generate's warpers are no-ops
            explicit.update(temperature=1.0, top_p=1.0, top_k=0)
        explicit["do_sample"] = True
        processors = LogitsProcessorList([RowSampler(samplings, seeds, device)])
    gen = GenerationConfig(
        max_new_tokens=max(s.max_tokens for s in samplings), eos_token_id=eos_ids,
        pad_token_id=pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, **explicit,
    )
    return gen, processors
