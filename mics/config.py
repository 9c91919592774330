"""Run configuration: TOML in, validated dataclasses out. Every error names the key."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mics.errors import ConfigError


@dataclass(frozen=True)
class SearchConfig:
    max_depth: int = 3
    root_steps: int = 2
    intern_samples: tuple[float, ...] = (1.2, 0.2)  # one sample per temperature per intern
    intern_top_p: float = 1.0
    intern_top_k: int = -1
    intern_max_tokens: int = 512
    mentor_temperature: float = 1.0  # the reference used 1.2, which degenerates (B19)
    mentor_top_p: float = 1.0
    mentor_max_tokens: int = 2048
    mentor_malformed_retries: int = 1
    judge_temperature: float = 0.0  # B11
    judge_max_tokens: int = 8
    on_all_zero: str = "fail"  # or "restart:N"
    reuse_cached_step: bool = True
    seed: int = 0
    concurrency: int = 8  # questions searched at once

    @property
    def restarts(self) -> int:
        if self.on_all_zero == "fail":
            return 0
        return int(self.on_all_zero.split(":", 1)[1])


@dataclass(frozen=True)
class ModelConfig:
    """One model endpoint; `backend` picks the implementation (never the model name)."""

    name: str
    backend: str
    model: str
    base_url: str = ""
    api_key_env: str = ""  # the variable's name; the key itself is never stored
    max_concurrency: int = 16
    requests_per_minute: float = 0.0  # 0: no budget
    tokens_per_minute: float = 0.0
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    search: SearchConfig
    mentors: tuple[ModelConfig, ...]
    interns: tuple[ModelConfig, ...]
    judge: ModelConfig

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        return parse_config(d, where="stored config")


def _check_keys(table: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )


def _typed(value: Any, default: Any, key: str, where: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        value = tuple(float(v) for v in value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"{where}.{key}: expected {type(default).__name__}, got {type(value).__name__} "
            f"{value!r}"
        )
    return value


def _parse_search(table: dict[str, Any]) -> SearchConfig:
    _check_keys(table, SearchConfig, "[search]")
    defaults = SearchConfig()
    values = {k: _typed(v, getattr(defaults, k), k, "[search]") for k, v in table.items()}
    cfg = SearchConfig(**values)
    if cfg.max_depth < 1:
        raise ConfigError("[search].max_depth: must be >= 1")
    if cfg.root_steps not in (1, 2):
        raise ConfigError("[search].root_steps: must be 1 or 2")
    if not cfg.intern_samples:
        raise ConfigError("[search].intern_samples: needs at least one temperature")
    if cfg.concurrency < 1:
        raise ConfigError("[search].concurrency: must be >= 1")
    if cfg.on_all_zero != "fail":
        head, _, n = cfg.on_all_zero.partition(":")
        if head != "restart" or not n.isdigit() or int(n) < 1:
            raise ConfigError(
                f"[search].on_all_zero: expected \"fail\" or \"restart:N\", got {cfg.on_all_zero!r}"
            )
    return cfg


def _parse_model(table: Any, where: str) -> ModelConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(table, ModelConfig, where)
    for required in ("name", "backend", "model"):
        if not isinstance(table.get(required), str) or not table[required]:
            raise ConfigError(f"{where}.{required}: missing (a non-empty string is required)")
    proto = ModelConfig(name="", backend="", model="")
    values = {k: _typed(v, getattr(proto, k), k, where) for k, v in table.items()}
    values["options"] = dict(values.get("options", {}))
    cfg = ModelConfig(**values)
    if cfg.max_concurrency < 1:
        raise ConfigError(f"{where}.max_concurrency: must be >= 1")
    if cfg.max_retries < 0:
        raise ConfigError(f"{where}.max_retries: must be >= 0")
    return cfg


def parse_config(data: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a config mapping (as read from TOML). Raises ConfigError naming the key."""
    allowed = {"search", "mentors", "interns", "judge"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}")
    search = _parse_search(dict(data.get("search", {})))
    for section in ("mentors", "interns"):
        if not isinstance(data.get(section), (list, tuple)) or not data[section]:
            raise ConfigError(f"{where}: [[{section}]] missing (at least one is required)")
    if not isinstance(data.get("judge"), dict):
        raise ConfigError(f"{where}: [judge] missing")
    mentors = tuple(_parse_model(t, f"[[mentors]] #{i + 1}") for i, t in enumerate(data["mentors"]))
    interns = tuple(_parse_model(t, f"[[interns]] #{i + 1}") for i, t in enumerate(data["interns"]))
    judge = _parse_model(data["judge"], "[judge]")
    for group, models in (("mentors", mentors), ("interns", interns)):
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"[[{group}]]: duplicate name(s) {', '.join(dupes)}")
    return RunConfig(search=search, mentors=mentors, interns=interns, judge=judge)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a mapping; ConfigError (a ValueError) when missing or invalid."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML config file."""
    return parse_config(read_toml(path), where=str(path))
