"""Shared HTTP plumbing: one httpx client per endpoint and error classification."""

from __future__ import annotations

import os

import httpx

from backends.aio_client import AioClient
from backends.base import BackendError, FatalError, PermanentError, TransientError
from mics.config import ModelConfig

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # bad key, no access, no such model: every call would fail


def api_key(cfg: ModelConfig) -> str | None:
    """The key from the environment variable the config names; never stored anywhere."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise PermanentError(
            f"{cfg.name}: environment variable {cfg.api_key_env} is not set (it holds the API key)"
        )
    return key


def redact(text: str, cfg: ModelConfig) -> str:
    """Remove the endpoint's key from text (a server may echo the Authorization header)."""
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return text.replace(key, "***") if key else text


def make_client(cfg: ModelConfig) -> AioClient:
    """An async client for one endpoint, sized to its concurrency limit: aiohttp underneath
    (a third of httpx's CPU per request), httpx's exceptions on failure (backends/aio_client.py)."""
    return AioClient(cfg.base_url, timeout_s=cfg.timeout_s, max_connections=cfg.max_concurrency)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _server_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
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
    if resp.status_code in RETRYABLE_STATUS:
        raise TransientError(message, retry_after=_retry_after(resp), status=resp.status_code)
    if resp.status_code in FATAL_STATUS:
        raise FatalError(message, status=resp.status_code)
    raise PermanentError(message, status=resp.status_code)


def transport_error(e: Exception, cfg: ModelConfig) -> BackendError:
    """Map an httpx transport error (timeout, refused, reset) to a retryable error."""
    where = f"{cfg.name} ({cfg.model} at {cfg.base_url})"
    return TransientError(redact(f"{where}: {type(e).__name__}: {e or 'no detail'}", cfg))
