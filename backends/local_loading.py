"""Loading a `local` intern: the model, its tokenizer and (VL) image processor on the configured
device and dtype, and what generating from them needs (`Loaded`). Runs in the runner's worker
thread; torch and transformers are imported here, lazily."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from backends.local_options import LocalOptions

_MROPE_TYPES = ("qwen2_vl", "qwen2_5_vl")  # VL models whose positions come from get_rope_index


@dataclass
class Loaded:
    """A loaded model with what generating from it needs."""

    model: Any
    tokenizer: Any
    processor: Any  # the image-only processor for VL models, else None
    device: Any
    dtype: Any
    eos_ids: list[int]
    pad_id: int
    reuse: bool = False  # prefix KV reuse is possible for this model
    kv_layers: int = 0
    cache_kw: str = "past_key_values"  # what `forward` and `generate` call the KV cache


def load_model(path: Path, kind: str, options: LocalOptions) -> Loaded:
    """The model folder at `path` loaded as `kind` ("text" or "vl") with `options`' device,
    dtype and pixel budget; left padding; eos and pad ids from its generation config."""
    import torch

    device = _device(torch, options.device)
    dtype = _dtype(torch, options.dtype, device)
    if kind == "vl":
        model, tok, proc = _load_vl(path, options, dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model, proc = AutoModelForCausalLM.from_pretrained(path, dtype=dtype), None
    tok.padding_side = "left"
    model = model.to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else tok.pad_token_id
    pad = pad if pad is not None else eos_ids[0]
    loaded = Loaded(model, tok, proc, device, dtype, eos_ids, int(pad),
                    cache_kw=cache_keyword(model))
    loaded.kv_layers, loaded.reuse = reusable(model, proc is not None, options.prefix_cache)
    return loaded


def reusable(model: Any, vl: bool, prefix_cache: bool) -> tuple[int, bool]:
    """(KV layers, whether prefix reuse works): plain dynamic layers; mrope VL models only."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    plain = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
    mrope = not vl or model.config.model_type in _MROPE_TYPES
    return len(layers), prefix_cache and plain and mrope


def cache_keyword(model: Any) -> str:
    """The keyword the model takes its KV cache by: `cache` in the transformers releases that
    renamed it (where `past_key_values` is deprecated, to be removed), `past_key_values`
    before them."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")


@lru_cache(maxsize=1)
def image_only_processor_class() -> type:
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


def _load_vl(path: Path, options: LocalOptions, dtype: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    images = AutoImageProcessor.from_pretrained(path, min_pixels=options.min_pixels,
                                                max_pixels=options.max_pixels)
    proc = image_only_processor_class()(images, tok, chat_template=tok.chat_template)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model, tok, proc


def _device(torch: Any, name: str) -> Any:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _dtype(torch: Any, name: str, device: Any) -> Any:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return getattr(torch, name)
