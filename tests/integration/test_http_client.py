"""The aiohttp-based client behind backends/http.py, over real loopback HTTP: bodies, errors
raised as the httpx exceptions the backends map, timeouts, keep-alive, TCP_NODELAY, SSL."""

from __future__ import annotations

import socket

import anyio
import httpx
import orjson
import pytest

from backends.aio_client import AioClient, ssl_context
from backends.base import FatalError, PermanentError, TransientError
from backends.http import check_response, make_client, transport_error
from bench.loopback import Faults, LoopbackServer
from mics.config import ModelConfig

MODELS = {"judge": {"role": "judge"}}
BODY = {"model": "judge", "temperature": 0.0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Model answer: a\n\nCorrect answer: a"}]}


def cfg(url: str, **kw: object) -> ModelConfig:
    return ModelConfig(name="judge", backend="openai", model="judge", base_url=url, **kw)


def test_post_json_and_parse_reply() -> None:
    with LoopbackServer(MODELS, keep_bodies=True) as srv:
        async def go() -> object:
            client = make_client(cfg(f"{srv.url}/v1/"))
            try:
                return await client.post("/chat/completions", json=BODY, headers={"X-A": "1"})
            finally:
                await client.aclose()

        resp = anyio.run(go)
        assert resp.status_code == 200 and resp.is_success
        assert resp.headers.get("CONTENT-TYPE", "").startswith("application/json")
        assert resp.json()["choices"][0]["message"]["content"]
        [(path, body)] = srv.bodies
        assert path.endswith("/chat/completions") and body == BODY  # orjson-encoded body


def test_http_errors_are_left_to_check_response() -> None:
    faults = Faults(forced={"judge": "429"}, retry_after_s=2.5)
    with LoopbackServer(MODELS, faults=faults) as srv:
        async def go() -> object:
            client = make_client(cfg(f"{srv.url}/v1"))
            try:
                return await client.post("/chat/completions", json=BODY)
            finally:
                await client.aclose()

        resp = anyio.run(go)
    assert resp.status_code == 429 and not resp.is_success
    with pytest.raises(TransientError) as info:
        check_response(resp, cfg("http://127.0.0.1:9/v1"))
    assert info.value.retry_after == 2.5 and info.value.status == 429


def test_fatal_status_maps_to_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICS_TEST_KEY", "sk-secret-123")
    with LoopbackServer(MODELS, api_key="other") as srv:
        c = cfg(f"{srv.url}/v1", api_key_env="MICS_TEST_KEY")

        async def go() -> object:
            client = make_client(c)
            try:
                return await client.post("/chat/completions", json=BODY,
                                         headers={"Authorization": "Bearer sk-secret-123"})
            finally:
                await client.aclose()

        resp = anyio.run(go)
    with pytest.raises(FatalError) as info:
        check_response(resp, c)
    assert "sk-secret-123" not in str(info.value)


def test_transport_failures_raise_httpx_errors() -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now

    async def refused() -> None:
        client = AioClient(f"http://127.0.0.1:{port}", timeout_s=5, max_connections=2)
        try:
            await client.get("/health")
        finally:
            await client.aclose()

    with pytest.raises(httpx.ConnectError) as info:
        anyio.run(refused)
    err = transport_error(info.value, cfg(f"http://127.0.0.1:{port}"))
    assert isinstance(err, TransientError) and "ConnectError" in str(err)

    with LoopbackServer(MODELS, faults=Faults(forced={"judge": "drop"})) as srv:
        async def dropped() -> None:
            client = AioClient(f"{srv.url}/v1", timeout_s=5, max_connections=2)
            try:
                await client.post("/chat/completions", json=BODY)
            finally:
                await client.aclose()

        with pytest.raises(httpx.TransportError):
            anyio.run(dropped)

    with LoopbackServer(MODELS, faults=Faults(forced={"judge": "slow"}, slow_s=3.0)) as srv:
        async def slow() -> None:
            client = AioClient(f"{srv.url}/v1", timeout_s=0.3, max_connections=2)
            try:
                await client.post("/chat/completions", json=BODY)
            finally:
                await client.aclose()

        with pytest.raises(httpx.TimeoutException):
            anyio.run(slow)


def test_keep_alive_reuses_one_nodelay_connection() -> None:
    with LoopbackServer(MODELS) as srv:
        async def go() -> tuple[int, list[int]]:
            client = AioClient(f"{srv.url}/v1", timeout_s=5, max_connections=4)
            try:
                for _ in range(5):  # sequential: one connection is enough
                    assert (await client.post("/chat/completions", json=BODY)).is_success
                # aiohttp has no public view of its idle connections: read its pool
                conns = [p for ps in client.session.connector._conns.values() for p, _ in ps]
                flags = [p.transport.get_extra_info("socket").getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY) for p in conns]
                return srv.open_connections, flags
            finally:
                await client.aclose()

        open_conns, nodelay = anyio.run(go)
    assert open_conns == 1
    assert nodelay and all(nodelay)


def test_one_ssl_context_for_https_and_none_for_http() -> None:
    a = AioClient("https://api.example.org/v1", timeout_s=1, max_connections=1)
    b = AioClient("https://other.example.org/v1", timeout_s=1, max_connections=1)
    c = AioClient("http://127.0.0.1:9", timeout_s=1, max_connections=1)
    assert a.ssl_setting is b.ssl_setting is ssl_context()
    assert c.ssl_setting is False


def test_a_client_survives_a_new_event_loop() -> None:
    with LoopbackServer(MODELS) as srv:
        client = AioClient(f"{srv.url}/v1", timeout_s=5, max_connections=2)

        async def one() -> int:
            return (await client.post("/chat/completions", json=BODY)).status_code

        assert anyio.run(one) == 200
        first = client.session
        assert anyio.run(one) == 200  # a second anyio.run: a fresh session, same client
        assert client.session is not first and first.closed  # the old one: no unclosed warning

        async def close() -> None:
            await client.aclose()

        anyio.run(close)


def test_malformed_json_raises_value_error() -> None:
    from backends.aio_client import Response

    resp = Response(200, {}, b"{not json")
    with pytest.raises(ValueError):
        resp.json()
    assert resp.text == "{not json"
    assert orjson.loads(Response(200, {}, b'{"a": 1}').content) == {"a": 1}


def test_environment_proxies_are_honoured_like_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.aio_client import env_proxy

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                 "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://api.example.org/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,internal.example.org")
    assert env_proxy("https://api.example.org/v1") == "http://proxy.local:3128"
    assert env_proxy("https://internal.example.org/v1") is None
    assert env_proxy("http://127.0.0.1:30000") is None
    assert AioClient("https://api.example.org/v1", timeout_s=1, max_connections=1).proxy


def test_a_key_variable_set_to_nothing_is_called_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.http import api_key
    from backends.openai_chat import OpenAIChat
    from mics.config import ConfigError

    monkeypatch.setenv("MICS_TEST_KEY", "")
    with pytest.raises(PermanentError, match="MICS_TEST_KEY is empty"):
        api_key(cfg("http://127.0.0.1:9/v1", api_key_env="MICS_TEST_KEY"))
    with pytest.raises(ConfigError, match="MICS_TEST_KEY is empty"):
        OpenAIChat(cfg("http://127.0.0.1:9/v1", api_key_env="MICS_TEST_KEY"))
    monkeypatch.delenv("MICS_TEST_KEY")
    with pytest.raises(ConfigError, match="MICS_TEST_KEY is not set"):
        OpenAIChat(cfg("http://127.0.0.1:9/v1", api_key_env="MICS_TEST_KEY"))
