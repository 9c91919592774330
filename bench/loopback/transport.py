"""The loopback server's HTTP/1.1 transport: one asyncio event loop in a background thread.

On the wire it answers as `http.server.BaseHTTPRequestHandler` with `protocol_version =
"HTTP/1.1"` did (status line, `Server` and `Date` headers, keep-alive rules, HTTP/1.0 and 0.9,
`Expect: 100-continue`, and its error replies: 400, 414, 431, 501, 505), at a fraction of the
CPU: no thread per connection and no email-package header parsing. Requests on one connection
are answered in order; a reply's `delay_s` is a timer, not a sleeping thread. Stricter than
http.server on malformed headers (a line without a field name, an unparsable Content-Length):
400 and close, where it parsed on or dropped the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler

from bench.loopback.wire import Response

_BASE = BaseHTTPRequestHandler
_VERSION = "HTTP/1.1"  # the protocol_version replies carry
_SERVER = f"Server: {_BASE.server_version} {_BASE.sys_version}\r\n".encode("latin-1")
_MAXLINE = 65536  # http.client's limits, which http.server applies
_MAXHEADERS = 100
_V09 = "HTTP/0.9"
_NO_BODY = (204, 205, 304)
_FIELD_NAME_BAD = frozenset(" \t\r\n\x00:")

Handler = Callable[[str, str, "Headers", bytes], Response]


class Headers:
    """Request headers: case-insensitive `get` (the first of repeated fields wins, as with
    http.server's `self.headers`), `items()` in arrival order."""

    __slots__ = ("_first", "_items")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        first: dict[str, str] = {}
        for name, value in items:
            first.setdefault(name.lower(), value)
        self._first = first

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._first.get(name.lower(), default)

    def __getitem__(self, name: str) -> str | None:
        return self._first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


_date_cache: tuple[int, bytes] = (0, b"")


def _date_header() -> bytes:
    """`Date: ...` as http.server writes it (second resolution, so cached per second)."""
    global _date_cache
    now = time.time()
    sec = int(now)
    if _date_cache[0] != sec:
        _date_cache = (sec, f"Date: {formatdate(now, usegmt=True)}\r\n".encode("latin-1"))
    return _date_cache[1]


_status_cache: dict[int, bytes] = {}


def _status_line(code: int) -> bytes:
    line = _status_cache.get(code)
    if line is None:
        reason = _BASE.responses[code][0] if code in _BASE.responses else ""
        line = _status_cache[code] = f"{_VERSION} {code} {reason}\r\n".encode("latin-1")
    return line


def encode_response(resp: Response, request_version: str) -> bytes:
    """The bytes of a reply (BaseHTTPRequestHandler.send_response, headers, body); an HTTP/0.9
    request gets the body alone."""
    if request_version == _V09:
        return resp.body
    head = [_status_line(resp.status), _SERVER, _date_header()]
    head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in resp.headers.items()]
    head.append(b"Content-Length: %d\r\n\r\n" % len(resp.body))
    head.append(resp.body)
    return b"".join(head)


def encode_error(code: int, message: str | None, explain: str | None, request_version: str,
                 command: str) -> bytes:
    """The bytes of BaseHTTPRequestHandler.send_error (always followed by a close)."""
    short, long = _BASE.responses.get(code, ("???", "???"))
    message = short if message is None else message
    explain = long if explain is None else explain
    body = b""
    if code >= 200 and code not in _NO_BODY:
        body = (_BASE.error_message_format % {
            "code": code, "message": html.escape(message, quote=False),
            "explain": html.escape(explain, quote=False)}).encode("UTF-8", "replace")
    out = b""
    if request_version != _V09:
        lines = [f"{_VERSION} {code} {message}\r\n".encode("latin-1"), _SERVER, _date_header(),
                 b"Connection: close\r\n"]
        if body:
            lines += [f"Content-Type: {_BASE.error_content_type}\r\n".encode("latin-1"),
                      b"Content-Length: %d\r\n" % len(body)]
        out = b"".join(lines) + b"\r\n"
    if command != "HEAD" and body:
        out += body
    return out


class _Request:
    """A parsed request head, waiting for `length` body bytes."""

    __slots__ = ("method", "path", "version", "headers", "length", "keep")

    def __init__(self, method: str, path: str, version: str, headers: Headers, length: int,
                 keep: bool) -> None:
        self.method, self.path, self.version = method, path, version
        self.headers, self.length, self.keep = headers, length, keep


