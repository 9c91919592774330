"""Run configuration: TOML in, validated dataclasses out. Every error names the key."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mics.errors import ConfigError
from mics.prompts import DEFAULT_PACK, MEDICAL, PACKS, pack_templates
from mics.templates import (
    TEMPLATE_KEYS,
    PromptTemplates,
    TemplateError,
    check_final_line,
    check_template,
)

T = TypeVar("T")
ID_FIELDS = {"chiron": "rid", "generic": "id"}  # each dataset format: what it calls a record's id
DATASET_FORMATS = tuple(ID_FIELDS)  # mics.dataset.read_dataset(fmt=...); docs/datasets.md



@dataclass(frozen=True)
class SearchConfig:
    max_depth: int = 3
    root_steps: int = 2
    intern_samples: tuple[float, ...] = (1.2, 0.2)  # the temperatures each intern samples at
    samples_per_temperature: int = 1  # independent calls per (intern, temperature)
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
    on_call_failure: str = "defer"  # or "count_wrong" (the reference: a failed sample is wrong)
    on_answer_leak: str = "flag"  # or "reask" / "reject" (see mics.leaks)
    step_join: str = "newline"  # the reference's join (docs/algorithm.md); "blank_line": "\n\n"

    @property
    def joiner(self) -> str:
        """What goes between the selected path and a candidate step (and a continuation)."""
        return "\n\n" if self.step_join == "blank_line" else "\n"

    def sample_plan(self) -> tuple[tuple[float, int], ...]:
        """(temperature, sample number) of every sample an intern draws per candidate.

        The sample number counts earlier samples at the same temperature, so each one is its
        own call (and memo entry); the default plan, one sample per distinct temperature, gives
        every sample number 0, the keys runs made before this had."""
        seen: dict[float, int] = {}
        plan = []
        for temp in self.intern_samples:
            for _ in range(self.samples_per_temperature):
                plan.append((temp, seen.get(temp, 0)))
                seen[temp] = seen.get(temp, 0) + 1
        return tuple(plan)

    @property
    def restarts(self) -> int:
        """How many times an all-zero question is searched again (`on_all_zero`)."""
        return parse_on_all_zero(self.on_all_zero)


def parse_on_all_zero(value: str) -> int:
    """`on_all_zero` ("fail" or "restart:N", N >= 1) as the number of restarts (0 for "fail");
    the one place it is parsed. ConfigError naming the key otherwise."""
    if value == "fail":
        return 0
    head, _, n = value.partition(":")
    if head != "restart" or not n.isdigit() or int(n) < 1:
        raise ConfigError(
            f"[search].on_all_zero: expected \"fail\" or \"restart:N\", got {value!r}")
    return int(n)


# `timeout_s` when a model sets none, by backend (else ModelConfig's). A batched SGLang
# /generate sends nothing until its last prompt is done, queueing included, and a client that
# gives up aborts the whole batch on the server; so its wait is long, as SGLang advises.
DEFAULT_TIMEOUT_S = {"sglang": 600.0}


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
    max_rate_limit_wait_s: float = 300.0  # cap on a server-requested wait (Retry-After & co.)
    breaker_after: int = 10  # consecutive connection failures / 5xx that open the breaker; 0: off
    breaker_cooldown_s: float = 30.0  # then one probe call is let through after this long
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetConfig:
    """How dataset records are read: "chiron" (Chiron/MMRP) or "generic" (docs/datasets.md)."""

    format: str = "chiron"

    def id_field(self) -> str:
        """The record field that holds a question's id in this format."""
        return ID_FIELDS[self.format]


