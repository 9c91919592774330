"""The `local` backend's options, its model folder and the identity that goes into memo keys."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mics.config import ConfigError, ModelConfig, parse_options

DTYPES = ("auto", "float32", "bfloat16", "float16")
KINDS = ("auto", "text", "vl")
# options that change replies (device and max_batch do not, beyond float noise)
REPLY_OPTIONS = ("dtype", "kind", "max_pixels", "min_pixels", "seed")
_IDENTITY_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                   "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json")


@dataclass(frozen=True)
class LocalOptions:
    """`[[interns]].options` of a local intern (see backends.local for what each one does)."""

    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 16
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    seed: int = 0
    kind: str = "auto"
    prefix_cache: bool = True
    prefix_cache_size: int = 32

    @classmethod
    def parse(cls, cfg: ModelConfig) -> LocalOptions:
        """The model's options over the defaults; ConfigError naming the model and the key."""
        where = f"model {cfg.name!r}"
        opts = parse_options(cls, cfg.options, where, "local")
        if opts.max_batch < 1 or opts.min_pixels < 1 or opts.max_pixels < opts.min_pixels:
            raise ConfigError(f"{where}: need max_batch >= 1 and 1 <= min_pixels <= max_pixels")
        if opts.prefix_cache_size < 0:
            raise ConfigError(f"{where}: option prefix_cache_size must be >= 0")
        if opts.dtype not in DTYPES:
            raise ConfigError(f"{where}: option dtype must be one of {', '.join(DTYPES)}")
        if opts.kind not in KINDS:
            raise ConfigError(f"{where}: option kind must be one of {', '.join(KINDS)}")
        if not opts.device:
            raise ConfigError(f"{where}: option device must be a string such as 'auto' or "
                              "'cuda:0'")
        return opts

    def reply_options(self) -> dict[str, Any]:
        """The options that change replies, as they go into the memo key."""
        return {k: getattr(self, k) for k in REPLY_OPTIONS}


def model_dir(cfg: ModelConfig) -> Path:
    """The model folder (resolved); ConfigError when it has no config.json (checked when the
    model is built, before a run is created)."""
    path = Path(cfg.model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {cfg.name!r}: {str(path)!r} is not a model folder (no config.json)")
    return path.resolve()


def resolve_kind(path: Path, kind: str) -> str:
    """"text" or "vl": `kind` itself, or for "auto" whether config.json has a vision_config."""
    if kind != "auto":
        return kind
    try:
        config = orjson.loads((path / "config.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise ConfigError(f"{path / 'config.json'}: unreadable: {e}") from None
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


def call_seed(base: int, digest: str) -> int:
    """A 63-bit torch seed from the base seed and a call hash."""
    raw = hashlib.sha256(f"{base}:{digest}".encode()).digest()
    return int.from_bytes(raw[:8], "big") & (2**63 - 1)
