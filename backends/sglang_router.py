"""The sglang backend behind `sglang-router` (the SGLang Model Gateway): one request per rollout.

The router forwards a `/generate` whose `text` is a single string (a batched list is refused:
"invalid type: sequence, expected a string"), so a question's rollouts go as concurrent single
requests, each bounded by the intern's `max_concurrency`. Its `cache_aware` policy keeps
requests that share a prefix (one question's root) on one worker; the backend's warm-up sends
the root first, so the fan-out follows it there.

A base URL is a router when `GET /workers` (SMG, sglang-router >= 0.2) or `GET /list_workers`
(older routers) answers with a worker list; an SGLang server answers 404 to both. The option
`mode` ("auto", "server", "router") skips the probe. The router serves `/get_model_info` (from
one of its workers), not `/model_info`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson

from backends.base import BackendError, PermanentError, TransientError, gather
from backends.http import check_response, json_body, transport_error
from mics.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from backends.sglang import SGLangRollout, Version
    from mics.types import Reply

MODES = ("auto", "server", "router")
WORKER_ROUTES = ("/workers", "/list_workers")  # SMG / sglang-router >= 0.2, then older routers


@dataclass
class Router:
    """A router in front of SGLang workers, as last seen."""

    url: str
    slots: anyio.CapacityLimiter  # the intern's max_concurrency, counted in requests
    workers: list[dict[str, Any]] = field(default_factory=list)  # url, is_healthy (if known)

    def describe(self) -> str:
        """`router, 2 workers (2 healthy): http://a, http://b` for `mics doctor`."""
        if not self.workers:
            return "router (it does not list its workers)"
        healthy = sum(1 for w in self.workers if w.get("is_healthy", True))
        urls = ", ".join(str(w["url"]) for w in self.workers)
        return f"router, {len(self.workers)} workers ({healthy} healthy): {urls}"


def check_mode(name: str, mode: str) -> None:
    """options.mode must be one of MODES (a ConfigError names the model otherwise)."""
    if mode not in MODES:
        raise ConfigError(f"model {name!r}: options.mode must be one of {', '.join(MODES)}, "
                          f"got {mode!r}")


def parse_workers(data: Any) -> list[dict[str, Any]] | None:
    """Workers from a `/workers` ({"workers": [{"url", "is_healthy", ...}]}) or a
    `/list_workers` ({"urls": [...]}) reply; None when the reply is not a worker list."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("workers"), list):
        return [{"url": str(w.get("url", "?")), "is_healthy": bool(w.get("is_healthy", True))}
                for w in data["workers"] if isinstance(w, dict)]
    if isinstance(data.get("urls"), list):
        return [{"url": str(u), "is_healthy": True} for u in data["urls"]]
    return None


async def list_workers(client: httpx.AsyncClient,
                       headers: dict[str, str]) -> list[dict[str, Any]] | None:
    """The router's workers, or None if this endpoint does not list workers (not a router)."""
    for route in WORKER_ROUTES:
        resp = await client.get(route, headers=headers)
        if resp.status_code != 200:
            continue
        try:
            workers = parse_workers(resp.json())
        except ValueError:
            continue
        if workers is not None:
            return workers
    return None


async def router_for(model: SGLangRollout, url: str) -> Router | None:
    """The Router at `url`, or None for a plain SGLang server; probed once per URL, and checked
    (health, served model, tokenizer) before it is first used."""
    if url in model.routers:
        return model.routers[url]
    async with model.check_lock:
        if url in model.routers:
            return model.routers[url]
        mode = model.options.mode
        if mode == "server":
            model.routers[url] = None
            return None
        client = model.clients[url]
        try:
            workers = await list_workers(client, model.headers())
        except httpx.HTTPError as e:
            raise PermanentError(f"{model.config.name}: SGLang endpoint at {url} is unreachable "
                                 f"({type(e).__name__}: {e})") from None
        if workers is None and mode == "auto":
            model.routers[url] = None
            return None
        router = Router(url, anyio.CapacityLimiter(model.config.max_concurrency), workers or [])
        await _check_router(model, router)
        model.routers[url] = router
        return router