@dataclass(frozen=True)
class RunConfig:
    search: SearchConfig
    mentors: tuple[ModelConfig, ...]
    interns: tuple[ModelConfig, ...]
    judge: ModelConfig
    prompts: PromptTemplates = MEDICAL  # stored in full, so a resume renders the same prompts
    dataset: DatasetConfig = field(default_factory=DatasetConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        """A stored config; one stored before `step_join` existed keeps the blank-line join
        it was searched with, so resuming it replays its calls."""
        d = dict(d)
        if isinstance(d.get("search"), dict) and "step_join" not in d["search"]:
            d["search"] = {**d["search"], "step_join": "blank_line"}
        return parse_config(d, where="stored config", new_run=False)


# What a later session of a run may change: where and how its models are reached. No memo key
# holds these (a key holds a model's identity, prompt and sampling), so stored calls stay
# valid; the `model` itself and every option that shapes a reply are not among them.
ENDPOINT_FIELDS = frozenset({
    "base_url", "api_key_env", "max_concurrency", "requests_per_minute", "tokens_per_minute",
    "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "max_rate_limit_wait_s",
    "breaker_after", "breaker_cooldown_s"})
ENDPOINT_OPTIONS = frozenset({"urls"})  # an SGLang intern's further servers
ENDPOINT_SEARCH = frozenset({"concurrency"})  # questions at once: the trees do not depend on it


def config_changes(old: RunConfig, new: RunConfig) -> tuple[list[str], list[str]]:
    """(endpoint settings that differ, everything else that differs) from `old` to `new`, as
    key paths such as ``[[mentors]] #1 (m1).base_url`` or ``[search].max_depth``."""
    endpoint: list[str] = []
    other: list[str] = []
    a, b = old.to_dict(), new.to_dict()
    for section in a:
        x, y = a[section], b[section]
        if section in ("mentors", "interns", "judge"):
            label = "[judge]" if section == "judge" else f"[[{section}]]"
            xs, ys = ([x], [y]) if section == "judge" else (list(x), list(y))
            if len(xs) != len(ys):
                other.append(f"{label}: {len(xs)} model(s), now {len(ys)}")
                continue
            for i, (m, n) in enumerate(zip(xs, ys, strict=True)):
                where = label if section == "judge" else f"{label} #{i + 1} ({m['name']})"
                for key in m:
                    if key == "options":
                        for opt in sorted(set(m[key]) | set(n[key])):
                            if m[key].get(opt) != n[key].get(opt):
                                (endpoint if opt in ENDPOINT_OPTIONS else other).append(
                                    f"{where}.options.{opt}")
                    elif m[key] != n[key]:
                        (endpoint if key in ENDPOINT_FIELDS else other).append(f"{where}.{key}")
        else:
            for key in x:
                if x[key] != y[key]:
                    (endpoint if section == "search" and key in ENDPOINT_SEARCH else other
                     ).append(f"[{section}].{key}")
    return endpoint, other


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
        expected = "a list of numbers" if isinstance(default, tuple) else type(default).__name__
        raise ConfigError(
            f"{where}.{key}: expected {expected}, got {type(value).__name__} "
            f"{value!r}"
        )
    return value


def parse_options(cls: type[T], options: dict[str, Any], where: str, what: str) -> T:
    """A backend's `options` table as its frozen dataclass `cls` (every field has a default),
    checked like the rest of the config: an unknown key or a wrong type is a ConfigError naming
    the model (`where`) and the key. Range checks stay with the backend."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {what} option(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(known))}")
    defaults = cls()
    values = {k: _typed(v, getattr(defaults, k), k, f"{where}: options")
              for k, v in options.items()}
    return cls(**values)


def _check_sampling(cfg: SearchConfig) -> None:
    """Sampling values a server would refuse (SGLang: top_k -1 or >= 1, top_p in (0, 1]) or
    that mean nothing, refused before any call instead of failing every call of the run."""
    temps = [("intern_samples", t) for t in cfg.intern_samples] + [
        ("mentor_temperature", cfg.mentor_temperature),
        ("judge_temperature", cfg.judge_temperature)]
    for key, t in temps:
        if t < 0.0:
            raise ConfigError(f"[search].{key}: a temperature must be >= 0, got {t!r}")
    for key in ("intern_top_p", "mentor_top_p"):
        if not 0.0 < getattr(cfg, key) <= 1.0:
            raise ConfigError(f"[search].{key}: must be in (0, 1], got {getattr(cfg, key)!r}")
    if cfg.intern_top_k != -1 and cfg.intern_top_k < 1:
        raise ConfigError(f"[search].intern_top_k: must be -1 (every token) or >= 1, got "
                          f"{cfg.intern_top_k!r}")
    for key in ("intern_max_tokens", "mentor_max_tokens", "judge_max_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"[search].{key}: must be >= 1, got {getattr(cfg, key)!r}")


def _parse_search(table: dict[str, Any], new_run: bool = True) -> SearchConfig:
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
    if cfg.samples_per_temperature < 1:
        raise ConfigError("[search].samples_per_temperature: must be >= 1")
    if new_run:
        _check_sampling(cfg)
    for key, allowed in (("on_call_failure", ("defer", "count_wrong")),
                         ("on_answer_leak", ("flag", "reask", "reject")),
                         ("step_join", ("newline", "blank_line"))):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"[search].{key}: expected one of "
                              f"{', '.join(repr(a) for a in allowed)}, got {getattr(cfg, key)!r}")
    parse_on_all_zero(cfg.on_all_zero)
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
    values.setdefault("timeout_s", DEFAULT_TIMEOUT_S.get(table["backend"], proto.timeout_s))
    cfg = ModelConfig(**values)
    if cfg.max_concurrency < 1:
        raise ConfigError(f"{where}.max_concurrency: must be >= 1")
    if cfg.max_retries < 0:
        raise ConfigError(f"{where}.max_retries: must be >= 0")
    if cfg.max_rate_limit_wait_s < 0:
        raise ConfigError(f"{where}.max_rate_limit_wait_s: must be >= 0")
    if cfg.breaker_after < 0:
        raise ConfigError(f"{where}.breaker_after: must be >= 0 (0 turns the breaker off)")
    if cfg.base_url:
        check_url(cfg.base_url, f"{where}.base_url")
    return cfg


def check_url(url: str, where: str) -> None:
    """An endpoint URL must be http(s) with a host and a valid port: anything else would only
    fail at the first call, retried as if the server were down."""
    problem = ""
    try:
        parts = urlsplit(url)
        port = parts.port  # a ValueError when out of range or not a number
    except ValueError as e:
        problem = str(e)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it names no host"
        elif port == 0:
            problem = "port 0 is not a server's port"
        elif any(c.isspace() for c in url):
            problem = "it contains white space"
    if problem:
        raise ConfigError(f"{where}: {url!r} is not an endpoint URL: {problem}")


def _parse_prompts(table: Any, new_run: bool = True) -> PromptTemplates:
    """A pack (default "medical") with any templates the table overrides, all validated."""
    if not isinstance(table, dict):
        raise ConfigError("[prompts]: expected a table")
    known = ("pack", *TEMPLATE_KEYS)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"[prompts]: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(known)}")
    pack = table.get("pack", DEFAULT_PACK)
    if not isinstance(pack, str) or pack not in PACKS:
        raise ConfigError(f"[prompts].pack: unknown pack {pack!r}; bundled packs: "
                          f"{', '.join(PACKS)}")
    base = pack_templates(pack)
    values = {k: table.get(k, getattr(base, k)) for k in TEMPLATE_KEYS}
    for key, template in values.items():
        try:
            check_template(key, template)
        except TemplateError as e:
            raise ConfigError(f"[prompts].{e.key}: {e.message}") from None
    templates = PromptTemplates(pack=pack, **values)
    if new_run:
        try:
            check_final_line(templates)
        except TemplateError as e:
            raise ConfigError(f"[prompts].{e.key}: {e.message}") from None
    return templates


def _parse_dataset(table: Any) -> DatasetConfig:
    if not isinstance(table, dict):
        raise ConfigError("[dataset]: expected a table")
    _check_keys(table, DatasetConfig, "[dataset]")
    fmt = table.get("format", DatasetConfig.format)
    if fmt not in DATASET_FORMATS:
        raise ConfigError(f"[dataset].format: expected one of {', '.join(DATASET_FORMATS)}, "
                          f"got {fmt!r}")
    return DatasetConfig(format=fmt)


def parse_config(data: dict[str, Any], where: str = "config", *, new_run: bool = True
                 ) -> RunConfig:
    """Validate a config mapping (as read from TOML). Raises ConfigError naming the key.
    `new_run=False` (a stored run's config) skips the checks that guard a new run only (a
    sampling value a server refuses, a prompt that asks for no final answer), so a run stored
    before them can still be read, exported and resumed."""
    allowed = {"search", "mentors", "interns", "judge", "prompts", "dataset"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}")
    search = _parse_search(dict(data.get("search", {})), new_run)
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
    prompts = _parse_prompts(data.get("prompts", {}), new_run)
    dataset = _parse_dataset(data.get("dataset", {}))
    return RunConfig(search=search, mentors=mentors, interns=interns, judge=judge,
                     prompts=prompts, dataset=dataset)


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