class _Error(Exception):
    """A request answered with `encode_error(...)`, then the connection closes."""

    def __init__(self, code: int, message: str | None = None, explain: str | None = None,
                 version: str = _V09, command: str = "") -> None:
        super().__init__(code, message)
        self.reply = encode_error(code, message, explain, version, command)


class _Close(Exception):
    """The connection closes without a reply (a blank request line, end of input)."""


def _request_line(raw: str) -> tuple[str, str, str, bool]:
    """(method, path, version, keep-alive) of a request line, or the error http.server sends."""
    line = raw.rstrip("\r\n")
    words = line.split()
    if not words:
        raise _Close
    version = _V09
    keep = False
    if len(words) >= 3:
        version = words[-1]
        try:
            if not version.startswith("HTTP/"):
                raise ValueError
            parts = version.split("/", 1)[1].split(".")
            if len(parts) != 2 or any(not p.isdigit() or len(p) > 10 for p in parts):
                raise ValueError
            number = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise _Error(400, f"Bad request version ({version!r})") from None
        keep = number >= (1, 1)
        if number >= (2, 0):
            raise _Error(505, f"Invalid HTTP version ({version.split('/', 1)[1]})")
    if not 2 <= len(words) <= 3:
        raise _Error(400, f"Bad request syntax ({line!r})", version=version)
    method, path = words[:2]
    if len(words) == 2:
        keep = False
        if method != "GET":
            raise _Error(400, f"Bad HTTP/0.9 request type ({method!r})")
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return method, path, version, keep


