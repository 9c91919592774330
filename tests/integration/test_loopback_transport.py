"""The loopback server's asyncio HTTP/1.1 transport over real sockets: the bytes it sends are
those of http.server's BaseHTTPRequestHandler (the transport it replaced) for the same requests,
and delays, drops, half-closes, pipelining and stop behave as there."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench.loopback.transport import Headers, HttpServer
from bench.loopback.wire import Response


def handler(method: str, path: str, headers: Any, body: bytes) -> Response:
    """What both servers answer: an echo of what was parsed, a drop, a delay or a 404."""
    if path == "/drop":
        return Response(drop=True)
    if path.startswith("/late"):
        return Response(200, b"late " + path.encode(), {"Content-Type": "text/plain"},
                        delay_s=float(path.rsplit("/", 1)[1]))
    if path == "/missing":
        return Response(404, b'{"error": "no"}', {"Content-Type": "application/json"})
    echo = {"method": method, "path": path, "body": body.decode("latin-1"),
            "sample": headers.get("x-mics-sample"), "auth": headers.get("Authorization"),
            "fold": headers.get("X-Fold"), "absent": headers.get("X-Absent", "default")}
    return Response(200, json.dumps(echo).encode(),
                    {"Content-Type": "application/json", "X-Seen": str(len(body))})


class _Reference(BaseHTTPRequestHandler):
    """The transport before: http.server with the loopback server's old request handling."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return None

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        resp = handler(method, self.path, self.headers, raw)
        time.sleep(resp.delay_s)
        if resp.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        self.wfile.write(resp.body)


