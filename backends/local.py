"""The `local` backend: interns run in-process with HF transformers (text LMs and Qwen2(.5)-VL).

Concurrent `rollout()` calls are queued; whoever holds the model lock takes the oldest group of
calls with the same `max_tokens` (up to `max_batch`) and runs it as one batched `generate` in a
worker thread, so the event loop never blocks. Greedy and sampled calls share a batch: every row
is sampled with its own parameters and generator (see `_RowSampler`). torch and transformers are
imported lazily (on the first rollout, in the worker), never at package import.

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

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson

from backends.base import BackendError, Call, OutOfMemoryError, PermanentError, TransientError
from backends.hf import LOAD_LOCK
from mics.config import ModelConfig
from mics.types import Image, Prompt, Reply, Sampling, Usage

_OPTIONS: dict[str, Any] = {
    "device": "auto", "dtype": "auto", "max_batch": 16, "min_pixels": 256 * 28 * 28,
    "max_pixels": 1280 * 28 * 28, "seed": 0, "kind": "auto", "prefix_cache": True,
    "prefix_cache_size": 32,
}
_REPLY_OPTIONS = ("dtype", "kind", "max_pixels", "min_pixels", "seed")
_TWIN_OPTIONS = ("max_batch", "prefix_cache", "prefix_cache_size", "seed")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_KINDS = ("auto", "text", "vl")
_MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl")  # VL models whose positions come from get_rope_index
# LocalRollout.stats: prefill_tokens counts positions the model computed (padding included);
# prefix_hits / prefix_misses count lookups of batch roots and shared trie nodes.
_MIN_SHARED = 32  # tokens a trie level or a separate forward pass must save to be worth it
_CHUNK_FILL = 0.9  # an item shares a forward pass with items at most ~1/0.9 times its length
_CHUNK_SLACK = 8  # ... or at most this many tokens longer
_STATS = ("batches", "calls", "prompt_tokens", "prefill_tokens", "cached_tokens", "prefix_hits",
          "prefix_misses", "prefix_entries", "prefix_evictions", "fallbacks")
_IDENTITY_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                   "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json")


# --- options, folder, identity ------------------------------------------------------------------

def _validate_options(cfg: ModelConfig) -> dict[str, Any]:
    """Options merged over defaults; ValueError naming the model for anything unknown or bad."""
    where = f"model {cfg.name!r}"
    unknown = sorted(set(cfg.options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown local option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(_OPTIONS))}")
    opts = {**_OPTIONS, **cfg.options}
    for key in ("max_batch", "min_pixels", "max_pixels", "seed", "prefix_cache_size"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool):
            raise ValueError(f"{where}: option {key} must be an integer, got {opts[key]!r}")
    if opts["max_batch"] < 1 or opts["min_pixels"] < 1 or opts["max_pixels"] < opts["min_pixels"]:
        raise ValueError(f"{where}: need max_batch >= 1 and 1 <= min_pixels <= max_pixels")
    if not isinstance(opts["prefix_cache"], bool):
        raise ValueError(f"{where}: option prefix_cache must be true or false")
    if opts["prefix_cache_size"] < 0:
        raise ValueError(f"{where}: option prefix_cache_size must be >= 0")
    if opts["dtype"] not in _DTYPES:
        raise ValueError(f"{where}: option dtype must be one of {', '.join(_DTYPES)}")
    if opts["kind"] not in _KINDS:
        raise ValueError(f"{where}: option kind must be one of {', '.join(_KINDS)}")
    if not isinstance(opts["device"], str) or not opts["device"]:
        raise ValueError(f"{where}: option device must be a string such as 'auto' or 'cuda:0'")
    return opts


def _model_dir(cfg: ModelConfig) -> Path:
    path = Path(cfg.model).expanduser()
    if not (path / "config.json").is_file():
        raise PermanentError(
            f"model {cfg.name!r}: {str(path)!r} is not a model folder (no config.json)")
    return path.resolve()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads((path / "config.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise PermanentError(f"{path / 'config.json'}: unreadable: {e}") from None


def _resolve_kind(path: Path, kind: str) -> str:
    if kind != "auto":
        return kind
    config = _read_config(path)
    return "vl" if "vision_config" in config else "text"


def weights_fingerprint(path: Path) -> str:
    """sha256 of the small config files plus weight file names and sizes (cheap, no weight I/O)."""
    h = hashlib.sha256()
    for name in _IDENTITY_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
    for f in weights:
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


def call_hash(call: Call) -> str:
    """Content hash of what determines one call's reply (prompt, sampling, sample index)."""
    material = {"prompt": call.prompt.key_material(), "sampling": asdict(call.sampling),
                "sample": call.sample_index}
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def call_seed(base: int, digest: str) -> int:
    """A 63-bit torch seed from the base seed and a call hash."""
    raw = hashlib.sha256(f"{base}:{digest}".encode()).digest()
    return int.from_bytes(raw[:8], "big") & (2**63 - 1)