class _Connection(asyncio.Protocol):
    """One client connection: reads requests, answers them one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.request: _Request | None = None
        self.busy = False  # a reply is waiting for its delay
        self.eof = False
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._pump()

    def eof_received(self) -> bool:
        self.eof = True  # a half-close: answer what was sent, then close
        if not self.busy:
            self._pump()
        return True

    # -- closing

    def close(self) -> None:
        if not self.closing and self.transport is not None:
            self.closing = True
            self.transport.close()

    def drop(self) -> None:
        """Shut the socket down without a reply (a `drop` fault, or the server stopping)."""
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self.transport.abort()

    # -- requests

    def _pump(self) -> None:
        while not self.busy and not self.closing:
            try:
                req = self._next()
            except _Error as e:
                self._write(e.reply)
                self.close()
                return
            except _Close:
                self.close()
                return
            if req is None:
                return
            resp = self.server.handler(req.method, req.path, req.headers, self._body(req))
            if resp.delay_s > 0:
                self.busy = True
                self.timer = self.server.loop.call_later(resp.delay_s, self._delayed, req, resp)
                return
            self._reply(req, resp)

    def _delayed(self, req: _Request, resp: Response) -> None:
        self.timer = None
        self.busy = False
        if self.closing:
            return
        self._reply(req, resp)
        self._pump()

    def _reply(self, req: _Request, resp: Response) -> None:
        if resp.drop:
            self.drop()
            return
        try:
            data = encode_response(resp, req.version)
        except UnicodeEncodeError:  # a header http.server could not send either
            self.drop()
            return
        self._write(data)
        keep = req.keep and not any(
            k.lower() == "connection" and v.lower() == "close" for k, v in resp.headers.items())
        if not keep:
            self.close()

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _line_end(self, pos: int) -> int | None:
        """End of the line starting at `pos`, as `readline(_MAXLINE + 1)` would read it (None:
        not all here yet)."""
        buf = self.buf
        nl = buf.find(b"\n", pos, pos + _MAXLINE + 1)
        if nl >= 0:
            return nl + 1
        if len(buf) - pos > _MAXLINE:
            return pos + _MAXLINE + 1
        return len(buf) if self.eof else None

    def _next(self) -> _Request | None:
        """The next complete request, with its body, taken off the buffer (None: wait)."""
        req = self.request
        if req is None:
            req = self.request = self._head()
            if req is None:
                return None
        if req.length > 0 and len(self.buf) < req.length and not self.eof:
            return None
        self.request = None
        return req

    def _head(self) -> _Request | None:
        """Parse the request line and headers (http.server's parse_request, strictly)."""
        buf = self.buf
        stop = buf.find(b"\r\n\r\n", 0, _MAXLINE - 4)
        if stop > 0 and buf.count(b"\n", 0, stop) == buf.count(b"\r\n", 0, stop):
            req = self._crlf_head(stop)  # the usual case, in one piece
            if req is not None:
                return req
        end = self._line_end(0)
        if end is None:
            return None
        if end > _MAXLINE:
            raise _Error(414, version="", command="")
        if end == 0:
            raise _Close
        method, path, version, keep = _request_line(str(buf[:end], "iso-8859-1"))
        items: list[tuple[str, str]] = []
        pos, count = end, 0
        while True:
            end = self._line_end(pos)
            if end is None:
                return None
            raw = buf[pos:end]
            if len(raw) > _MAXLINE:
                raise _Error(431, "Line too long",
                             f"got more than {_MAXLINE} bytes when reading header line",
                             version, method)
            count += 1
            if count > _MAXHEADERS:
                raise _Error(431, "Too many headers", f"got more than {_MAXHEADERS} headers",
                             version, method)
            pos = end
            if raw in (b"\r\n", b"\n", b""):
                break
            text = str(raw, "iso-8859-1")
            if text[0] in " \t":  # an obs-fold continuation line
                if not items:
                    raise _Error(400, "Bad header continuation", version=version, command=method)
                name, value = items[-1]
                items[-1] = (name, value + text)
                continue
            colon = text.find(":")
            name = text[:colon]
            if colon <= 0 or not _FIELD_NAME_BAD.isdisjoint(name):
                raise _Error(400, f"Bad header line ({text.rstrip()!r})", version=version,
                             command=method)
            items.append((name, text[colon + 1:].lstrip(" \t")))
        del buf[:pos]
        return self._request(method, path, version, keep, items)

    def _crlf_head(self, stop: int) -> _Request | None:
        """`_head` of a head ending at `stop` whose lines all end in CRLF, none too long; None
        (for `_head`'s line-by-line reading to judge) if a line is folded or malformed."""
        lines = str(self.buf[:stop], "iso-8859-1").split("\r\n")
        if len(lines) > _MAXHEADERS:  # the header lines and the blank line after them
            return None
        method, path, version, keep = _request_line(lines[0])
        items = []
        for line in lines[1:]:
            colon = line.find(":")
            name = line[:colon]
            if colon <= 0 or not _FIELD_NAME_BAD.isdisjoint(name):
                return None
            items.append((name, line[colon + 1:].lstrip(" \t")))
        del self.buf[:stop + 4]
        return self._request(method, path, version, keep, items)

    def _request(self, method: str, path: str, version: str, keep: bool,
                 items: list[tuple[str, str]]) -> _Request:
        """The request, once its head is read: keep-alive, 100-continue, method, length."""
        headers = Headers([(n, v.rstrip("\r\n")) for n, v in items])
        conntype = (headers.get("Connection") or "").lower()
        if conntype == "close":
            keep = False
        elif conntype == "keep-alive":
            keep = True
        if (headers.get("Expect") or "").lower() == "100-continue" and version >= "HTTP/1.1":
            self._write(f"{_VERSION} 100 Continue\r\n\r\n".encode("latin-1"))
        if method not in ("GET", "POST"):
            raise _Error(501, f"Unsupported method ({method!r})", version=version,
                         command=method)
        try:
            length = int(headers.get("Content-Length") or 0)
        except ValueError:
            raise _Error(400, "Bad Content-Length", version=version, command=method) from None
        return _Request(method, path, version, headers, max(0, length), keep)

    def _body(self, req: _Request) -> bytes:
        """Take the request's body off the buffer (short at end of input)."""
        if req.length <= 0:
            return b""
        data = bytes(self.buf[:req.length])
        del self.buf[:req.length]
        return data


class HttpServer:
    """The transport: `handler(method, path, headers, body) -> Response` answers requests on
    127.0.0.1:`port` from an event loop in a daemon thread; `conns` are the open connections
    (touched in that thread only)."""

    def __init__(self, handler: Handler, port: int = 0, backlog: int = 1024) -> None:
        self.handler = handler
        self.conns: set[_Connection] = set()
        self.loop = asyncio.new_event_loop()
        self._want = port
        self._backlog = backlog
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> None:
        """Listen and serve; a bind error (e.g. the port is taken) is raised here."""
        loop = self.loop
        self._thread = threading.Thread(target=loop.run_forever, name="loopback-server",
                                        daemon=True)
        self._thread.start()

        async def listen() -> asyncio.AbstractServer:
            return await loop.create_server(lambda: _Connection(self), "127.0.0.1", self._want,
                                            backlog=self._backlog, reuse_address=True)

        try:
            self._server = asyncio.run_coroutine_threadsafe(listen(), loop).result()
        except BaseException:
            self._halt()
            raise
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop listening, shut down every open connection (a waiting reply is dropped)."""
        if self._thread is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self.conns):
                conn.drop()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        self._halt()

    def _halt(self) -> None:
        loop = self.loop
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._server = None
        if not loop.is_running():
            loop.close()