@contextlib.contextmanager
def reference() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Reference)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def transport() -> Iterator[HttpServer]:
    srv = HttpServer(handler)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def exchange(port: int, *chunks: bytes, half_close: bool = False) -> bytes:
    """Send `chunks` (one write each), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for c in chunks:
            s.sendall(c)
            time.sleep(0.01)  # separate segments: the server must reassemble them
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return re.sub(rb"Date: [^\r\n]*", b"Date: -", out)


CLOSE = b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n"
BODY = b'{"k": "v\xe9"}'


def post(path: bytes, body: bytes = BODY, extra: bytes = b"", version: bytes = b"HTTP/1.1"
         ) -> bytes:
    return (b"POST " + path + b" " + version + b"\r\nHost: x\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


CASES: dict[str, tuple[bytes, ...]] = {
    "keep-alive and pipelining": (
        b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\n\r\n" + post(b"/b") + b"GET /missing HTTP/1.1\r\n\r\n"
        + CLOSE,),
    "headers: case, repeats, folding, spacing": (
        post(b"/h", extra=b"x-MICS-sample: 3\r\nX-Mics-Sample: 9\r\nAuthorization:Bearer k  \r\n"
             b"X-Fold: a\r\n \tb\r\n") + CLOSE,),
    "a request split across writes": tuple(
        (post(b"/split") + CLOSE)[i:i + 5] for i in range(0, len(post(b"/split") + CLOSE), 5)),
    "bare LF line ends": (b"GET /lf HTTP/1.1\nHost: x\n\n" + CLOSE,),
    "double slash path": (b"GET //x//y HTTP/1.1\r\n\r\n" + CLOSE,),
    "HTTP/1.0 closes": (b"GET /old HTTP/1.0\r\n\r\n",),
    "HTTP/1.0 keep-alive": (b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + CLOSE,),
    "Connection: close": (
        b"GET /a HTTP/1.1\r\nConnection: CLOSE\r\n\r\nGET /never HTTP/1.1\r\n\r\n",),
    "HTTP/0.9": (b"GET /nine\r\nHost: x\r\n\r\n",),
    "HTTP/0.9 POST": (b"POST /nine\r\n\r\n",),
    "HTTP/2": (b"GET / HTTP/2.0\r\n\r\n",),
    "bad version": (b"GET / HTTP/1.x\r\n\r\n",),
    "not HTTP": (b"GET / SPDY/1.1\r\n\r\n",),
    "four words": (b"GET / x HTTP/1.1\r\n\r\n",),
    "one word": (b"GET\r\n\r\n",),
    "blank request line": (b"\r\n" + CLOSE,),
    "PUT": (b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",),
    "HEAD": (b"HEAD /x HTTP/1.1\r\n\r\n",),
    "lower-case method": (b"get /x HTTP/1.1\r\n\r\n",),
    "Expect: 100-continue": (
        b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(BODY),
        BODY + CLOSE),
    "99 headers": (b"GET /h HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(99))
                   + b"\r\n" + CLOSE,),
    "100 headers": (b"GET /h HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100))
                    + b"\r\n",),
    "long header line": (b"GET /h HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",),
    "long request line": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",),
    "negative, signed and spaced lengths": (
        b"POST /n HTTP/1.1\r\nContent-Length: -5\r\n\r\n"
        + b"POST /p HTTP/1.1\r\nContent-Length:  +3 \r\n\r\nabc" + CLOSE,),
    "GET with a body": (b"GET /g HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + CLOSE,),
    "chunked body read as the next request": (
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",),
    "delayed replies keep their order": (
        b"GET /late/0.1 HTTP/1.1\r\n\r\nGET /now HTTP/1.1\r\n\r\n" + CLOSE,),
    "drop after a reply": (b"GET /a HTTP/1.1\r\n\r\nGET /drop HTTP/1.1\r\n\r\n" + CLOSE,),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_bytes_as_http_server(name: str) -> None:
    chunks = CASES[name]
    with reference() as port:
        expected = exchange(port, *chunks)
    with transport() as srv:
        got = exchange(srv.port, *chunks)
    assert got == expected
    assert bool(expected) == (name != "blank request line")  # that one closes without a word


HALF_CLOSED = {
    "answered, then closed": post(b"/h") + b"GET /a HTTP/1.1\r\n\r\n",
    "a delayed reply still comes": b"GET /late/0.1 HTTP/1.1\r\n\r\n",
    "a short body is served short": b"POST /s HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"k\": ",
    "a last line without its end": b"GET /a HTTP/1.1\r\nHost: x",
}


@pytest.mark.parametrize("name", list(HALF_CLOSED))
def test_half_close_as_http_server(name: str) -> None:
    with reference() as port:
        expected = exchange(port, HALF_CLOSED[name], half_close=True)
    with transport() as srv:
        got = exchange(srv.port, HALF_CLOSED[name], half_close=True)
    assert got == expected and got.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("raw", [
    b"POST /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n",  # http.server: a traceback, no reply
    b"GET /x HTTP/1.1\r\nNo colon here\r\n\r\n",  # http.server: the header block ends early
    b"GET /x HTTP/1.1\r\n: no name\r\n\r\n",
    b"GET /x HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET /x HTTP/1.1\r\n folded first\r\n\r\n",
])
def test_malformed_headers_get_400_and_close(raw: bytes) -> None:
    with transport() as srv:
        got = exchange(srv.port, raw + CLOSE)
    head = got.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert got.count(b"HTTP/1.1 ") == 1  # nothing after it is read


def test_a_waiting_reply_does_not_hold_up_other_connections_and_stop_drops_it() -> None:
    srv = HttpServer(handler)
    srv.start()
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        slow.sendall(b"GET /late/60 HTTP/1.1\r\n\r\n")
        assert exchange(srv.port, CLOSE).startswith(b"HTTP/1.1 200 OK")
        assert len(srv.conns) == 1  # the waiting one
        srv.stop()
        assert slow.recv(100) == b""  # shut down without a reply
    finally:
        slow.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_bind_error_is_raised_by_start() -> None:
    with transport() as srv:
        taken = HttpServer(handler, port=srv.port)
        with pytest.raises(OSError):
            taken.start()


def test_headers_mapping() -> None:
    h = Headers([("Content-Type", "a"), ("X-Two", "1"), ("x-two", "2")])
    assert h.get("content-type") == h["CONTENT-TYPE"] == "a"
    assert h.get("X-TWO") == "1" and h.get("nope") is None and h.get("nope", "d") == "d"
    assert h["nope"] is None and "x-two" in h and "nope" not in h
    assert list(h) == ["Content-Type", "X-Two", "x-two"] and len(h) == 3
    assert h.items() == [("Content-Type", "a"), ("X-Two", "1"), ("x-two", "2")]