async def _check_router(model: SGLangRollout, router: Router) -> None:
    """/health and /get_model_info through the router; loads the tokenizer off the event loop."""
    url, client = router.url, model.clients[router.url]
    await model.load_template()
    try:
        health = await client.get("/health", headers=model.headers())
        info = await client.get("/get_model_info", headers=model.headers())
    except httpx.HTTPError as e:
        raise PermanentError(f"{model.config.name}: sglang-router at {url} is unreachable "
                             f"({type(e).__name__}: {e})") from None
    if not health.is_success:
        raise TransientError(f"{model.config.name}: sglang-router at {url} is not healthy "
                             f"(HTTP {health.status_code}); {router.describe()}")
    check_response(info, _at(model.config, url))
    data = json_body(info, f"{model.config.name}: sglang-router at {url}", "/get_model_info")
    if not isinstance(data, dict):
        raise TransientError(f"{model.config.name}: sglang-router at {url}: /get_model_info is "
                             f"not a JSON object: {str(data)[:80]!r}")
    if model.options.check_model:
        model.check_served(url, data)
    if model.options.family == "internvl" and not model.options.image_placeholder:
        version = await worker_version(router, min(model.config.timeout_s, 10.0))
        if version is not None:  # else the placeholder stays unknown, and the error says so
            model._placeholder = model.placeholder_for(url, version)


async def worker_version(router: Router, timeout_s: float) -> Version | None:
    """The SGLang version the router's workers report (`/server_info`, else the older
    `/get_server_info`; the router's own reports none), when every worker that answers
    reports the same one; None when none answers or they disagree. No API key is sent to
    the listed workers: only the router was configured."""
    from backends.sglang import parse_version

    found: set[Version | None] = set()
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for worker in router.workers:
            for route in ("/server_info", "/get_server_info"):
                try:
                    resp = await client.get(str(worker["url"]).rstrip("/") + route)
                    data = resp.json() if resp.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    break  # unreachable from here, or not JSON: this worker tells nothing
                if isinstance(data, dict):
                    found.add(parse_version(data.get("version")))
                    break
    return found.pop() if len(found) == 1 else None


def split_batch(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A batched `/generate` body (lists of text, sampling_params, image_data) as one body per
    item, each with a single `text` string, as the router accepts."""
    texts = body["text"]
    params = body.get("sampling_params") or [{} for _ in texts]
    images = body.get("image_data") or [None] * len(texts)
    out = []
    for text, sp, imgs in zip(texts, params, images, strict=True):
        item: dict[str, Any] = {"text": text, "sampling_params": sp}
        if imgs:
            item["image_data"] = imgs
        out.append(item)
    return out


async def generate_each(model: SGLangRollout, router: Router, body: dict[str, Any]
                        ) -> list[Reply | BackendError]:
    """A batched body sent as concurrent single requests; a failed request leaves its error
    in its own slot, so the gate retries only that rollout."""
    from backends.sglang import generate_reply

    cfg = _at(model.config, router.url)
    client = model.clients[router.url]
    headers = {"content-type": "application/json", **model.headers()}

    async def one(item: dict[str, Any]) -> Reply:
        async with router.slots:
            start = time.perf_counter()
            try:
                resp = await client.post("/generate", content=orjson.dumps(item), headers=headers)
            except httpx.HTTPError as e:
                raise transport_error(e, cfg) from None
        check_response(resp, cfg)
        data = json_body(resp, f"{cfg.name} at {router.url}", "/generate")
        return generate_reply(data, time.perf_counter() - start, cfg.name)

    return await gather([lambda item=item: one(item) for item in split_batch(body)])


async def refresh_workers(model: SGLangRollout, url: str) -> Router | None:
    """Re-read the router's worker list (health included), for `mics doctor`."""
    router = model.routers.get(url)
    if router is None:
        return None
    workers = await list_workers(model.clients[url], model.headers())
    if workers is not None:
        router.workers = workers
    return router


def _at(config: ModelConfig, url: str) -> ModelConfig:
    from dataclasses import replace

    return replace(config, base_url=url)


async def describe_routers(model: Any) -> list[str]:
    """One line per router this model has talked to, with the workers it lists now (for
    `mics doctor`); empty for plain servers and other backends."""
    lines = []
    for url, router in dict(getattr(model, "routers", {})).items():
        if router is not None:
            with contextlib.suppress(httpx.HTTPError):  # else the list seen at the check
                await refresh_workers(model, url)
            lines.append(f"{url}: {router.describe()}")
    return lines
