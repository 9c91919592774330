"""A lean HTTP/1.1 client for plain-HTTP endpoints: local SGLang or vLLM servers and routers.

`backends.http.make_client` picks it for `http://` endpoints that no proxy covers; `https://`
and proxied endpoints keep aiohttp (backends/aio_client.py). Same surface and failures as
`AioClient`, at well under half its CPU per request (BENCHMARKS.md, issue 15). It does this,
and no more:
- one request at a time per connection (no pipelining); idle keep-alive connections are
  reused newest first and closed after `KEEPALIVE_S`; at most `max_connections` are open, and
  callers beyond that wait in turn;
- TCP_NODELAY on every socket; the request carries Host, Content-Length, the caller's headers
  and `Accept-Encoding: gzip, deflate` (gzip and deflate bodies are decoded, as aiohttp does);
  no cookies, no redirects followed;
- a response is framed by Content-Length, by the chunked transfer coding, or by the close of
  the connection; 1xx interim responses are skipped;
- a connection is reused only after a complete response that allows it (HTTP/1.1, no
  `Connection: close`, no byte past the end). A byte that belongs to no request closes the
  connection, so a reply can never reach the wrong request;
- `timeout_s` bounds connecting (the wait for a free connection included) and each wait for
  data; failures raise the httpx exceptions `AioClient` raises (ConnectError, ConnectTimeout,
  ReadTimeout, RemoteProtocolError), so `backends.http.transport_error` maps them as before.
Connections belong to one event loop; a call from a new loop (a second `anyio.run`) opens new
ones.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import zlib
from typing import Any
from urllib.parse import urlsplit

import httpx

from backends.aio_client import KEEPALIVE_S, EndpointClient, Response

MAX_HEAD = 64 * 1024  # status line and headers
_NO_BODY_STATUS = (204, 304)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_STATUS = re.compile(r"HTTP/1\.([01]) ([0-9]{3})(?: .*)?", re.DOTALL)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


class Headers(dict[str, str]):
    """Response headers by lower-case name; lookups ignore case. Repeated headers are joined
    with ", " (as httpx's `Headers.get` returns them)."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


class _Framing(Exception):
    """The server broke HTTP/1.1 framing; the connection is closed."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the parser of the response it is waiting for."""

    def __init__(self, client: PlainClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[tuple[int, Headers, bytes, bool]] | None = None
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.last_data = 0.0
        self._head: tuple[int, Headers, bool] | None = None  # status, headers, keep-alive
        self._length = -1  # body bytes expected; -1: chunked; -2: until the connection closes
        self._body = bytearray()  # decoded chunks so far
        self._no_body = False

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():  # bytes no request asked for
            self.abort()
            return
        self.last_data = self.client.loop_time()
        self.buf += data
        try:
            reply = self._parse()
        except (_Framing, httpx.DecodingError) as e:
            waiter.set_exception(e if isinstance(e, httpx.DecodingError) else
                                 httpx.RemoteProtocolError(f"{self.client.base_url}: {e}"))
            self.abort()
            return
        if reply is not None:
            self.waiter = None
            waiter.set_result(reply)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is None and self._head is not None and self._length == -2:
                status, headers, _ = self._head  # a body that ends with the connection
                try:
                    waiter.set_result((status, headers,
                                       self._decoded(headers, bytes(self.buf)), False))
                except httpx.DecodingError as e:
                    waiter.set_exception(e)
            else:
                detail = f": {exc}" if exc else ""
                waiter.set_exception(httpx.RemoteProtocolError(
                    f"{self.client.base_url}: server disconnected without a complete "
                    f"response{detail}"))
        self.client.lost(self)

    # ---- requests ------------------------------------------------------------------------

    def send(self, data: bytes, no_body: bool,
             waiter: asyncio.Future[tuple[int, Headers, bytes, bool]]) -> None:
        """Write one request; `waiter` gets (status, headers, body, reusable)."""
        self.waiter, self._no_body, self._head = waiter, no_body, None
        self.last_data = self.client.loop_time()
        if self.timer is None:  # else the running timer re-arms from `last_data` when it fires
            self.timer = self.client.loop.call_later(self.client.timeout_s, self._check_timeout)
        self.transport.write(data)  # type: ignore[union-attr]

    def _check_timeout(self) -> None:
        """No data for `timeout_s`: fail the request. One timer per connection, not per request:
        it stays armed across the requests it outlives and re-arms from the latest data (or
        request start); it lapses on an idle connection."""
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        waited = self.client.loop_time() - self.last_data
        if waited < self.client.timeout_s:
            self.timer = self.client.loop.call_later(self.client.timeout_s - waited,
                                                     self._check_timeout)
            return
        waiter.set_exception(httpx.ReadTimeout(
            f"{self.client.base_url}: no data for {self.client.timeout_s:g} s"))
        self.abort()

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    # ---- parsing -------------------------------------------------------------------------

    def _parse(self) -> tuple[int, Headers, bytes, bool] | None:
        """The complete response once the buffer holds it (None until then)."""
        while self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise _Framing(f"response head larger than {MAX_HEAD} bytes")
                return None
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            status, headers, keep = _parse_head(head)
            if 100 <= status < 200:
                if status == 101:
                    raise _Framing("unexpected 101 Switching Protocols")
                continue  # an interim response: the real one follows
            self._head = (status, headers, keep)
            self._length = _body_length(status, headers, self._no_body)
            self._body = bytearray()
        status, headers, keep = self._head
        if self._length >= 0:
            if len(self.buf) < self._length:
                return None
            body = bytes(self.buf[:self._length])
            del self.buf[:self._length]
        elif self._length == -1:
            if not self._dechunk():
                return None
            body = bytes(self._body)
        else:
            return None  # the body ends when the connection does (connection_lost)
        # both framings at once is a server fault: take chunked (RFC 9112), then close
        reusable = keep and not self.buf and not (
            "transfer-encoding" in headers and "content-length" in headers)
        self.buf.clear()
        return status, headers, self._decoded(headers, body), reusable

    def _dechunk(self) -> bool:
        """Move complete chunks from the buffer to the body; True after the last chunk and
        its trailers."""
        buf = self.buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > MAX_HEAD:
                    raise _Framing("chunk size line too long")
                return False
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise _Framing(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:  # the last chunk; trailer fields (ignored) end with an empty line
                pos = line_end + 2
                while (nxt := buf.find(b"\r\n", pos)) != pos:
                    if nxt < 0:
                        if len(buf) > MAX_HEAD:
                            raise _Framing("trailers too long")
                        return False
                    pos = nxt + 2
                del buf[:pos + 2]
                return True
            start = line_end + 2
            if len(buf) < start + size + 2:
                return False
            if buf[start + size:start + size + 2] != b"\r\n":
                raise _Framing("chunk not followed by CRLF")
            self._body += buf[start:start + size]
            del buf[:start + size + 2]

    def _decoded(self, headers: Headers, body: bytes) -> bytes:
        coding = headers.get("content-encoding", "identity").strip().lower()
        if coding in ("", "identity") or not body:
            return body
        try:
            if coding in ("gzip", "x-gzip"):
                return zlib.decompress(body, 16 + zlib.MAX_WBITS)
            if coding == "deflate":
                try:
                    return zlib.decompress(body)
                except zlib.error:  # raw deflate, as some servers send it
                    return zlib.decompress(body, -zlib.MAX_WBITS)
        except zlib.error as e:
            raise httpx.DecodingError(f"{self.client.base_url}: bad {coding} body: {e}") from None
        raise httpx.DecodingError(f"{self.client.base_url}: unsupported content-encoding "
                                  f"{coding!r}")


def _parse_head(head: bytes) -> tuple[int, Headers, bool]:
    """Status, headers and whether the connection may be kept, from a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = _STATUS.fullmatch(lines[0])
    if status is None:
        raise _Framing(f"bad status line {lines[0][:80]!r}")
    version_11, code = status.group(1) == "1", int(status.group(2))
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):  # no name, a space before ":", obs-fold
            raise _Framing(f"bad header line {line[:80]!r}")
        key, value = name.lower(), value.strip(" \t")
        old = dict.get(headers, key)
        dict.__setitem__(headers, key, value if old is None else f"{old}, {value}")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "close" not in tokens if version_11 else "keep-alive" in tokens
    return code, headers, keep


def _body_length(status: int, headers: Headers, no_body: bool) -> int:
    """Body bytes to read: a count, -1 for chunked, -2 for "until the connection closes"."""
    if no_body or status in _NO_BODY_STATUS:
        return 0
    coding = headers.get("transfer-encoding")
    if coding is not None:
        return -1 if coding.rsplit(",", 1)[-1].strip().lower() == "chunked" else -2
    length = headers.get("content-length")
    if length is None:
        return -2
    values = {v.strip() for v in length.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(value := values.pop()):
        raise _Framing(f"bad content-length {length[:40]!r}")
    return int(value)


class PlainClient(EndpointClient):
    """One plain-HTTP endpoint's client: `get`/`post` relative to `base_url`, and `aclose`."""

    def __init__(self, base_url: str, *, timeout_s: float, max_connections: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"PlainClient serves http:// URLs only, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._host = parts.hostname
        self._port = parts.port or 80
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._authority = host if self._port == 80 else f"{host}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._limit = max(1, max_connections)
        self._heads: dict[tuple[str, str], bytes] = {}
        self._idle: list[_Connection] = []  # newest last
        self._open = 0  # connections open or being opened
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_time = _no_loop_time

    @property
    def open_connections(self) -> int:
        """Connections open (or being opened) now."""
        return self._open

    @property
    def idle_connections(self) -> list[_Connection]:
        """The connections waiting to be reused (a copy)."""
        return list(self._idle)

    async def _request(self, method: str, path: str, body: bytes | None,
                       headers: dict[str, str] | None) -> Response:
        if body is None and method == "POST":
            body = b""  # Content-Length: 0
        head = self._heads.get((method, path))
        if head is None:
            head = self._heads[(method, path)] = (
                f"{method} {self._prefix}{path} HTTP/1.1\r\nHost: {self._authority}\r\n"
                "Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n").encode("latin-1")
        data = head + _header_bytes(headers, body) + (body or b"")
        conn = await self._acquire()
        waiter: asyncio.Future[tuple[int, Headers, bytes, bool]] = self.loop.create_future()  # type: ignore[union-attr]
        try:
            conn.send(data, method == "HEAD", waiter)
            status, response_headers, content, reusable = await waiter
        except BaseException:
            conn.abort()  # a reply may still be on its way: never reuse this connection
            raise
        if reusable and not conn.closed:
            self._release(conn)
        else:
            conn.abort()
        return Response(status, response_headers, content)

    # ---- the pool ------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self._adopt(loop)
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and self.loop_time() - conn.idle_since < KEEPALIVE_S:
                    return conn
                conn.abort()  # stale: connection_lost frees its place
            if self._open < self._limit:
                return await self._connect()
            await self._wait_for_place(loop)

    async def _wait_for_place(self, loop: asyncio.AbstractEventLoop) -> None:
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        timer = loop.call_later(self.timeout_s, _expire, turn, self.base_url, self.timeout_s)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._wake()  # our turn came as we were cancelled: pass it on
            raise
        finally:
            timer.cancel()
            if turn in self._waiting:
                self._waiting.remove(turn)

    def _wake(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return

    async def _connect(self) -> _Connection:
        self._open += 1
        loop = self.loop
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self._host, self._port),  # type: ignore[union-attr]
                self.timeout_s)
        except TimeoutError:
            self._free_place()
            raise httpx.ConnectTimeout(f"{self.base_url}: timed out connecting "
                                       f"({self.timeout_s:g} s)") from None
        except OSError as e:
            self._free_place()
            raise httpx.ConnectError(f"{self.base_url}: {e}") from None
        except BaseException:
            self._free_place()
            raise
        return conn

    def _free_place(self) -> None:
        self._open -= 1
        self._wake()

    def _release(self, conn: _Connection) -> None:
        conn.idle_since = self.loop_time()
        self._idle.append(conn)
        self._wake()

    def lost(self, conn: _Connection) -> None:
        """A connection closed (either side): its place is free."""
        if conn.transport is None:
            return
        conn.transport = None
        if conn in self._idle:
            self._idle.remove(conn)
        self._free_place()

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start afresh on `loop`: the previous loop's connections die with it."""
        old, self._idle, self._waiting = self._idle, [], collections.deque()
        for conn in old:
            conn.client = _GONE
            if self.loop is not None and not self.loop.is_closed():
                conn.abort()
        self.loop, self._open = loop, 0
        self.loop_time = loop.time

    async def aclose(self) -> None:
        """Close the idle connections (requests in flight close theirs when they end)."""
        idle, self._idle = self._idle, []
        if self.loop is not None and not self.loop.is_closed():
            for conn in idle:
                conn.abort()


def _header_bytes(headers: dict[str, str] | None, body: bytes | None) -> bytes:
    """The caller's header lines, Content-Length when there is a body, and the blank line."""
    lines = [_header_line(name, value) for name, value in headers.items()] if headers else []
    if body is not None:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)


_LINES: dict[tuple[str, str], bytes] = {}  # checked header lines; a few per endpoint


def _header_line(name: str, value: str) -> bytes:
    """`name: value` CRLF, checked once per distinct pair: a token name the client does not set
    itself, a latin-1 value with no CR, LF or NUL (no header injection)."""
    line = _LINES.get((name, value))
    if line is not None:
        return line
    if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
        raise httpx.LocalProtocolError(f"invalid header {name[:40]!r}")
    if name.lower() in _RESERVED:
        raise httpx.LocalProtocolError(f"header {name!r} is set by the client")
    try:
        line = f"{name}: {value}\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise httpx.LocalProtocolError(f"header {name!r} is not latin-1 text") from None
    if len(_LINES) >= 1024:
        _LINES.clear()
    _LINES[(name, value)] = line
    return line


_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection",
                       "accept-encoding"})


def _expire(turn: asyncio.Future[None], url: str, timeout_s: float) -> None:
    if not turn.done():
        turn.set_exception(httpx.ConnectTimeout(
            f"{url}: timed out waiting for a free connection ({timeout_s:g} s)"))


def _no_loop_time() -> float:
    return 0.0


class _Gone:
    """The client of connections left behind on a finished event loop."""

    def lost(self, conn: _Connection) -> None:
        pass

    base_url = "(closed)"
    timeout_s = 0.0

    @staticmethod
    def loop_time() -> float:
        return 0.0


_GONE: Any = _Gone()
