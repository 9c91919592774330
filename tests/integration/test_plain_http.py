"""The lean HTTP/1.1 client for plain-HTTP endpoints (backends/plain_http.py), over real loopback
sockets: a scripted server that sends exact bytes (framing, keep-alive, faults, timeouts) and a
real uvicorn server (what SGLang serves with)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import orjson
import pytest
import uvicorn

from backends.aio_client import AioClient
from backends.http import make_client
from backends.plain_http import PlainClient
from mics.config import ModelConfig

Reply = Callable[[socket.socket, bytes], bool]  # send a reply to this request; True: keep going


class Scripted:
    """A loopback server that reads each request whole and answers with the next scripted
    reply (raw bytes, or a function given the socket). Counts connections; keeps requests."""

    def __init__(self, replies: list[bytes | Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.connections = 0
        self.most_at_once = 0
        self._live = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._live += 1
                self.most_at_once = max(self.most_at_once, self._live)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                request, buf = head + b"\r\n\r\n" + buf[:length], buf[length:]
                with self._lock:
                    self.requests.append(request)
                    reply = self.replies.pop(0)
                if callable(reply):
                    if not reply(conn, request):
                        return
                else:
                    conn.sendall(reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._live -= 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@contextmanager
def scripted(replies: list[bytes | Reply]) -> Iterator[Scripted]:
    srv = Scripted(replies)
    try:
        yield srv
    finally:
        srv.close()


def ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (len(body), extra) + body)


def run(client: PlainClient, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """Send the calls one after another on one event loop; responses or raised errors."""

    async def go() -> list[Any]:
        out: list[Any] = []
        try:
            for path, kw in calls:
                try:
                    out.append(await client.post(path, **kw))
                except httpx.HTTPError as e:
                    out.append(e)
        finally:
            await client.aclose()
        return out

    return anyio.run(go)


def client(url: str, timeout_s: float = 5.0, conns: int = 4) -> PlainClient:
    return PlainClient(url + "/v1", timeout_s=timeout_s, max_connections=conns)


def test_request_bytes_and_keep_alive_on_one_nodelay_connection() -> None:
    with scripted([ok(b'{"n": %d}' % i) for i in range(5)]) as srv:
        c = client(srv.url)

        async def go() -> tuple[list[Any], list[int]]:
            out = [await c.post("/chat/completions", json={"a": i},
                                headers={"Authorization": "Bearer k"}) for i in range(5)]
            flags = [conn.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY) for conn in c.idle_connections]
            await c.aclose()
            return out, flags

        replies, nodelay = anyio.run(go)
    assert [r.json() for r in replies] == [{"n": i} for i in range(5)]
    assert srv.connections == 1 and nodelay and all(nodelay)
    head, _, body = srv.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    fields = [line.split(b": ", 1) for line in lines[1:]]
    names = [n.lower() for n, _ in fields]
    assert len(names) == len(set(names))  # no header twice
    got = {n.lower(): v for n, v in fields}
    assert got[b"host"] == srv.url.removeprefix("http://").encode()
    assert got[b"content-length"] == str(len(body)).encode() and body == b'{"a":0}'
    assert got[b"content-type"] == b"application/json"
    assert got[b"authorization"] == b"Bearer k"


def test_chunked_reply_sent_byte_by_byte_with_extensions_and_trailers() -> None:
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5;name=x\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n")

    def trickle(conn: socket.socket, _req: bytes) -> bool:
        for i in range(len(reply)):
            conn.sendall(reply[i:i + 1])
            time.sleep(0.0005)
        return True

    with scripted([trickle, ok(b"next")]) as srv:
        first, second = run(client(srv.url), ("/a", {}), ("/b", {}))
    assert first.status_code == 200 and first.content == b"hello world"
    assert second.content == b"next" and srv.connections == 1  # reused after a chunked reply


def test_close_delimited_http10_and_connection_close_replies_are_not_reused() -> None:
    def until_close(conn: socket.socket, _req: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        return False

    replies: list[bytes | Reply] = [
        until_close,
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\none",
        ok(b"two", extra=b"Connection: close\r\n"),
        ok(b"three"),
    ]
    with scripted(replies) as srv:
        out = run(client(srv.url), *[("/x", {})] * 4)
    assert [r.content for r in out] == [b"all of it", b"one", b"two", b"three"]
    assert srv.connections == 4


def test_interim_100_continue_is_skipped_and_headers_ignore_case() -> None:
    reply = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many Requests\r\n"
             b"Retry-After: 2\r\nX-Tag: a\r\nx-tag: b\r\nContent-Length: 2\r\n\r\n{}")
    with scripted([reply]) as srv:
        [resp] = run(client(srv.url), ("/x", {}))
    assert resp.status_code == 429 and not resp.is_success
    assert resp.headers.get("retry-after") == "2" and resp.headers["RETRY-AFTER"] == "2"
    assert "Retry-After" in resp.headers and resp.headers.get("x-tag") == "a, b"


def test_bytes_past_a_reply_or_on_an_idle_connection_never_reach_a_request() -> None:
    def with_extra(conn: socket.socket, _req: bytes) -> bool:
        conn.sendall(ok(b"first") + ok(b"stray"))  # a second reply no request asked for
        return True

    def then_unsolicited(conn: socket.socket, _req: bytes) -> bool:
        conn.sendall(ok(b"second"))
        time.sleep(0.05)
        conn.sendall(ok(b"unsolicited"))  # on an idle connection
        return True

    with scripted([with_extra, then_unsolicited, ok(b"third")]) as srv:
        c = client(srv.url)

        async def go() -> list[bytes]:
            out = []
            for _ in range(3):
                out.append((await c.post("/x")).content)
                await anyio.sleep(0.2)
            await c.aclose()
            return out

        got = anyio.run(go)
    assert got == [b"first", b"second", b"third"]
    assert srv.connections == 3  # each stray byte cost its connection


@pytest.mark.parametrize(("reply", "needle"), [
    (b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n", "status line"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx", "content-length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nx", "content-length"),
    (b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 0\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\n folded: 1\r\nContent-Length: 0\r\n\r\n", "header line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "CRLF"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "larger than"),
])
def test_broken_framing_raises_remote_protocol_error(reply: bytes, needle: str) -> None:
    with scripted([reply, ok(b"after")]) as srv:
        err, after = run(client(srv.url), ("/x", {}), ("/y", {}))
    assert isinstance(err, httpx.RemoteProtocolError) and needle in str(err)
    assert after.content == b"after" and srv.connections == 2


def test_both_framings_read_as_chunked_and_the_connection_is_closed() -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"2\r\nok\r\n0\r\n\r\n")
    with scripted([reply, ok(b"after")]) as srv:
        first, after = run(client(srv.url), ("/x", {}), ("/y", {}))
    assert first.content == b"ok" and after.content == b"after" and srv.connections == 2


def test_disconnects_and_gzip_bodies() -> None:
    def cut(conn: socket.socket, _req: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return False

    def silent_close(_conn: socket.socket, _req: bytes) -> bool:
        return False

    body = b'{"text": "' + b"x" * 500 + b'"}'
    deflated = zlib.compress(body)
    replies: list[bytes | Reply] = [
        cut, silent_close,
        ok(gzip.compress(body), extra=b"Content-Encoding: gzip\r\n"),
        ok(deflated, extra=b"Content-Encoding: deflate\r\n"),
        ok(deflated[2:-4], extra=b"Content-Encoding: deflate\r\n"),  # raw deflate
        ok(b"not gzip", extra=b"Content-Encoding: gzip\r\n"),
        ok(b"x", extra=b"Content-Encoding: br\r\n"),
    ]
    with scripted(replies) as srv:
        out = run(client(srv.url), *[("/x", {})] * 7)
    assert isinstance(out[0], httpx.RemoteProtocolError) and "disconnected" in str(out[0])
    assert isinstance(out[1], httpx.RemoteProtocolError)
    assert [r.content for r in out[2:5]] == [body] * 3
    assert isinstance(out[5], httpx.DecodingError) and isinstance(out[6], httpx.DecodingError)


def test_timeouts_bound_each_wait_for_data_not_the_whole_reply() -> None:
    def stall(conn: socket.socket, _req: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        time.sleep(1.0)
        return False

    def slow_but_steady(conn: socket.socket, _req: bytes) -> bool:
        reply = ok(b"0123456789")
        for i in range(0, len(reply), 8):  # a piece every 0.1 s: 1 s in all, never 0.4 s idle
            conn.sendall(reply[i:i + 8])
            time.sleep(0.1)
        return True

    with scripted([stall, slow_but_steady]) as srv:
        timed_out, steady = run(client(srv.url, timeout_s=0.4), ("/x", {}), ("/y", {}))
    assert isinstance(timed_out, httpx.ReadTimeout)
    assert steady.content == b"0123456789"

    def pause_then_ok(conn: socket.socket, _req: bytes) -> bool:
        time.sleep(0.3)  # under the timeout, but past the first request's timer
        conn.sendall(ok(b"late but in time"))
        return True

    # one timer per connection: it outlives quick requests, re-arms from the latest request's
    # start, and still fails a request on the same connection that stalls
    with scripted([ok(b"quick"), pause_then_ok, stall]) as srv:
        c = client(srv.url, timeout_s=0.4)

        async def go() -> list[Any]:
            out: list[Any] = [(await c.post("/a")).content]
            await anyio.sleep(0.2)
            out.append((await c.post("/b")).content)
            try:
                await c.post("/c")
            except httpx.HTTPError as e:
                out.append(e)
            await c.aclose()
            return out

        quick, late, stalled = anyio.run(go)
    assert (quick, late) == (b"quick", b"late but in time") and srv.connections == 1
    assert isinstance(stalled, httpx.ReadTimeout)


def test_refused_connection_and_a_full_pool() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    [refused] = run(PlainClient(f"http://127.0.0.1:{port}", timeout_s=2, max_connections=1),
                    ("/x", {}))
    assert isinstance(refused, httpx.ConnectError)

    def slow(conn: socket.socket, _req: bytes) -> bool:
        time.sleep(0.05)
        conn.sendall(ok(b"slow"))
        return True

    with scripted([slow] * 12) as srv:
        c = client(srv.url, conns=3)

        async def go() -> list[bytes]:
            out: list[bytes] = []

            async def one() -> None:
                out.append((await c.post("/x")).content)

            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(one)
            await c.aclose()
            return out

        got = anyio.run(go)
    assert got == [b"slow"] * 12
    assert srv.connections == 3 and srv.most_at_once == 3

    def steady(conn: socket.socket, _req: bytes) -> bool:
        reply = ok(b"0123456789")
        for i in range(0, len(reply), 8):  # busy for ~1 s, never idle for 0.3 s
            conn.sendall(reply[i:i + 8])
            time.sleep(0.1)
        return True

    with scripted([steady]) as srv:
        c = client(srv.url, timeout_s=0.3, conns=1)

        async def waits() -> list[str]:
            seen: list[str] = []

            async def one() -> None:
                try:
                    seen.append((await c.post("/x")).content.decode())
                except httpx.HTTPError as e:
                    seen.append(type(e).__name__)

            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                await anyio.sleep(0.05)
                tg.start_soon(one)  # no place for it: it waits, and times out connecting
            return seen

        seen = anyio.run(waits)
    assert seen == ["ConnectTimeout", "0123456789"] and srv.connections == 1


def test_a_cancelled_request_never_leaves_its_reply_to_the_next() -> None:
    def late(conn: socket.socket, _req: bytes) -> bool:
        time.sleep(0.3)
        conn.sendall(ok(b"late"))
        return True

    with scripted([late, ok(b"fresh")]) as srv:
        c = client(srv.url)

        async def go() -> bytes:
            with anyio.move_on_after(0.1):
                await c.post("/x")
            await anyio.sleep(0.4)  # the late reply arrives: nobody may take it
            got = (await c.post("/y")).content
            await c.aclose()
            return got

        assert anyio.run(go) == b"fresh"
    assert srv.connections == 2


def test_header_injection_is_refused() -> None:
    c = client("http://127.0.0.1:9")
    for headers in ({"X-A": "1\r\nX-B: 2"}, {"Bad Name": "1"}, {"Host": "evil"},
                    {"X-K": "caf\u00e9\u2603"}):
        with pytest.raises(httpx.LocalProtocolError):
            anyio.run(lambda h=headers: c.post("/x", headers=h))


def test_a_client_survives_a_new_event_loop() -> None:
    with scripted([ok(b"one"), ok(b"two")]) as srv:
        c = client(srv.url)

        async def one() -> bytes:
            return (await c.post("/x")).content

        assert anyio.run(one) == b"one"
        assert anyio.run(one) == b"two"  # the first loop's connection is left behind
        assert srv.connections == 2
        anyio.run(c.aclose)


def test_make_client_picks_by_scheme_proxy_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "no_proxy", "ALL_PROXY", "all_proxy", "MICS_HTTP_CLIENT"):
        monkeypatch.delenv(name, raising=False)

    def cfg(url: str) -> ModelConfig:
        return ModelConfig(name="m", backend="openai", model="m", base_url=url)

    assert isinstance(make_client(cfg("http://127.0.0.1:30000/v1")), PlainClient)
    assert isinstance(make_client(cfg("https://api.example.org/v1")), AioClient)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.local:3128")
    assert isinstance(make_client(cfg("http://gpu-box:30000/v1")), AioClient)
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("MICS_HTTP_CLIENT", "aiohttp")
    assert isinstance(make_client(cfg("http://127.0.0.1:30000/v1")), AioClient)
    with pytest.raises(ValueError):
        PlainClient("https://api.example.org", timeout_s=1, max_connections=1)


def test_a_real_uvicorn_server_both_framings_and_keep_alive() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        reply = orjson.dumps({"path": scope["path"], "echo": orjson.loads(body or b"null")})
        if scope["path"].endswith("/stream"):  # no length: uvicorn sends it chunked
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            for i in range(0, len(reply), 7):
                await send({"type": "http.response.body", "body": reply[i:i + 7],
                            "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(reply)).encode())]})
            await send({"type": "http.response.body", "body": reply})

    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="error", lifespan="off", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        c = client(url)

        async def go() -> list[Any]:
            out = []
            for i in range(3):
                for path in ("/generate", "/stream"):
                    out.append((await c.post(path, json={"i": i, "t": "é" * 40})).json())
            out.append(len(c.idle_connections))
            await c.aclose()
            return out

        *replies, idle = anyio.run(go)
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
    assert replies == [{"path": f"/v1{p}", "echo": {"i": i, "t": "é" * 40}}
                       for i in range(3) for p in ("/generate", "/stream")]
    assert idle == 1  # six requests, one kept-alive connection
