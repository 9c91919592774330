"""The `sglang` intern backend: SGLang's native `POST /generate` over httpx.

The chat template is rendered client side from a local tokenizer/processor folder
(`apply_chat_template(tokenize=False)`), so prompts that share a prefix share the exact same
text and SGLang's radix cache reuses it. Images go as data URLs with one placeholder each, in
order. All rollouts of one question (same root: system + images + question) go to one server.

Before the first call each server is checked: `/health`, its version (`/server_info`, else
`/get_server_info`), and what it serves (`/model_info`, else `/get_model_info`: the only name
before 0.5.6 and the router's). The version decides InternVL's image placeholder and whether
`sampling_seed` exists (see docs/endpoints.md).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import anyio
import httpx
import orjson

from backends.base import (
    BackendError,
    Call,
    FatalError,
    PermanentError,
    TransientError,
    gather,
)
from backends.chat_templates import jinja_render, render_prompt
from backends.http import api_key, check_response, json_body, make_client, transport_error
from backends.images import data_url
from backends.keys import call_key
from backends.sglang_router import Router, check_mode, generate_each, router_for
from backends.template_source import load_chat_template
from mics.config import ConfigError, ModelConfig, check_url, parse_options
from mics.types import Image, Prompt, Reply, Text, Usage

FAMILIES = ("qwen2-vl", "internvl", "text")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# What SGLang's processors count as one image in the prompt text, per family.
_QWEN_PLACEHOLDERS = re.compile(re.escape(QWEN_IMAGE) + "|<image>")
INTERNVL_NEW_FROM = (0, 5, 7)  # `<image>` from 0.5.7; before it only `<IMG_CONTEXT>`
SAMPLING_SEED_FROM = (0, 5, 3)  # `sampling_params.sampling_seed` exists from 0.5.3
Version = tuple[int, int, int]


@dataclass(frozen=True)
class SGLangOptions:
    """`options` of an sglang intern (see docs/endpoints.md)."""

    tokenizer: str = ""  # the tokenizer/chat template folder; "": the model's
    family: str = "qwen2-vl"  # one of FAMILIES
    urls: list[str] = field(default_factory=list)  # more servers besides base_url
    image_max_side: int = 0
    check_model: bool = True
    served_model: str = ""
    warmup: bool = True
    image_placeholder: str = ""
    mode: str = "auto"  # auto, server or router (backends.sglang_router.MODES)

    @classmethod
    def parse(cls, cfg: ModelConfig) -> SGLangOptions:
        """The model's options over the defaults; ConfigError naming the model and the key."""
        where = f"model {cfg.name!r}"
        opts = parse_options(cls, cfg.options, where, "sglang")
        if opts.family not in FAMILIES:
            raise ConfigError(f"{where}: options.family must be one of {', '.join(FAMILIES)}")
        if not isinstance(opts.urls, list) or not all(isinstance(u, str) and u
                                                      for u in opts.urls):
            raise ConfigError(f"{where}: options.urls must be a list of server URLs")
        for i, url in enumerate(opts.urls):
            check_url(url, f"{where}: options.urls[{i}]")
        if not cfg.base_url:
            raise ConfigError(f"{where}: base_url is required for sglang")
        check_mode(cfg.name, opts.mode)
        return opts

    def __getitem__(self, key: str) -> Any:
        """Read an option by name, as code written against the options table does."""
        return getattr(self, key)


def parse_version(text: Any) -> Version | None:
    """(major, minor, patch) from a version string such as "0.5.6.post1"; None if absent."""
    m = re.match(r"\s*v?(\d+)\.(\d+)\.(\d+)", str(text or ""))
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def internvl_placeholder(version: Version) -> str:
    """InternVL's image placeholder in `/generate` text for this SGLang version."""
    return "<image>" if version >= INTERNVL_NEW_FROM else "<IMG_CONTEXT>"


