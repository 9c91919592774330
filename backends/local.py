"""The `local` backend: interns run in-process with HF transformers (text LMs and Qwen2(.5)-VL).

Concurrent `rollout()` calls are queued; whoever holds the model lock takes the oldest group of
calls with identical sampling parameters (up to `max_batch`) and runs it as one left-padded
`generate` in a worker thread, so the event loop never blocks. torch and transformers are imported
lazily (on the first rollout, in the worker), never at package import.

Options (`[[interns]].options`):
  device      "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N", "mps"
  dtype       "auto" (bfloat16 on CUDA when supported, float16 on other GPUs, float32 on CPU),
              "float32", "bfloat16", "float16"
  max_batch   most calls per `generate` (default 16)
  min_pixels, max_pixels  image processor pixel budget (default 256*28*28 / 1280*28*28)
  seed        base of every call's sampling seed (default 0)
  kind        "auto" (a `vision_config` in config.json means "vl"), "text", "vl"

Rendering: one system message, then one user message whose content is the prompt's parts in
order (images as {"type": "image"}), with `add_generation_prompt=True`. A text LM cannot see
images: its image parts are dropped and the user message is the concatenated text.

Determinism: greedy calls use no randomness, so a reply is exactly reproducible for the same batch;
across batch compositions it matched one-at-a-time generation in every test (only floating-point
reassociation under different padding could ever move an argmax tie). Sampled calls draw every
token from their own torch.Generator, seeded from (seed, hash of prompt, sampling, sample index),
so on a given device and dtype a sampled reply does not depend on which calls shared its batch.
The folder's generation_config sampling defaults are never used: every parameter is explicit (B8).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import orjson

from backends.base import BackendError, Call, PermanentError, TransientError
from mics.config import ModelConfig
from mics.types import Image, Prompt, Reply, Sampling, Usage

_OPTIONS: dict[str, Any] = {
    "device": "auto", "dtype": "auto", "max_batch": 16, "min_pixels": 256 * 28 * 28,
    "max_pixels": 1280 * 28 * 28, "seed": 0, "kind": "auto",
}
_REPLY_OPTIONS = ("dtype", "kind", "max_pixels", "min_pixels", "seed")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_KINDS = ("auto", "text", "vl")
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
    for key in ("max_batch", "min_pixels", "max_pixels", "seed"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool):
            raise ValueError(f"{where}: option {key} must be an integer, got {opts[key]!r}")
    if opts["max_batch"] < 1 or opts["min_pixels"] < 1 or opts["max_pixels"] < opts["min_pixels"]:
        raise ValueError(f"{where}: need max_batch >= 1 and 1 <= min_pixels <= max_pixels")
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


def _group_key(s: Sampling) -> tuple[Any, ...]:
    """Calls with equal keys share a `generate` (stop strings are trimmed per call)."""
    if s.greedy:
        return ("greedy", s.max_tokens)
    return ("sample", s.temperature, s.top_p, s.top_k, s.max_tokens)


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


_LOAD_LOCK = threading.Lock()  # one model load at a time, in any worker thread

class _RowSampler:
    """Logits processor that samples each row with its own generator and returns a one-hot.

    It applies temperature, top-k and top-p itself, so the draw depends only on the row's seed
    and logits; `generate`'s own warpers and multinomial then keep that single token.
    """

    def __init__(self, sampling: Sampling, seeds: Sequence[int], device: Any) -> None:
        import torch
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
        self._warp = LogitsProcessorList(warpers)
        self._gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(self._warp(input_ids, scores).float(), dim=-1)
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                             for i, g in enumerate(self._gens)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks, 0.0)


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    processor: Any  # the image-only processor for VL models, else None
    device: Any
    dtype: Any
    eos_ids: list[int]
    pad_id: int


class _Runner:
    """Owns the model; every method runs in a worker thread under `lock`.

    `run` is the batch executor: encode -> `_generate` -> decode. A prefix KV cache would slot
    into `_generate` (prefill the shared prefix once, pass `past_key_values`).
    """

    def __init__(self, name: str, path: Path, kind: str, options: dict[str, Any]) -> None:
        self.name, self.path, self.kind, self.options = name, path, kind, options
        self.lock = threading.Lock()
        self.loaded: _Loaded | None = None

    # loading

    def load(self) -> _Loaded:
        if self.loaded is None:
            try:
                with _LOAD_LOCK:  # transformers' lazy imports are not thread-safe
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
        return _Loaded(model, tok, proc, device, dtype, eos_ids, int(pad))

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
        """One group of calls with identical sampling: a reply or an error per call."""
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
        try:
            inputs = self._encode(m, calls, images)
            new = self._generate(m, inputs, calls[0].sampling, seeds)
        except Exception as e:
            return [self._error(e)] * len(calls)
        latency = round(time.perf_counter() - start, 6)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [self._reply(m, call, row, int(n), latency)
                for call, row, n in zip(calls, new.tolist(), prompt_tokens, strict=True)]

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

    def _generate(self, m: _Loaded, inputs: Any, sampling: Sampling, seeds: Sequence[int]) -> Any:
        """New token ids [batch, steps]; the place for a prefix KV cache later."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        explicit: dict[str, Any] = {"do_sample": not sampling.greedy}
        processors = None
        if not sampling.greedy:
            explicit.update(temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k if sampling.top_k > 0 else 0)  # 0: no top-k
            processors = LogitsProcessorList([_RowSampler(sampling, seeds, m.device)])
        gen = GenerationConfig(
            max_new_tokens=sampling.max_tokens, eos_token_id=m.eos_ids, pad_token_id=m.pad_id,
            repetition_penalty=1.0, no_repeat_ngram_size=0, **explicit,
        )
        with torch.inference_mode():
            out = m.model.generate(**inputs, generation_config=gen, logits_processor=processors)
        return out[:, inputs["input_ids"].shape[1]:].cpu()

    def _reply(self, m: _Loaded, call: Call, row: list[int], prompt_tokens: int,
               latency: float) -> Reply:
        eos = set(m.eos_ids)
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if end is None else row[:end]
        text = m.tokenizer.decode(kept, skip_special_tokens=True)
        text, stopped = _trim_stop(text, call.sampling.stop)
        completion = len(row) if end is None else end + 1
        finish = "stop" if end is not None or stopped else "length"
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                      latency_s=latency)
        return Reply(text=text, usage=usage, finish_reason=finish)

    def _error(self, e: Exception) -> BackendError:
        import torch

        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
        what = "out of memory" if oom else "generation failed"
        err = TransientError(f"model {self.name!r}: {what}: {type(e).__name__}: {e}")
        err.oom = oom  # type: ignore[attr-defined]
        return err

    def close(self) -> None:
        with self.lock:
            self.loaded = None


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