def _group_key(s: Sampling) -> int:
    """Calls with equal keys share a `generate`: rows sample with their own parameters, and stop
    strings are trimmed per call, so only the length budget must match."""
    return s.max_tokens


def _messages(prompt: Prompt, vl: bool) -> list[dict[str, Any]]:
    """System + one user turn; a text LM gets the text parts only (images dropped)."""
    if vl:
        content: Any = [{"type": "image"} if isinstance(p, Image) else
                        {"type": "text", "text": p.text} for p in prompt.parts]
    else:
        content = prompt.user_text()
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]


def _trim_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# --- the torch side (runs in worker threads only) -----------------------------------------------

@lru_cache(maxsize=1)
def _image_only_processor_class() -> type:
    """Qwen2VLProcessor without the video sub-processor (which needs torchvision)."""
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any, tokenizer: Any, chat_template: Any = None,
                     **kwargs: Any) -> None:
            self.image_token = "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor



class _RowSampler:
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
        self._warps = {s: _warpers(s) for s in self._groups if not s.greedy}
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


def _warpers(sampling: Sampling) -> Any:
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers: list[Any] = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
    return LogitsProcessorList(warpers)


# --- prefix KV reuse (worker threads only) -------------------------------------------------------

KV = list[tuple[Any, Any]]  # per layer: (keys, values), each [1, kv_heads, length, head_dim]


class _NoReuse(Exception):
    """This batch cannot take the prefix path; it runs without reuse."""


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    return len(os.path.commonprefix([a, b]))  # type: ignore[type-var]