class SGLangRollout:
    """Batched intern rollouts against one or more SGLang servers."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.options = SGLangOptions.parse(config)
        self.urls = [config.base_url.rstrip("/"), *(u.rstrip("/") for u in self.options.urls)]
        self._url_configs = {u: _with_url(config, u) for u in self.urls}  # one per server
        self.clients = {u: make_client(self._url_configs[u]) for u in self.urls}
        self._checked: set[str] = set()
        self.versions: dict[str, Version | None] = {}  # url -> SGLang version, once checked
        self._placeholder: str = self.options.image_placeholder
        self.check_lock = anyio.Lock()
        self._template: Any = None
        self._rendered: dict[Prompt, str] = {}  # bounded, oldest dropped first
        self._seed_identity: dict[str, Any] | None = None
        self._warm_roots: dict[str, None] = {}  # insertion-ordered, bounded: an LRU of roots
        self.routers: dict[str, Router | None] = {}  # url -> its sglang-router, None: a server

    # ---- identity and rendering ------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {"backend": "sglang", "model": self.config.model,
                "family": self.options.family, "image_max_side": self.options.image_max_side}

    def _tokenizer(self) -> Any:
        """The model folder's chat template (jinja2 only: no transformers, no torch)."""
        if self._template is None:
            path = self.options.tokenizer or self.config.model
            self._template = load_chat_template(path, f"model {self.config.name!r}")
        return self._template

    def preflight(self) -> None:
        """Load the chat template now (a few small files), so that a folder without one stops
        a start before anything is created, not at the first intern call."""
        self._tokenizer()

    async def load_template(self) -> None:
        """Load the tokenizer/chat template once, in a worker thread, never on the event loop."""
        if self._template is None:
            await anyio.to_thread.run_sync(self._tokenizer)

    def render(self, prompt: Prompt) -> str:
        """The exact prompt text sent to /generate, with one image placeholder per image.
        Memoised: warm-up, routing and the fan-out all need the same rendering."""
        text = self._rendered.get(prompt)
        if text is None:
            text = _remember(self._rendered, prompt, self._render(prompt))
        return text

    def _render(self, prompt: Prompt) -> str:
        family = self.options.family
        image = lambda: f"{self.placeholder()}\n"  # noqa: E731 - the server's, as below
        if (fast := render_prompt(self._tokenizer(), family, prompt, image)) is not None:
            return fast  # the known templates, without Jinja (equal to apply_chat_template)
        return jinja_render(self._tokenizer(), prompt, family, image)

    def _images(self, prompt: Prompt) -> list[str]:
        if self.options.family == "text":
            return []
        side = self.options.image_max_side
        return [data_url(p.image, side) for p in prompt.parts if isinstance(p, Image)]

    def placeholder(self) -> str:
        """InternVL's image placeholder: options.image_placeholder, else from the version of the
        servers checked so far. Refuses to guess before any server has been checked."""
        if not self._placeholder:
            raise FatalError(f"{self.config.name}: the InternVL image placeholder depends on the "
                             "SGLang version (<IMG_CONTEXT> before 0.5.7, <image> from 0.5.7), "
                             "which is not known yet; check a server first or set "
                             "options.image_placeholder")
        return self._placeholder

    def count_placeholders(self, text: str) -> int:
        """How many images SGLang will find in this prompt text."""
        if self.options.family == "qwen2-vl":
            return len(_QWEN_PLACEHOLDERS.findall(text))
        if self.options.family == "internvl":
            return text.count(self.placeholder())
        return 0

    def route(self, prompt: Prompt) -> str:
        """One server per question: a stable hash of the prompt's root (all but the last part)."""
        if len(self.urls) == 1:
            return self.urls[0]
        root = Prompt(prompt.system, prompt.parts[:-1]).key_material()
        digest = hashlib.sha256(orjson.dumps(root, option=orjson.OPT_SORT_KEYS)).digest()
        return self.urls[int.from_bytes(digest[:8], "big") % len(self.urls)]

    # ---- server checks ---------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        """SGLang's `--api-key`: the key from the environment, sent as a bearer token."""
        key = api_key(self.config)
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def check(self, url: str) -> None:
        """/health and /model_info once per server; a clear error naming the URL otherwise.
        The tokenizer is loaded here too, in a worker thread, never on the event loop."""
        if await router_for(self, url) is not None:  # a router has checks of its own
            return
        if self._template is None:
            async with self.check_lock:
                await self.load_template()
        if url in self._checked:
            return
        async with self.check_lock:
            if url in self._checked:
                return
            client = self.clients[url]
            try:
                health = await client.get("/health", headers=self.headers())
                if not health.is_success:
                    raise TransientError(f"{self.config.name}: SGLang server at {url} is not "
                                         f"healthy (HTTP {health.status_code})")
                server = await self._get_either(url, "/server_info", "/get_server_info")
                info = await self._get_either(url, "/model_info", "/get_model_info")
            except httpx.HTTPError as e:
                raise PermanentError(f"{self.config.name}: SGLang server at {url} is unreachable "
                                     f"({type(e).__name__}: {e})") from None
            if info is None:
                raise PermanentError(f"{self.config.name}: {url} answers neither /model_info "
                                     "nor /get_model_info (HTTP 404): is it an SGLang server?")
            version = parse_version((server or {}).get("version"))
            self.versions[url] = version
            if self.options.family == "internvl":
                self._placeholder = self.placeholder_for(url, version)
            if self.options.check_model:
                self.check_served(url, info)
            self._checked.add(url)

    async def _get_either(self, url: str, first: str, fallback: str) -> dict[str, Any] | None:
        """GET `first`, or `fallback` when the server does not know the route (404): the
        `/get_*` names are the only ones before 0.5.6 and the router's. None if neither."""
        client, cfg = self.clients[url], self._url_config(url)
        for route in (first, fallback):
            resp = await client.get(route, headers=self.headers())
            if resp.status_code == 404:
                continue
            check_response(resp, cfg)
            data = json_body(resp, f"{cfg.name} at {url}", route)
            return data if isinstance(data, dict) else {}
        return None

    def placeholder_for(self, url: str, version: Version | None) -> str:
        """InternVL's image placeholder for the server at `url` running SGLang `version`:
        options.image_placeholder when set, else the version's; FatalError when the server
        reports no version, or when it wants another placeholder than the servers checked
        before (the first one checked decides)."""
        if self.options.image_placeholder:
            return self.options.image_placeholder
        if version is None:
            raise FatalError(f"{self.config.name}: SGLang server at {url} does not report its "
                             "version (/server_info, /get_server_info), and InternVL's image "
                             "placeholder depends on it; set options.image_placeholder "
                             '("<IMG_CONTEXT>" before SGLang 0.5.7, "<image>" from 0.5.7)')
        wanted = internvl_placeholder(version)
        if self._placeholder and self._placeholder != wanted:
            raise FatalError(f"{self.config.name}: servers disagree on InternVL's image "
                             f"placeholder ({url} runs SGLang {'.'.join(map(str, version))}, "
                             f"which wants {wanted}; another wants {self._placeholder}); run "
                             "one SGLang version or set options.image_placeholder")
        return wanted

    def check_served(self, url: str, info: dict[str, Any]) -> None:
        """The server's names (`model_path` is the launch path as typed, `served_model_name` is
        absent in some versions) against options.served_model, else the config's `model` and
        options.tokenizer, by full name or last path component."""
        served = {k: str(info[k]) for k in ("served_model_name", "model_path", "tokenizer_path")
                  if isinstance(info.get(k), str) and info[k]}
        if self.options.served_model:
            wants = {"options.served_model": self.options.served_model}
        else:
            wants = {"model": self.config.model}
            if self.options.tokenizer:
                wants["options.tokenizer"] = self.options.tokenizer
        if any(_same_model(w, s) for w in wants.values() for s in served.values()):
            return
        got = ", ".join(f"{k}={v!r}" for k, v in served.items()) or "no model names"
        want = ", ".join(f"{k}={v!r}" for k, v in wants.items())
        raise FatalError(f"{self.config.name}: SGLang server at {url} serves {got}; compared "
                         f"with {want} (whole name or last path component, any case): no match. "
                         "Set options.served_model to the server's name, or point base_url at "
                         "the right server")

    # ---- generation ------------------------------------------------------------------------

    def _sampling(self, call: Call, url: str) -> dict[str, Any]:
        s = call.sampling
        params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p,
                                  "top_k": s.top_k, "max_new_tokens": s.max_tokens}
        if s.stop:
            params["stop"] = list(s.stop)
        if self.supports_seed(url):
            params["sampling_seed"] = self.seed(call)
        if call.sample_index:
            # Real SGLang ignores custom_params without a custom logit processor (and accepts
            # it in every 0.5.x); it stays because the loopback server and `mics bench` read
            # the sample index from it to reproduce the in-process simulators' samples.
            params["custom_params"] = {"sample_index": call.sample_index}
        return params

    def _url_config(self, url: str) -> ModelConfig:
        """This model's config with `base_url` set to one of its servers (made once)."""
        cfg = self._url_configs.get(url)
        if cfg is None:
            cfg = self._url_configs[url] = _with_url(self.config, url)
        return cfg

    def supports_seed(self, url: str) -> bool:
        """`sampling_seed` exists from SGLang 0.5.3 (it takes effect only on a server started
        with --enable-deterministic-inference); older or unknown versions get none."""
        version = self.versions.get(url)
        return version is not None and version >= SAMPLING_SEED_FROM

    def seed(self, call: Call) -> int:
        """A sampling seed derived from the call's memo key, so a call re-sent after a lost
        reply samples the same text (on a deterministic-inference server)."""
        if self._seed_identity is None:  # fixed once the model is built
            self._seed_identity = self.identity()
        return int(call_key(self._seed_identity, call)[:8], 16) & 0x7FFF_FFFF

    async def generate(self, url: str, calls: Sequence[Call], *, max_new_tokens: int | None = None,
                       raw_root: bool = False) -> list[Reply | BackendError]:
        """One batched /generate to one server; replies in call order (an item the server
        aborted, or sent without text, leaves its error in its own slot).

        `max_new_tokens=0` is a prefill-only warm-up; `raw_root` sends each prompt's root text
        (its rendering cut before the last part) instead of the whole rendered prompt.
        """
        await self.check(url)
        params = [self._sampling(c, url) for c in calls]
        if max_new_tokens is not None:
            params = [{**p, "max_new_tokens": max_new_tokens} for p in params]
        texts = [self.root_text(c.prompt) if raw_root else self.render(c.prompt) for c in calls]
        body: dict[str, Any] = {"text": texts, "sampling_params": params}
        images = [self._images(c.prompt) for c in calls]
        self._check_placeholders(texts, images)
        if any(images):
            body["image_data"] = images
        cfg = self._url_config(url)
        router = self.routers.get(url)
        if router is not None:  # the router takes one prompt per request
            return await generate_each(self, router, body)  # type: ignore[return-value]
        start = time.perf_counter()
        try:
            resp = await self.clients[url].post(
                "/generate", content=orjson.dumps(body),
                headers={"content-type": "application/json", **self.headers()})
        except httpx.HTTPError as e:
            raise transport_error(e, cfg) from None
        check_response(resp, cfg)
        latency = time.perf_counter() - start
        data = json_body(resp, f"{cfg.name} at {url}", "/generate")
        items = data if isinstance(data, list) else [data]
        if len(items) != len(calls):
            raise TransientError(f"{cfg.name} at {url}: {len(items)} results for {len(calls)}")
        return [_item(item, latency, cfg.name) for item in items]

    def _check_placeholders(self, texts: Sequence[str], images: Sequence[list[str]]) -> None:
        """One placeholder per image, or SGLang loads no image (and answers 500)."""
        if self.options.family == "text":
            return
        for i, (text, imgs) in enumerate(zip(texts, images, strict=True)):
            found = self.count_placeholders(text)
            if found != len(imgs):
                raise PermanentError(f"{self.config.name}: prompt {i} has {found} image "
                                     f"placeholder(s) for {len(imgs)} image(s) (family "
                                     f"{self.options['family']!r}); the question text may "
                                     "contain a literal placeholder")

    def root_text(self, prompt: Prompt) -> str:
        """The rendered text before the prompt's last part (system + images + question)."""
        full = self.render(prompt)
        last = prompt.parts[-1]
        cut = full.rfind(last.text) if isinstance(last, Text) and last.text else -1
        return full[:cut] if cut > 0 else full

    async def warm(self, url: str, calls: Sequence[Call]) -> None:
        """SGLang recipe: prefill each new root once, then each distinct full prompt once
        (`max_new_tokens=0`), so the fan-out finds its whole prompt in the radix cache."""
        roots: dict[str, Call] = {}
        for c in calls:
            text = self.root_text(c.prompt)
            key = hashlib.sha256(f"{url}\x00{text}".encode()).hexdigest()
            if key not in self._warm_roots:
                roots.setdefault(key, c)
        if roots:
            await self.generate(url, list(roots.values()), max_new_tokens=0, raw_root=True)
            for key in roots:
                _remember(self._warm_roots, key, None)
        distinct = list({self.render(c.prompt): c for c in calls}.values())
        if len(distinct) < len(calls):  # some prompts are sampled more than once
            await self.generate(url, distinct, max_new_tokens=0)

    async def rollout(self, calls: Sequence[Call]) -> list[Reply | BackendError]:
        """Group calls by server (one question's calls share a server), warm, then generate.
        A server that fails leaves its error in its calls' slots; other servers' replies stay,
        and so do the other items of a batch in which the server aborted one."""
        groups: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(self.route(call.prompt), []).append(i)

        async def one(url: str, idx: list[int]) -> list[Reply | BackendError]:
            group = [calls[i] for i in idx]
            await self.check(url)  # also loads the tokenizer off the event loop
            if self.options.warmup:
                await self.warm(url, group)
            return await self.generate(url, group)

        out: list[Reply | BackendError] = [TransientError("not sent")] * len(calls)
        results = await gather([lambda u=u, i=i: one(u, i) for u, i in groups.items()])
        for idx, result in zip(groups.values(), results, strict=True):
            for k, i in enumerate(idx):
                out[i] = result if isinstance(result, BackendError) else result[k]
        return out

    def requests_for(self, calls: Sequence[Call]) -> int:
        """The `/generate` requests `rollout` sends: one per server, one per call behind a
        router (known once the URL is checked; warm-up prefills are not counted)."""
        urls = [self.route(c.prompt) for c in calls]
        return sum(urls.count(u) if self.routers.get(u) is not None else 1 for u in set(urls))

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


