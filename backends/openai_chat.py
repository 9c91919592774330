"""The `openai` backend: any OpenAI-compatible `/chat/completions` endpoint.

Serves mentors and the judge (`complete`) and, through concurrent single completions, interns
(`rollout`). One attempt per call; retries live in the call gate. The API key is read from the
environment per request and never kept, logged or put in an error message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx

from backends.base import BackendError, Call, PermanentError, TransientError, gather
from backends.http import (
    api_key,
    check_response,
    key_missing,
    make_client,
    redact,
    transport_error,
)
from backends.images import data_url
from backends.messages import chat_messages
from mics.config import ConfigError, ModelConfig, parse_options
from mics.types import Image, Prompt, Reply, Usage


@dataclass(frozen=True)
class OpenAIOptions:
    """`options` of an openai model. image_max_side: mentor images are downsized to this longest
    side (the reference used 512; 0 sends them at full size, as interns see them); send_top_k:
    the server accepts `top_k` (vLLM, SGLang); send_seed: send the sample index as `seed`;
    max_tokens_field: "max_completion_tokens" for o-series/gpt-5 (they reject `max_tokens`);
    max_tokens: this model's own output limit (0: the search's), for thinking models whose
    reasoning counts against it; reasoning_effort: sent when set ("low", "medium", ...);
    send_sampling: false leaves `temperature` and `top_p` out (reasoning models reject
    non-default values); extra_body: merged into every request body (e.g.
    {"return_meta_info": true}: SGLang's chat reports `meta_info.cached_tokens` with it in recent
    releases; 0.5.2-0.5.9 ignore the field, use `--enable-cache-report` there, see
    docs/endpoints.md)."""

    image_max_side: int = 512
    send_top_k: bool = False
    send_seed: bool = False
    max_tokens_field: str = "max_tokens"
    max_tokens: int = 0
    reasoning_effort: str = ""
    send_sampling: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, cfg: ModelConfig, role: str = "mentor") -> OpenAIOptions:
        """The model's options over the defaults; ConfigError naming the model and the key.
        An intern's defaults differ (`INTERN_DEFAULTS`): it samples with the search's `top_k`
        and sees full-size images, as an SGLang or in-process intern does."""
        where = f"model {cfg.name!r}"
        opts = parse_options(cls, cfg.options, where, "openai")
        if role == "intern":
            opts = replace(opts, **{k: v for k, v in INTERN_DEFAULTS.items()
                                    if k not in cfg.options})
        if opts.image_max_side < 0:
            raise ConfigError(f"{where}: options.image_max_side must be an integer >= 0")
        if opts.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(f"{where}: options.max_tokens_field must be "
                              "\"max_tokens\" or \"max_completion_tokens\"")
        if opts.max_tokens < 0:
            raise ConfigError(f"{where}: options.max_tokens must be an integer >= 0")
        if not cfg.base_url:
            raise ConfigError(f"{where}: the openai backend needs base_url")
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise ConfigError(f"{where}: {key_missing(cfg.api_key_env)}")
        return opts


# options that change what the model replies, so they are part of the memo key when set
_REPLY_OPTIONS = ("max_tokens", "reasoning_effort", "send_sampling")
# An intern on an OpenAI-compatible server (vLLM, SGLang) sends `top_k`: left out, the server
# takes the model's generation_config (Qwen2-VL: top_k = 1), so every temperature samples
# greedily (B8). It sees full-size images, as other interns do. Both are part of an intern's
# memo key when they differ from the mentor defaults (so runs stored before keep theirs apart).
INTERN_DEFAULTS: dict[str, Any] = {"send_top_k": True, "image_max_side": 0}
OPTIONS: dict[str, Any] = asdict(OpenAIOptions())  # option -> default
SAMPLE_HEADER = "X-Mics-Sample"  # the sample index, so simulators can reproduce a sample


def _messages(prompt: Prompt, max_side: int) -> list[dict[str, Any]]:
    """System message (when it has text), then one user turn: a plain string if text-only,
    else ordered parts with images as data URLs."""
    def image_url(part: Image) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": data_url(part.image, max_side)}}

    return chat_messages(prompt, image_url, as_text=not prompt.images(), empty_system=False)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def cached_tokens(usage: dict[str, Any], choice: dict[str, Any]) -> int:
    """Prompt tokens served from the provider's cache, from whichever field it reports:
    `usage.prompt_tokens_details.cached_tokens` (OpenAI, DashScope, Gemini; SGLang with
    `--enable-cache-report`), `usage.prompt_cache_hit_tokens` (DeepSeek), or
    `choices[0].meta_info.cached_tokens` (SGLang chat with `return_meta_info`)."""
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = cached or _int(usage.get("prompt_cache_hit_tokens"))
    meta = choice.get("meta_info")
    if not cached and isinstance(meta, dict):
        cached = _int(meta.get("cached_tokens"))
    return cached


class OpenAIChat:
    """An OpenAI-compatible chat endpoint as a ChatModel (and a RolloutModel)."""

    def __init__(self, config: ModelConfig, role: str = "mentor") -> None:
        self.options = OpenAIOptions.parse(config, role)
        self.config = config
        self.role = role
        self._client = make_client(config)
        self._where = f"{config.name} ({config.model} at {config.base_url})"

    def __repr__(self) -> str:
        return f"OpenAIChat(name={self.config.name!r}, model={self.config.model!r})"

    def identity(self) -> dict[str, Any]:
        keys = (*_REPLY_OPTIONS, *INTERN_DEFAULTS) if self.role == "intern" else _REPLY_OPTIONS
        changed = {k: getattr(self.options, k) for k in keys
                   if getattr(self.options, k) != OPTIONS[k]}
        return {"backend": "openai", "model": self.config.model, **changed}

    def max_tokens(self, call: Call) -> int:
        """The output limit sent: this model's own (options.max_tokens) or the search's."""
        return self.options.max_tokens or call.sampling.max_tokens

    def _body(self, call: Call) -> dict[str, Any]:
        s = call.sampling
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": _messages(call.prompt, self.options.image_max_side),
        }
        if self.options.send_sampling:
            body.update(temperature=s.temperature, top_p=s.top_p)
        body[self.options.max_tokens_field] = self.max_tokens(call)
        if self.options.reasoning_effort:
            body["reasoning_effort"] = self.options.reasoning_effort
        if s.stop:
            body["stop"] = list(s.stop)
        if self.options.send_top_k:
            body["top_k"] = s.top_k
        if self.options.send_seed:
            body["seed"] = call.sample_index
        body.update(self.options.extra_body)
        return body

    async def complete(self, call: Call) -> Reply:
        key = api_key(self.config)
        try:
            return await self._complete(call, key)
        except BackendError as e:
            message = redact(str(e), self.config)  # a server that echoes the key must not leak it
            if message != str(e):
                raise e.again(message) from None
            raise

    async def _complete(self, call: Call, key: str | None) -> Reply:
        headers = {SAMPLE_HEADER: str(call.sample_index)}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = self._body(call)
        start = time.perf_counter()
        try:
            resp = await self._client.post("/chat/completions", json=body, headers=headers)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise transport_error(e, self.config) from None
        latency = time.perf_counter() - start
        check_response(resp, self.config)
        return self._parse(resp, latency, self.max_tokens(call))

    def _parse(self, resp: httpx.Response, latency: float, max_tokens: int = 0) -> Reply:
        try:
            data = resp.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TransientError(f"{self._where}: malformed reply (HTTP {resp.status_code}): "
                                 f"{resp.text[:200]!r}") from None
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise TransientError(f"{self._where}: reply content is not a string")
        finish = str(choice.get("finish_reason") or "stop")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        if finish == "abort":  # SGLang's OpenAI server: the generation was cut off
            raise TransientError(f"{self._where}: the server aborted the generation "
                                 "(finish \"abort\")")
        if finish == "content_filter":
            raise PermanentError(
                f"{self._where}: the provider's content filter stopped the reply (finish "
                "\"content_filter\"); it is recorded as a failed call, not as an answer")
        if not content and finish == "length":
            raise PermanentError(
                f"{self._where}: empty reply cut off at the output limit ({max_tokens} tokens, "
                f"finish \"length\", {_int(usage.get('completion_tokens'))} completion tokens): "
                "a thinking model spent the whole limit on reasoning. Raise options.max_tokens "
                "or lower options.reasoning_effort for this model")
        return Reply(
            text=content or "",
            usage=Usage(prompt_tokens=_int(usage.get("prompt_tokens")),
                        completion_tokens=_int(usage.get("completion_tokens")),
                        cached_tokens=cached_tokens(usage, choice), latency_s=round(latency, 6)),
            finish_reason=finish,
        )

    async def rollout(self, calls: Sequence[Call]) -> list[Reply | BackendError]:
        """Concurrent single completions, in order; a failed one leaves its error in its slot."""
        return await gather([lambda c=c: self.complete(c) for c in calls])

    def requests_for(self, calls: Sequence[Call]) -> int:
        """`rollout` sends one completion request per call."""
        return len(calls)

    async def aclose(self) -> None:
        await self._client.aclose()
