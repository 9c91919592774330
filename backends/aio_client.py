"""A lean async HTTP client on aiohttp, with the small httpx-shaped surface the backends use.

`backends.http.make_client` returns one per endpoint. It costs a fraction of httpx's client CPU
per request (see BENCHMARKS.md), and keeps what the call gate relies on:
- transport failures are raised as httpx exceptions (`httpx.ConnectError`, `httpx.ReadTimeout`,
  `httpx.RemoteProtocolError`, ...), so callers' `except httpx.HTTPError` and the mapping to
  transient errors stay as they are; HTTP statuses are left to `check_response`;
- timeouts: `timeout_s` bounds connecting (pool wait included) and each socket read;
- keep-alive connections, at most `max_concurrency` of them; TCP_NODELAY on every socket
  (aiohttp sets it on each connection); no redirects followed;
- request bodies serialized with orjson; one process-wide SSL context (certifi's CA bundle, as
  httpx uses), and none at all for http:// endpoints;
- HTTP(S)_PROXY / NO_PROXY from the environment, as httpx honours them, read once per client.
A session belongs to one event loop: it is opened on first use, and opened again if a later
call comes from another loop (e.g. a second `anyio.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.request
from functools import lru_cache
from typing import Any

import aiohttp
import httpx
import orjson
import yarl

_JSON = {"content-type": "application/json"}


@lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """The one SSL context every https:// endpoint shares."""
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with httpx
        return ssl.create_default_context()


def _abandon(session: aiohttp.ClientSession) -> None:
    """Mark a session of a finished event loop closed (its sockets died with the loop), so it
    does not warn about being unclosed."""
    connector = session.connector
    session.detach()
    if connector is not None:
        with contextlib.suppress(Exception):
            connector._close()  # the loop is closed: this only marks the connector closed


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP_PROXY, HTTPS_PROXY; NO_PROXY exempts)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    proxy = urllib.request.getproxies_environment().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    return proxy


class Response:
    """A complete reply: status, headers (case-insensitive), body bytes."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Any, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError if it is not JSON."""
        return orjson.loads(self.content)


KEEPALIVE_S = 15.0  # an idle keep-alive connection older than this is closed, not reused


class EndpointClient:
    """`get`/`post` relative to an endpoint's `base_url`, both clients' one surface; a client
    supplies `_request(method, path, body, headers)`."""

    async def _request(self, method: str, path: str, body: bytes | None,
                       headers: dict[str, str] | None) -> Response:
        raise NotImplementedError

    async def get(self, path: str, *, headers: dict[str, str] | None = None) -> Response:
        return await self._request("GET", path, None, headers)

    async def post(self, path: str, *, json: Any = None, content: bytes | None = None,
                   headers: dict[str, str] | None = None) -> Response:
        """POST `content` as is, or `json` serialized with orjson (content-type JSON)."""
        if json is not None:
            content = orjson.dumps(json)
            headers = {**_JSON, **(headers or {})}
        return await self._request("POST", path, content, headers)


class AioClient(EndpointClient):
    """One endpoint's client on aiohttp: `get`/`post` relative to `base_url`, and `aclose`."""

    def __init__(self, base_url: str, *, timeout_s: float, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._limit = max(1, max_connections)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s,
                                              sock_read=timeout_s)
        self._ssl: ssl.SSLContext | bool = (ssl_context() if self.base_url.startswith("https:")
                                            else False)
        self._proxy = env_proxy(self.base_url)
        self._urls: dict[str, yarl.URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ssl_setting(self) -> ssl.SSLContext | bool:
        """The SSL context of an https:// endpoint (one per process); False for http://."""
        return self._ssl

    @property
    def proxy(self) -> str | None:
        """The proxy the environment names for this endpoint, read once."""
        return self._proxy

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The aiohttp session of the current event loop's calls (None before the first)."""
        return self._session

    def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            if self._session is not None and self._loop is not None and self._loop.is_closed():
                _abandon(self._session)
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ssl=self._ssl,
                                             keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  auto_decompress=True, raise_for_status=False)
            self._loop = loop
        return self._session

    async def _request(self, method: str, path: str, body: bytes | None,
                       headers: dict[str, str] | None) -> Response:
        session = self._open()
        url = self._urls.get(path)
        if url is None:  # parsed once per path, not per request
            url = self._urls[path] = yarl.URL(self.base_url + path)
        try:
            async with session.request(method, url, data=body, headers=headers,
                                       allow_redirects=False, proxy=self._proxy) as r:
                return Response(r.status, r.headers, await r.read())
        except aiohttp.ConnectionTimeoutError as e:
            raise httpx.ConnectTimeout(str(e) or "timed out connecting") from None
        except TimeoutError as e:  # aiohttp's socket read timeout included
            raise httpx.ReadTimeout(str(e) or "timed out reading") from None
        except aiohttp.ClientConnectorError as e:
            raise httpx.ConnectError(str(e)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientResponseError) as e:
            raise httpx.RemoteProtocolError(str(e) or type(e).__name__) from None
        except aiohttp.ClientError as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from None

    async def aclose(self) -> None:
        """Close the session's connections (only on the loop that opened them)."""
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            await session.close()
        elif self._loop is not None and self._loop.is_closed():
            _abandon(session)