def _item(item: Any, latency: float, name: str) -> Reply | BackendError:
    """`generate_reply`, its error kept in the item's slot instead of failing the batch."""
    try:
        return generate_reply(item, latency, name)
    except BackendError as e:
        return e


def _remember(bounded: dict[Any, Any], key: Any, value: Any, limit: int = 4096) -> Any:
    """Insert into an insertion-ordered dict, dropping the oldest entries past `limit`."""
    bounded[key] = value
    while len(bounded) > limit:
        bounded.pop(next(iter(bounded)))
    return value


def _same_model(want: str, served: str) -> bool:
    """Same name, or the same last path component (`Qwen/X` and `/models/X/`), any case."""
    if want == served:
        return True
    a, b = PurePosixPath(want.rstrip("/")).name, PurePosixPath(served.rstrip("/")).name
    return bool(a) and a.lower() == b.lower()


def _with_url(config: ModelConfig, url: str) -> ModelConfig:
    from dataclasses import replace

    return replace(config, base_url=url)


def generate_reply(item: Any, latency: float, name: str) -> Reply:
    """One `/generate` result item as a Reply. TransientError when it has no text, or when the
    server aborted the generation (`finish_reason.type` "abort": a client disconnect, a
    timeout, an explicit /abort_request, memory pressure): its text is cut short, so it is a
    failed call to send again, never an intern's answer to judge."""
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise TransientError(f"{name}: /generate item without text")
    meta = item.get("meta_info") or {}
    finish = meta.get("finish_reason") or {}
    if isinstance(finish, dict) and finish.get("type") == "abort":
        raise TransientError(f"{name}: the server aborted the generation: "
                             f"{str(finish.get('message') or 'no message')[:200]}")
    usage = Usage(prompt_tokens=int(meta.get("prompt_tokens", 0)),
                  completion_tokens=int(meta.get("completion_tokens", 0)),
                  cached_tokens=int(meta.get("cached_tokens", 0)),
                  latency_s=float(meta.get("e2e_latency", latency)))
    reason = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
    return Reply(text=item["text"], usage=usage, finish_reason=reason)
