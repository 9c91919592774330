"""The `local` backend's torch runner: runs one batch of calls as one batched `generate`, with
or without prefix KV reuse (see backends.local), on the model `local_loading` loads on first
use. Every method runs in a worker thread under the runner's lock; torch and transformers are
imported there, lazily.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backends.base import BackendError, Call, OutOfMemoryError, PermanentError, TransientError
from backends.hf import LOAD_LOCK
from backends.local_loading import Loaded, load_model, reusable
from backends.local_options import LocalOptions
from backends.local_prefix import (
    KV,
    Node,
    PrefixLRU,
    image_marker,
    plan_trie,
    size_chunks,
    true_runs,
    walk_trie,
)
from backends.local_sampling import generation_args
from backends.messages import chat_messages, image_slot
from backends.stops import clip_at_stop
from mics.types import Prompt, Reply, Sampling, Usage

# Runner.stats: prefill_tokens counts positions the model computed (padding included);
# prefix_hits / prefix_misses count lookups of batch roots and shared trie nodes.
STATS = ("batches", "calls", "prompt_tokens", "prefill_tokens", "cached_tokens", "prefix_hits",
         "prefix_misses", "prefix_entries", "prefix_evictions", "fallbacks")


def local_messages(prompt: Prompt, vl: bool) -> list[dict[str, Any]]:
    """System + one user turn; a text LM gets the text parts only (images dropped)."""
    if vl:
        return chat_messages(prompt, image_slot)
    return chat_messages(prompt, as_text=True)


class _NoReuse(Exception):
    """This batch cannot take the prefix path; it runs without reuse."""


@dataclass
class PromptRow:
    """One prompt tokenized on its own, as the prefix-reuse path sees it."""

    key: tuple[int, ...]  # token ids; image tokens replaced by a negative id per image content
    ids: Any  # LongTensor [n]
    pos: Any  # LongTensor [R, n]: R=1 text positions; R=4 text + mrope (t, h, w) positions
    spans: list[tuple[int, int]]  # image token spans, in prompt order
    pixels: list[Any]  # per image: its rows of pixel_values
    grids: list[Any]  # per image: its grid_thw


@dataclass(frozen=True)
class EncodedBatch:
    """Prompts as one left-padded batch, as `generate` gets them without prefix reuse."""

    input_ids: Any  # LongTensor [batch, n]
    attention_mask: Any  # LongTensor [batch, n]: 0 on padding
    pixel_values: Any = None  # VL: the patches of every image, in prompt order
    image_grid_thw: Any = None  # VL: one (t, h, w) grid per image


class Runner:
    """Owns the model and its prefix LRU; every method runs in a worker thread under `lock`.

    `run` is the batch executor: either encode -> `_generate` (no reuse), or `_generate_reuse`
    (prefix trie prefill + one batched generate); then decode.
    """

    def __init__(self, name: str, path: Path, kind: str, options: LocalOptions) -> None:
        self.name, self.path, self.kind, self.options = name, path, kind, options
        self.lock = threading.Lock()
        self.loaded: Loaded | None = None
        self.lru = PrefixLRU(options.prefix_cache_size)
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self.last_fallback = ""  # why the last batch ran without reuse

    # what the model sees (for tests and tools: the batch executor below does the same)

    def encode_prompts(self, prompts: Sequence[Prompt]) -> list[PromptRow]:
        """Each prompt tokenized alone as the prefix-reuse path does (the model is loaded and
        the images are opened here): its token key (image tokens as a marker of the image's
        content), ids, positions, image spans and pixels."""
        with self.lock:
            m = self.load()
            return [self._encode_row(m, p, self._images(p)) for p in prompts]

    def encode_batch(self, prompts: Sequence[Prompt]) -> EncodedBatch:
        """The prompts as one left-padded batch, as the path without prefix reuse sends them
        to `generate`."""
        with self.lock:
            m = self.load()
            enc = self._encode(m, prompts, [self._images(p) for p in prompts])
            return EncodedBatch(enc["input_ids"], enc["attention_mask"], enc.get("pixel_values"),
                                enc.get("image_grid_thw"))

    # loading

    def load(self) -> Loaded:
        """The model, loaded on first use (PermanentError if it cannot be)."""
        if self.loaded is None:
            try:
                with LOAD_LOCK:  # transformers' lazy imports are not thread-safe
                    self.loaded = load_model(self.path, self.kind, self.options)
            except BackendError:
                raise
            except Exception as e:  # bad folder, unsupported architecture, missing files
                raise PermanentError(
                    f"model {self.name!r}: cannot load {str(self.path)!r}: "
                    f"{type(e).__name__}: {e}") from None
        return self.loaded

    def share_model(self, other: Runner) -> None:
        """Serve `other`'s model (loaded now if needed, blocking) under `other`'s lock, so the
        two never generate at once; this runner keeps its own options, LRU and stats."""
        m = other.load()
        self.loaded = replace(m)
        self.lock = other.lock
        self.loaded.kv_layers, self.loaded.reuse = reusable(m.model, m.processor is not None,
                                                            self.options.prefix_cache)

    # the batch executor

    def run(self, calls: Sequence[Call], seeds: Sequence[int]) -> list[Reply | BackendError]:
        """One batch of calls (same max_tokens): a reply or an error per call."""
        with self.lock:
            m = self.load()
            results: list[Reply | BackendError | None] = [None] * len(calls)
            images: list[list[Any]] = []
            ok: list[int] = []
            for i, call in enumerate(calls):
                try:
                    images.append(self._images(call.prompt))
                    ok.append(i)
                except PermanentError as e:
                    results[i] = e
            if ok:
                replies = self._run_batch(m, [calls[i] for i in ok], images,
                                          [seeds[i] for i in ok])
                for i, r in zip(ok, replies, strict=True):
                    results[i] = r
            return results  # type: ignore[return-value]

    def _images(self, prompt: Prompt) -> list[Any]:
        if self.kind != "vl":
            return []
        from PIL import Image as PILImage

        out = []
        for ref in prompt.images():
            try:
                with PILImage.open(ref.path) as img:
                    out.append(img.convert("RGB"))
            except (OSError, ValueError) as e:
                raise PermanentError(f"image {ref.path!r}: cannot open: {e}") from None
        return out

    def _run_batch(self, m: Loaded, calls: Sequence[Call], images: Sequence[list[Any]],
                   seeds: Sequence[int]) -> list[Reply | BackendError]:
        start = time.perf_counter()
        samplings = [c.sampling for c in calls]
        try:
            try:
                if not m.reuse:
                    raise _NoReuse("prefix reuse is off")
                new, prompt_tokens, cached = self._generate_reuse(m, calls, images, seeds)
            except _NoReuse as e:
                if m.reuse:
                    self.stats["fallbacks"] += 1
                    self.last_fallback = str(e)
                inputs = self._encode(m, [c.prompt for c in calls], images)
                new = self._generate(m, inputs, samplings, seeds)
                prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
                cached = [0] * len(calls)
                self.stats["prefill_tokens"] += int(inputs["input_ids"].numel())
        except Exception as e:
            return [self._error(e)] * len(calls)
        latency = round(time.perf_counter() - start, 6)
        self.stats["batches"] += 1
        self.stats["calls"] += len(calls)
        self.stats["prompt_tokens"] += int(sum(prompt_tokens))
        self.stats["cached_tokens"] += int(sum(cached))
        self.stats["prefix_entries"] = len(self.lru)
        self.stats["prefix_evictions"] = self.lru.evictions
        return [self._reply(m, call, row[: call.sampling.max_tokens], int(n), latency, int(c))
                for call, row, n, c in zip(calls, new.tolist(), prompt_tokens, cached,
                                           strict=True)]

    def _encode(self, m: Loaded, prompts: Sequence[Prompt], images: Sequence[list[Any]]) -> Any:
        vl = m.processor is not None
        convs = [local_messages(p, vl) for p in prompts]
        renderer = m.processor if vl else m.tokenizer
        texts = renderer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        flat = [img for per_call in images for img in per_call]
        if vl:
            enc = m.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        else:
            enc = m.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        enc = enc.to(m.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(m.dtype)
        return enc

    def _generation_args(self, m: Loaded, samplings: Sequence[Sampling],
                         seeds: Sequence[int]) -> tuple[Any, Any]:
        return generation_args(samplings, seeds, m.device, m.eos_ids, m.pad_id)

    def _generate(self, m: Loaded, inputs: Any, samplings: Sequence[Sampling],
                  seeds: Sequence[int]) -> Any:
        """New token ids [batch, steps] from one left-padded generate (no prefix reuse)."""
        import torch

        gen, processors = self._generation_args(m, samplings, seeds)
        with torch.inference_mode():
            out = m.model.generate(**inputs, generation_config=gen, logits_processor=processors)
        return out[:, inputs["input_ids"].shape[1]:].cpu()

    # prefix reuse

    def _generate_reuse(self, m: Loaded, calls: Sequence[Call], images: Sequence[list[Any]],
                        seeds: Sequence[int]) -> tuple[Any, list[int], list[int]]:
        """New token ids [batch, steps], prompt and cached tokens per call, with prefix reuse.

        Distinct prompts minus their last token form a trie; `_fill` gives every node its KV
        (from the LRU or computed once); then one generate runs over left-padded row caches.
        """
        import torch

        with torch.inference_mode():
            rows: list[PromptRow] = []
            index: dict[tuple[int, ...], int] = {}
            call_rows: list[int] = []
            for call, imgs in zip(calls, images, strict=True):
                row = self._encode_row(m, call.prompt, imgs)
                if row.key not in index:
                    index[row.key] = len(rows)
                    rows.append(row)
                call_rows.append(index[row.key])
            if any(len(r.key) < 2 for r in rows):
                raise _NoReuse("a prompt of fewer than two tokens")
            ctx = [r.key[:-1] for r in rows]
            [root] = plan_trie(ctx, list(range(len(rows))))
            leaves = self._fill(m, rows, ctx, root)
            shared = [n for n in walk_trie(root) if len(n.rows) > 1 and n.length > 0]
            for node in shared or [root]:
                assert node.kv is not None
                self.lru.put(ctx[node.rows[0]][: node.length], node.kv)
            for r, node in leaves.items():  # the next depth extends one of these rows
                if node.kv is not None and node.length > 0:
                    self.lru.put(ctx[r][: node.length], node.kv)

            lengths = [len(ctx[r]) for r in call_rows]
            width = max(lengths)
            cache = self._batched_cache(m, [(leaves[r].kv, n) for r, n in
                                            zip(call_rows, lengths, strict=True)], width)
            ids, mask, pos = self._layout(m, [(rows[r], 0, len(ctx[r]) + 1, width - len(ctx[r]))
                                              for r in call_rows], width + 1)
            gen, processors = self._generation_args(m, [c.sampling for c in calls], seeds)
            self.stats["prefill_tokens"] += len(calls)  # each row's last prompt token
            out = m.model.generate(input_ids=ids, attention_mask=mask, position_ids=pos,
                                   generation_config=gen, logits_processor=processors,
                                   **{m.cache_kw: cache})
        prompt_tokens = [len(rows[r].key) for r in call_rows]
        return out[:, width + 1:].cpu(), prompt_tokens, [leaves[r].cached for r in call_rows]

    def _encode_row(self, m: Loaded, prompt: Prompt, imgs: list[Any]) -> PromptRow:
        """One prompt tokenized alone, exactly as `_encode` renders it, with its positions."""
        import torch

        vl = m.processor is not None
        renderer = m.processor if vl else m.tokenizer
        [text] = renderer.apply_chat_template([local_messages(prompt, vl)], tokenize=False,
                                              add_generation_prompt=True)
        if not vl:
            ids = m.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            return PromptRow(tuple(ids.tolist()), ids, torch.arange(len(ids))[None], [], [], [])
        enc = m.processor(text=[text], images=imgs or None, return_tensors="pt")
        ids = enc["input_ids"][0]
        n = len(ids)
        text_pos = torch.arange(n)[None]
        if not imgs:
            return PromptRow(tuple(ids.tolist()), ids, text_pos.expand(4, n), [], [], [])
        grids = list(enc["image_grid_thw"])
        sizes = [int(g.prod()) for g in grids]
        pixels = list(enc["pixel_values"].to(m.dtype).split(sizes))
        image_id = m.processor.image_token_id
        is_image = (ids == image_id).tolist()
        spans = true_runs(is_image)
        refs = prompt.images()
        if len(spans) != len(refs):
            raise _NoReuse("image placeholders do not match the prompt's images")
        key = ids.tolist()
        for (i, j), ref in zip(spans, refs, strict=True):
            key[i:j] = [image_marker(ref.sha256)] * (j - i)
        base = getattr(m.model, "model", m.model)
        try:
            pos3, _ = base.get_rope_index(ids[None], mm_token_type_ids=enc["mm_token_type_ids"],
                                          image_grid_thw=enc["image_grid_thw"])
        except Exception as e:  # an architecture whose positions this path cannot build
            raise _NoReuse(f"no 3D positions: {type(e).__name__}: {e}") from None
        return PromptRow(tuple(key), ids, torch.cat([text_pos, pos3[:, 0]]), spans, pixels, grids)

    def _fill(self, m: Loaded, rows: list[PromptRow], ctx: list[tuple[int, ...]],
              root: Node) -> dict[int, Node]:
        """Give every trie node its KV, level by level, one forward per level; returns the node
        that ends at each context."""
        ends: dict[int, Node] = {}
        level: list[tuple[Node, Node | None]] = [(root, None)]
        while level:
            todo: list[tuple[Node, KV | None, int]] = []
            for node, parent in level:
                key = ctx[node.rows[0]][: node.length]
                plen = parent.length if parent is not None else 0
                hit, kv = self.lru.match(key)
                if hit > plen:
                    base, blen, node.cached = kv, hit, hit
                elif parent is not None:
                    base, blen, node.cached = parent.kv, plen, parent.cached
                else:
                    base, blen = None, 0
                if parent is None or len(node.rows) > 1:
                    self.stats["prefix_hits" if hit > plen else "prefix_misses"] += 1
                if blen == node.length:
                    node.kv = base
                else:
                    todo.append((node, base, blen))
                for r in node.rows:
                    if len(ctx[r]) == node.length:
                        ends[r] = node
            for chunk in size_chunks(todo, lambda t: t[0].length - t[2]):
                kvs = self._extend(m, [(base, blen, rows[node.rows[0]], node.length)
                                       for node, base, blen in chunk])
                for (node, _, _), kv in zip(chunk, kvs, strict=True):
                    node.kv = kv
            level = [(child, node) for node, _ in level for child in node.children]
        return ends

    def _extend(self, m: Loaded, items: list[tuple[KV | None, int, PromptRow, int]]) -> list[KV]:
        """One forward pass: each item's base KV (length b) plus its row's tokens [b, end)."""
        width = max(b for _, b, _, _ in items)
        steps = max(end - b for _, b, _, end in items)
        cache = self._batched_cache(m, [(kv, b) for kv, b, _, _ in items], width)
        ids, mask, pos = self._layout(m, [(row, b, end, width - b) for _, b, row, end in items],
                                      width + steps)
        extra: dict[str, Any] = {}
        pixels, grids = [], []
        for _, b, row, end in items:
            for (i, j), px, grid in zip(row.spans, row.pixels, row.grids, strict=True):
                if b <= i and j <= end:
                    pixels.append(px)
                    grids.append(grid)
                elif i < end and j > b:
                    raise _NoReuse("an image straddles a prefix boundary")
        if pixels:
            import torch

            extra = {"pixel_values": torch.cat(pixels).to(m.device),
                     "image_grid_thw": torch.stack(grids).to(m.device)}
        m.model(input_ids=ids[:, width:], attention_mask=mask, position_ids=pos[..., width:],
                use_cache=True, logits_to_keep=1, **{m.cache_kw: cache}, **extra)
        self.stats["prefill_tokens"] += len(items) * steps
        return [[(layer.keys[i:i + 1, :, width - b:width - b + end],
                  layer.values[i:i + 1, :, width - b:width - b + end]) for layer in cache.layers]
                for i, (_, b, _, end) in enumerate(items)]

    def _batched_cache(self, m: Loaded, bases: list[tuple[KV | None, int]], width: int) -> Any:
        """A DynamicCache of `width` positions: every base KV left-padded with zeros."""
        import torch
        from transformers import DynamicCache

        config = m.model.config
        if width == 0:
            return DynamicCache(config=config)
        first = bases[0][0]
        if all(kv is first and n == width for kv, n in bases) and first is not None:
            data = [(k.expand(len(bases), -1, -1, -1), v.expand(len(bases), -1, -1, -1))
                    for k, v in first]
            return DynamicCache(ddp_cache_data=data, config=config)
        ref = next(kv for kv, n in bases if kv is not None and n > 0)
        data = []
        for layer in range(m.kv_layers):
            keys, values = [], []
            for kv, n in bases:
                k0, v0 = ref[layer]
                pad_k = k0.new_zeros(1, k0.shape[1], width - n, k0.shape[3])
                pad_v = v0.new_zeros(1, v0.shape[1], width - n, v0.shape[3])
                if kv is None or n == 0:
                    keys.append(pad_k)
                    values.append(pad_v)
                else:
                    k, v = kv[layer]
                    keys.append(torch.cat([pad_k, k[:, :, :n]], dim=2))
                    values.append(torch.cat([pad_v, v[:, :, :n]], dim=2))
            data.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=data, config=config)

    def _layout(self, m: Loaded, items: list[tuple[PromptRow, int, int, int]],
                total: int) -> tuple[Any, Any, Any]:
        """input_ids, attention_mask, position_ids over `total` columns for items
        (row, start, end, offset): row position p sits in column offset + p, tokens [start, end)
        are filled in, the mask is 1 on [0, end) (cached positions included) and 0 on padding,
        and positions are the row's own ([4, batch, total] for mrope: text + t/h/w)."""
        import torch

        n_pos = items[0][0].pos.shape[0]
        ids = torch.full((len(items), total), m.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), total), dtype=torch.long)
        pos = torch.zeros((n_pos, len(items), total), dtype=torch.long)
        for i, (row, start, end, offset) in enumerate(items):
            ids[i, offset + start:offset + end] = row.ids[start:end]
            pos[:, i, offset + start:offset + end] = row.pos[:, start:end]
            mask[i, offset:offset + end] = 1
        return ids.to(m.device), mask.to(m.device), (pos if n_pos > 1 else pos[0]).to(m.device)

    def _reply(self, m: Loaded, call: Call, row: list[int], prompt_tokens: int,
               latency: float, cached: int = 0) -> Reply:
        eos = set(m.eos_ids)
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if end is None else row[:end]
        text = m.tokenizer.decode(kept, skip_special_tokens=True)
        text, matched = clip_at_stop(text, call.sampling.stop)
        stopped = matched is not None
        completion = len(row) if end is None else end + 1
        finish = "stop" if end is not None or stopped else "length"
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                      cached_tokens=cached, latency_s=latency)
        return Reply(text=text, usage=usage, finish_reason=finish)

    def _error(self, e: Exception) -> BackendError:
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        what = "out of memory" if oom else "generation failed"
        kind = OutOfMemoryError if oom else TransientError
        err = kind(f"model {self.name!r}: {what}: {type(e).__name__}: {e}")
        err.oom = oom  # type: ignore[attr-defined]
        return err

    def close(self) -> None:
        with self.lock:
            self.loaded = None
            self.lru.clear()