class PrefixLRU:
    """A bounded LRU of prefix KV caches: token key -> per-layer KV of exactly that prefix.

    `match` returns the longest common prefix with any entry and that entry's KV cropped to it.
    `put` keeps only maximal keys: an entry that is a prefix of another is redundant.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.evictions = 0
        self._entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[int, ...]]:
        return list(self._entries)

    def match(self, key: tuple[int, ...]) -> tuple[int, KV | None]:
        best, best_key = 0, None
        for k in self._entries:
            n = _lcp(k, key)
            if n > best:
                best, best_key = n, k
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        kv = self._entries[best_key]
        if best < len(best_key):  # crop: a view of the first `best` positions
            kv = [(k[:, :, :best], v[:, :, :best]) for k, v in kv]
        return best, kv

    def put(self, key: tuple[int, ...], kv: KV) -> None:
        if self.size <= 0 or not key:
            return
        for k in list(self._entries):
            if len(k) >= len(key) and k[: len(key)] == key:
                self._entries.move_to_end(k)  # already covered by a longer entry
                return
            if key[: len(k)] == k:
                del self._entries[k]
        self._entries[key] = [(k.contiguous(), v.contiguous()) for k, v in kv]
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class _Row:
    """One distinct prompt, tokenized on its own."""

    key: tuple[int, ...]  # token ids; image tokens replaced by a negative id per image content
    ids: Any  # LongTensor [n]
    pos: Any  # LongTensor [R, n]: R=1 text positions; R=4 text + mrope (t, h, w) positions
    spans: list[tuple[int, int]]  # image token spans, in prompt order
    pixels: list[Any]  # per image: its rows of pixel_values
    grids: list[Any]  # per image: its grid_thw


@dataclass
class _Node:
    """A trie node: the first `length` tokens shared by the contexts `rows`."""

    length: int
    rows: list[int]
    children: list[_Node]
    kv: KV | None = None
    cached: int = 0  # tokens of this prefix served from the LRU


def _plan(keys: Sequence[tuple[int, ...]], idx: list[int], start: int = 0,
          root: bool = True) -> list[_Node]:
    """The compacted token trie of the distinct contexts `keys[idx]` below position `start`.

    A shared node that would save fewer than `_MIN_SHARED` tokens is left out (its rows hang
    from its parent), since every trie level costs a forward pass.
    """
    if len(idx) == 1:
        length = len(keys[idx[0]])
    else:
        length = len(os.path.commonprefix([keys[i] for i in idx]))  # type: ignore[type-var]
    buckets: dict[int, list[int]] = {}
    for i in idx:
        if len(keys[i]) > length:
            buckets.setdefault(keys[i][length], []).append(i)
    children = [n for b in buckets.values() for n in _plan(keys, b, length, root=False)]
    if not root and len(idx) > 1 and (len(idx) - 1) * (length - start) < _MIN_SHARED:
        ends = [i for i in idx if len(keys[i]) == length]  # at most one: keys are distinct
        return children + [_Node(length, ends, [])] if ends else children
    return [_Node(length, idx, children)]


def _walk(node: _Node) -> list[_Node]:
    return [node, *(n for child in node.children for n in _walk(child))]


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def _chunks(items: list[Any], size: Callable[[Any], int]) -> list[list[Any]]:
    """Items grouped by similar size (longest first), one forward pass per group, so that right
    padding wastes little: an item joins the current group while it is at least
    `_CHUNK_FILL` as long as the group's longest (or at most `_CHUNK_SLACK` shorter)."""
    groups: list[list[Any]] = []
    top = 0
    for item in sorted(items, key=size, reverse=True):
        if groups and (size(item) >= _CHUNK_FILL * top or top - size(item) <= _CHUNK_SLACK):
            groups[-1].append(item)
        else:
            groups.append([item])
            top = size(item)
    return groups


def _image_marker(sha256: str) -> int:
    """The key of an image's tokens: negative, so never a real token id."""
    return -1 - int(sha256[:15], 16)


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    processor: Any  # the image-only processor for VL models, else None
    device: Any
    dtype: Any
    eos_ids: list[int]
    pad_id: int
    reuse: bool = False  # prefix KV reuse is possible for this model
    kv_layers: int = 0


