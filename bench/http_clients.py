"""`python -m bench.http_clients`: client CPU per HTTP request, httpx vs aiohttp, on loopback.

The choice behind `backends/http.py`: each client sends the same judge chat request to the
loopback server (its own process, zero latency) `requests` times at concurrency 16 and 64; the
figure is this process's CPU time (user + system) per request, after an untimed warm-up.
Clients: httpx 0.28 as the backends used it, httpx with the `httpx-aiohttp` transport (the
OpenAI SDK's option; skipped if that package is not installed), `backends.aio_client` (aiohttp
underneath: what `make_client` returns for https:// and proxied endpoints) and
`backends.plain_http` (what it returns for plain http:// endpoints).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from backends.aio_client import AioClient
from backends.plain_http import PlainClient
from bench.common import report, sim_models, write_json

BODY = {"model": "judge", "temperature": 0.0, "max_tokens": 16,
        "messages": [{"role": "system", "content": "You are a strict judge."},
                     {"role": "user", "content": "Model answer: a\n\nCorrect answer: a"}]}


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _client(kind: str, url: str, conc: int) -> Any:
    if kind == "httpx":
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        return httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits)
    if kind == "httpx+aiohttp":
        import aiohttp
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc))

        return httpx.AsyncClient(base_url=url, timeout=60.0,
                                 transport=AiohttpTransport(client=session))
    if kind == "plain_http":
        return PlainClient(url, timeout_s=60.0, max_connections=conc)
    return AioClient(url, timeout_s=60.0, max_connections=conc)


async def _drive(client: Any, n: int, conc: int) -> None:
    limit = anyio.Semaphore(conc)

    async def one() -> None:
        async with limit:
            r = await client.post("/chat/completions", json=BODY)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}")
            r.json()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)


def run_http_clients(requests: int = 2000, concurrency: tuple[int, ...] = (16, 64)
                     ) -> dict[str, Any]:
    """{client: {concurrency: ms CPU per request}} plus what was skipped."""
    from bench.loop import ServerProcess

    kinds = ["httpx", "httpx+aiohttp", "aio_client", "plain_http"]
    skipped = []
    try:
        import httpx_aiohttp  # noqa: F401
    except ImportError:
        kinds.remove("httpx+aiohttp")
        skipped.append("httpx+aiohttp (pip install httpx-aiohttp)")
    zero = {"mentor": (0.0, 0.0), "intern": (0.0, 0.0), "judge": (0.0, 0.0)}
    out: dict[str, Any] = {"requests": requests, "skipped": skipped, "cpu_ms_per_request": {}}
    with ServerProcess(sim_models(), zero, 0) as srv:
        for kind in kinds:
            for conc in concurrency:
                async def main(kind: str = kind, conc: int = conc) -> float:
                    client = _client(kind, f"{srv.url}/v1", conc)
                    try:
                        await _drive(client, min(200, requests), conc)  # warm-up
                        start = _cpu()
                        await _drive(client, requests, conc)
                        return _cpu() - start
                    finally:
                        await client.aclose()

                cpu = anyio.run(main)
                out["cpu_ms_per_request"].setdefault(kind, {})[str(conc)] = round(
                    cpu / requests * 1000, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    t0 = time.perf_counter()
    out = run_http_clients(a.requests)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    payload = report("http_clients", out)
    if a.json:
        write_json(Path(a.json), payload)
    print(orjson.dumps(payload["http_clients"], option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
