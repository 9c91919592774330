"""Shared HTTP plumbing: one httpx client per endpoint and error classification."""

from __future__ import annotations

import contextlib
import os
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from backends.aio_client import AioClient, env_proxy
from backends.base import BackendError, FatalError, PermanentError, TransientError
from backends.plain_http import PlainClient
from mics.config import ModelConfig

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # bad key, no access, no such model: every call would fail


def api_key(cfg: ModelConfig) -> str | None:
    """The key from the environment variable the config names; never stored anywhere."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise PermanentError(f"{cfg.name}: {key_missing(cfg.api_key_env)}")
    return key


def key_missing(name: str) -> str:
    """Why the API key variable `name` gives no key: unset, or set to nothing."""
    state = "is empty" if name in os.environ else "is not set"
    return f"environment variable {name} {state} (it holds the API key)"


def redact(text: str, cfg: ModelConfig) -> str:
    """Remove the endpoint's key from text (a server may echo the Authorization header)."""
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return text.replace(key, "***") if key else text


def client_kind(base_url: str) -> str:
    """"plain_http" for an `http://` endpoint no proxy covers, else "aiohttp" (see make_client)."""
    plain = (base_url.startswith("http://") and env_proxy(base_url) is None
             and os.environ.get("MICS_HTTP_CLIENT", "").lower() != "aiohttp")
    return "plain_http" if plain else "aiohttp"


def make_client(cfg: ModelConfig) -> AioClient | PlainClient:
    """An async client for one endpoint, sized to its concurrency limit, raising httpx's
    exceptions on failure. A plain `http://` endpoint no proxy covers (a local SGLang or vLLM
    server, a router) gets the lean HTTP/1.1 client (backends/plain_http.py); `https://` and
    proxied endpoints get aiohttp (backends/aio_client.py). `MICS_HTTP_CLIENT=aiohttp` gives
    every endpoint aiohttp (to compare, or to step around a server the lean client refuses)."""
    kind = PlainClient if client_kind(cfg.base_url) == "plain_http" else AioClient
    return kind(cfg.base_url, timeout_s=cfg.timeout_s, max_connections=cfg.max_concurrency)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float | None:
    """Seconds in a duration such as OpenAI's `6m0s`, `1.5s`, `20ms` or Gemini's `"53s"`."""
    text = value.strip().strip('"')
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after(resp: httpx.Response) -> float | None:
    """How long the server asks us to wait, in the order the official OpenAI client reads it:
    `retry-after-ms`, `retry-after` (seconds or an HTTP date), then, on a 429, the reset of
    the limit that was hit (`_limit_reset`), then Gemini's 429 body (`details[].retryDelay`
    of a google.rpc.RetryInfo)."""
    headers = resp.headers
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if value is not None:
        seconds = parse_duration(value)
        if seconds is not None:
            return seconds
        with contextlib.suppress(TypeError, ValueError):
            when = parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    if resp.status_code == 429 and (reset := _limit_reset(headers)) is not None:
        return reset
    return _retry_delay_in_body(resp)


def _limit_reset(headers: httpx.Headers) -> float | None:
    """A 429's wait from `x-ratelimit-reset-{requests,tokens}` (sent by OpenAI with every
    reply): the reset of the limit whose `x-ratelimit-remaining-*` is 0, the limit that was hit;
    the longer of the two when neither says so. Other statuses never wait on them: a 5xx's
    headers describe the account's limits, not the failure."""
    resets: dict[str, float] = {}
    for kind in ("requests", "tokens"):
        value = headers.get(f"x-ratelimit-reset-{kind}")
        seconds = parse_duration(value) if value is not None else None
        if seconds is not None:
            resets[kind] = seconds
    if not resets:
        return None
    hit = [s for kind, s in resets.items()
           if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"]
    return max(hit) if hit else max(resets.values())


def _retry_delay_in_body(resp: httpx.Response) -> float | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    for err in _errors(body):
        details = err.get("details")
        for d in details if isinstance(details, list) else []:
            if isinstance(d, dict) and isinstance(d.get("retryDelay"), str):
                return parse_duration(d["retryDelay"])
    return None


def _errors(body: Any) -> list[dict[str, Any]]:
    """The error objects in a reply: `{"error": {...}}`, or Gemini's `[{"error": {...}}]`."""
    items = body if isinstance(body, list) else [body]
    out = []
    for item in items:
        err = item.get("error", item) if isinstance(item, dict) else None
        if isinstance(err, dict):
            out.append(err)
    return out


# Codes that mean "no quota/balance left": retrying never helps, so the run stops (OpenAI 429
# insufficient_quota, DashScope Throttling.AllocationQuota / insufficient_quota; DeepSeek 402).
QUOTA_CODES = {"insufficient_quota", "throttling.allocationquota", "allocationquota"}
QUOTA_STATUS = {402}


def is_quota_error(resp: httpx.Response) -> bool:
    """True when the reply says the account is out of quota or balance (not a rate limit)."""
    if resp.status_code in QUOTA_STATUS:
        return True
    if resp.status_code not in (400, 403, 429):
        return False
    try:
        body = resp.json()
    except ValueError:
        return False
    for err in _errors(body):
        codes = {str(err.get(k, "")).lower() for k in ("code", "type", "status")}
        if codes & QUOTA_CODES:
            return True
    return False


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(body)[:300]


def check_response(resp: httpx.Response, cfg: ModelConfig) -> None:
    """Raise TransientError (retry) or PermanentError (fail fast) for a non-2xx reply."""
    if resp.is_success:
        return
    where = f"{cfg.name} ({cfg.model} at {cfg.base_url})"
    message = redact(f"{where}: HTTP {resp.status_code}: {_server_message(resp)}", cfg)
    if is_quota_error(resp):
        raise FatalError(f"{message} (out of quota or balance: retrying cannot help; top up "
                         "or raise the limit, then `mics resume`)", status=resp.status_code)
    if resp.status_code in RETRYABLE_STATUS:
        raise TransientError(message, retry_after=retry_after(resp), status=resp.status_code)
    if resp.status_code in FATAL_STATUS:
        raise FatalError(message, status=resp.status_code)
    raise PermanentError(message, status=resp.status_code)


def json_body(resp: httpx.Response, where: str, route: str) -> Any:
    """The reply's JSON body; TransientError (retried) when it is not JSON."""
    try:
        return resp.json()
    except ValueError:
        raise TransientError(f"{where}: malformed JSON from {route}") from None


def transport_error(e: Exception, cfg: ModelConfig) -> BackendError:
    """Map an httpx transport error (timeout, refused, reset) to a retryable error."""
    where = f"{cfg.name} ({cfg.model} at {cfg.base_url})"
    return TransientError(redact(f"{where}: {type(e).__name__}: {e or 'no detail'}", cfg))