class _Runner:
    """Owns the model and its prefix LRU; every method runs in a worker thread under `lock`.

    `run` is the batch executor: either encode -> `_generate` (no reuse), or `_generate_reuse`
    (prefix trie prefill + one batched generate); then decode.
    """

    def __init__(self, name: str, path: Path, kind: str, options: dict[str, Any]) -> None:
        self.name, self.path, self.kind, self.options = name, path, kind, options
        self.lock = threading.Lock()
        self.loaded: _Loaded | None = None
        self.lru = PrefixLRU(options["prefix_cache_size"])
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)
        self.last_fallback = ""  # why the last batch ran without reuse

    # loading

    def load(self) -> _Loaded:
        if self.loaded is None:
            try:
                with LOAD_LOCK:  # transformers' lazy imports are not thread-safe
                    self.loaded = self._load()
            except BackendError:
                raise
            except Exception as e:  # bad folder, unsupported architecture, missing files
                raise PermanentError(
                    f"model {self.name!r}: cannot load {str(self.path)!r}: "
                    f"{type(e).__name__}: {e}") from None
        return self.loaded

    def _load(self) -> _Loaded:
        import torch

        device = self._device(torch)
        dtype = self._dtype(torch, device)
        if self.kind == "vl":
            model, tok, proc = self._load_vl(dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path)
            model, proc = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype), None
        tok.padding_side = "left"
        model = model.to(device).eval()
        eos = model.generation_config.eos_token_id
        eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                          *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        pad = model.generation_config.pad_token_id
        pad = pad if pad is not None else tok.pad_token_id
        pad = pad if pad is not None else eos_ids[0]
        loaded = _Loaded(model, tok, proc, device, dtype, eos_ids, int(pad))
        loaded.kv_layers, loaded.reuse = self._reusable(model, proc is not None)
        return loaded

    def _reusable(self, model: Any, vl: bool) -> tuple[int, bool]:
        """(KV layers, whether prefix reuse works): plain dynamic layers; mrope VL models only."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
        plain = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        mrope = not vl or model.config.model_type in _MROPE_TYPES
        return len(layers), self.options["prefix_cache"] and plain and mrope

    def _load_vl(self, dtype: Any) -> tuple[Any, Any, Any]:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path)
        images = AutoImageProcessor.from_pretrained(
            self.path, min_pixels=self.options["min_pixels"],
            max_pixels=self.options["max_pixels"])
        proc = _image_only_processor_class()(images, tok, chat_template=tok.chat_template)
        model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype)
        return model, tok, proc

    def _device(self, torch: Any) -> Any:
        name = self.options["device"]
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def _dtype(self, torch: Any, device: Any) -> Any:
        name = self.options["dtype"]
        if name == "auto":
            if device.type == "cpu":
                return torch.float32
            if device.type == "cuda" and torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float16
        return getattr(torch, name)

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

    def _run_batch(self, m: _Loaded, calls: Sequence[Call], images: Sequence[list[Any]],
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
                inputs = self._encode(m, calls, images)
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

    def _encode(self, m: _Loaded, calls: Sequence[Call], images: Sequence[list[Any]]) -> Any:
        vl = m.processor is not None
        convs = [_messages(c.prompt, vl) for c in calls]
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

    def _generation_args(self, m: _Loaded, samplings: Sequence[Sampling],
                         seeds: Sequence[int]) -> tuple[Any, Any]:
        """An explicit GenerationConfig and, unless every row is greedy, the row sampler."""
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
            processors = LogitsProcessorList([_RowSampler(samplings, seeds, m.device)])
        gen = GenerationConfig(
            max_new_tokens=max(s.max_tokens for s in samplings), eos_token_id=m.eos_ids,
            pad_token_id=m.pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, **explicit,
        )
        return gen, processors

    def _generate(self, m: _Loaded, inputs: Any, samplings: Sequence[Sampling],
                  seeds: Sequence[int]) -> Any:
        """New token ids [batch, steps] from one left-padded generate (no prefix reuse)."""
        import torch

        gen, processors = self._generation_args(m, samplings, seeds)
        with torch.inference_mode():
            out = m.model.generate(**inputs, generation_config=gen, logits_processor=processors)
        return out[:, inputs["input_ids"].shape[1]:].cpu()

    # prefix reuse

    def _generate_reuse(self, m: _Loaded, calls: Sequence[Call], images: Sequence[list[Any]],
                        seeds: Sequence[int]) -> tuple[Any, list[int], list[int]]:
        """New token ids [batch, steps], prompt and cached tokens per call, with prefix reuse.

        Distinct prompts minus their last token form a trie; `_fill` gives every node its KV
        (from the LRU or computed once); then one generate runs over left-padded row caches.
        """
        import torch

        with torch.inference_mode():
            rows: list[_Row] = []
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
            [root] = _plan(ctx, list(range(len(rows))))
            leaves = self._fill(m, rows, ctx, root)
            shared = [n for n in _walk(root) if len(n.rows) > 1 and n.length > 0]
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
                                   past_key_values=cache, generation_config=gen,
                                   logits_processor=processors)
        prompt_tokens = [len(rows[r].key) for r in call_rows]
        return out[:, width + 1:].cpu(), prompt_tokens, [leaves[r].cached for r in call_rows]

    def _encode_row(self, m: _Loaded, prompt: Prompt, imgs: list[Any]) -> _Row:
        """One prompt tokenized alone, exactly as `_encode` renders it, with its positions."""
        import torch

        vl = m.processor is not None
        renderer = m.processor if vl else m.tokenizer
        [text] = renderer.apply_chat_template([_messages(prompt, vl)], tokenize=False,
                                              add_generation_prompt=True)
        if not vl:
            ids = m.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            return _Row(tuple(ids.tolist()), ids, torch.arange(len(ids))[None], [], [], [])
        enc = m.processor(text=[text], images=imgs or None, return_tensors="pt")
        ids = enc["input_ids"][0]
        n = len(ids)
        text_pos = torch.arange(n)[None]
        if not imgs:
            return _Row(tuple(ids.tolist()), ids, text_pos.expand(4, n), [], [], [])
        grids = list(enc["image_grid_thw"])
        sizes = [int(g.prod()) for g in grids]
        pixels = list(enc["pixel_values"].to(m.dtype).split(sizes))
        image_id = m.processor.image_token_id
        is_image = (ids == image_id).tolist()
        spans = _runs(is_image)
        refs = prompt.images()
        if len(spans) != len(refs):
            raise _NoReuse("image placeholders do not match the prompt's images")
        key = ids.tolist()
        for (i, j), ref in zip(spans, refs, strict=True):
            key[i:j] = [_image_marker(ref.sha256)] * (j - i)
        base = getattr(m.model, "model", m.model)
        try:
            pos3, _ = base.get_rope_index(ids[None], mm_token_type_ids=enc["mm_token_type_ids"],
                                          image_grid_thw=enc["image_grid_thw"])
        except Exception as e:  # an architecture whose positions this path cannot build
            raise _NoReuse(f"no 3D positions: {type(e).__name__}: {e}") from None
        return _Row(tuple(key), ids, torch.cat([text_pos, pos3[:, 0]]), spans, pixels, grids)

    def _fill(self, m: _Loaded, rows: list[_Row], ctx: list[tuple[int, ...]],
              root: _Node) -> dict[int, _Node]:
        """Give every trie node its KV, level by level, one forward per level; returns the node
        that ends at each context."""
        ends: dict[int, _Node] = {}
        level: list[tuple[_Node, _Node | None]] = [(root, None)]
        while level:
            todo: list[tuple[_Node, KV | None, int]] = []
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
            for chunk in _chunks(todo, lambda t: t[0].length - t[2]):
                kvs = self._extend(m, [(base, blen, rows[node.rows[0]], node.length)
                                       for node, base, blen in chunk])
                for (node, _, _), kv in zip(chunk, kvs, strict=True):
                    node.kv = kv
            level = [(child, node) for node, _ in level for child in node.children]
        return ends

    def _extend(self, m: _Loaded, items: list[tuple[KV | None, int, _Row, int]]) -> list[KV]:
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
                past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        self.stats["prefill_tokens"] += len(items) * steps
        return [[(layer.keys[i:i + 1, :, width - b:width - b + end],
                  layer.values[i:i + 1, :, width - b:width - b + end]) for layer in cache.layers]
                for i, (_, b, _, end) in enumerate(items)]

    def _batched_cache(self, m: _Loaded, bases: list[tuple[KV | None, int]], width: int) -> Any:
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

    def _layout(self, m: _Loaded, items: list[tuple[_Row, int, int, int]],
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

    def _reply(self, m: _Loaded, call: Call, row: list[int], prompt_tokens: int,
               latency: float, cached: int = 0) -> Reply:
        eos = set(m.eos_ids)
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if end is None else row[:end]
        text = m.tokenizer.decode(kept, skip_special_tokens=True)
        text, stopped = _trim_stop(text, call.sampling.stop)
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


# --- the async side ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Job:
    call: Call
    digest: str
    seed: int
    reply: Reply | None = None
    error: BackendError | None = None

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.error is not None


class LocalRollout:
    """An intern served in-process by transformers; see the module docstring for options."""

    def __init__(self, config: ModelConfig, role: str = "intern") -> None:
        self.config = config
        self.role = role
        self.options = _validate_options(config)
        self.path = _model_dir(config)
        self.kind = _resolve_kind(self.path, self.options["kind"])
        self._identity = {
            "backend": "local", "model": config.model, "weights": weights_fingerprint(self.path),
            # options that change replies (device and max_batch do not, beyond float noise)
            "options": {k: self.options[k] for k in _REPLY_OPTIONS},
        }
        self._runner = _Runner(config.name, self.path, self.kind, self.options)
        self._pending: list[_Job] = []
        self._lock = anyio.Lock()
        self._failed_once: set[str] = set()

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @property
    def stats(self) -> dict[str, int]:
        """Live counters (see `_STATS`): prefill_tokens, prefix_hits, prefix_misses, ..."""
        return self._runner.stats

    def reset_stats(self) -> None:
        """Zero the counters (the LRU is kept)."""
        for key in self._runner.stats:
            self._runner.stats[key] = 0

    def twin(self, **options: Any) -> LocalRollout:
        """The same model with batching options changed (e.g. `prefix_cache=False`), sharing
        this rollout's weights and model lock (benchmarks, tests): loads the weights now if
        needed, blocking, so not from the event loop. Each twin keeps its own LRU and stats."""
        from dataclasses import replace

        bad = sorted(set(options) - set(_TWIN_OPTIONS))
        if bad:
            raise ValueError(f"a twin can change only {', '.join(_TWIN_OPTIONS)}, not {bad}")
        other = LocalRollout(replace(self.config, options={**self.config.options, **options}),
                             self.role)
        m = self._runner.load()
        vl = m.processor is not None
        other._runner.loaded = replace(m)
        other._runner.lock = self._runner.lock  # one model: never two generates at once
        other._runner.loaded.kv_layers, other._runner.loaded.reuse = other._runner._reusable(
            m.model, vl)
        return other

    async def rollout(self, calls: Sequence[Call]) -> list[Reply]:
        """One reply per call, in order; concurrent callers share batched `generate`s."""
        jobs = [self._job(c) for c in calls]
        self._pending.extend(jobs)
        try:
            await anyio.sleep(0)  # let callers started in the same tick join this batch
            while not all(j.finished for j in jobs):
                async with self._lock:
                    if all(j.finished for j in jobs):
                        break
                    await self._run(self._take_batch())
        finally:
            mine = {id(j) for j in jobs}
            self._pending = [j for j in self._pending if id(j) not in mine]
        for j in jobs:
            if j.error is not None:
                raise type(j.error)(str(j.error))
        return [j.reply for j in jobs if j.reply is not None]

    def _job(self, call: Call) -> _Job:
        digest = call_hash(call)
        return _Job(call, digest, call_seed(self.options["seed"], digest))

    def _take_batch(self) -> list[_Job]:
        if not self._pending:
            return []
        key = _group_key(self._pending[0].call.sampling)
        batch = [j for j in self._pending if _group_key(j.call.sampling) == key]
        batch = batch[: self.options["max_batch"]]
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        if not batch:
            return
        try:
            results = await anyio.to_thread.run_sync(
                self._runner.run, [j.call for j in batch], [j.seed for j in batch])
        except BackendError as e:  # loading failed
            results = [e] * len(batch)
        except Exception as e:  # never leave a job unfinished: its caller would wait forever
            results = [TransientError(f"model {self.config.name!r}: {type(e).__name__}: {e}")
                       ] * len(batch)
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, Reply):
                job.reply = result
            else:
                job.error = self._escalate(job, result)

    def _escalate(self, job: _Job, error: BackendError) -> BackendError:
        """A generation error is transient once per call; the same call failing again is not."""
        if not isinstance(error, TransientError) or getattr(error, "oom", False):
            return error
        if job.digest in self._failed_once:
            return PermanentError(f"{error} (failed again on retry)")
        self._failed_once.add(job.digest)
        return error

    async def aclose(self) -> None:
        async with self._lock:
            await anyio.to_thread.run_sync(self._runner.close)
