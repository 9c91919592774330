"""The loopback HTTP server: served models, routing, the request log, and the simulated
replies over the OpenAI chat and SGLang `/generate` wire formats (see `bench.loopback`)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends import simulator
from bench import targets
from bench.loopback import faults as faultlib
from bench.loopback.faults import Faults, as_faults
from bench.loopback.tokens import IMAGE_TOKENS, PrefixCache, prompt_chain, tokenize
from bench.loopback.transport import Headers, HttpServer
from bench.loopback.wire import (
    BadRequest,
    Response,
    chat_prompt,
    chat_sampling,
    check_sampling,
    clip,
    digest,
    generate_images,
    generate_rids,
    json_response,
    per_item,
    sim_text_from_generate,
)
from bench.targets import Refusal

# ---------------------------------------------------------------- served models

ROLES = simulator.ROLES
_STRICT_KEYS = ("target", "version", "model_path", "family")


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its simulator role and options (seed, `simulator.ROLE_OPTIONS`).

    Strict mode (see bench/targets.py): `target` names the real server to behave like
    ("sglang", "router", "openai", "openai-reasoning", "gemini", "dashscope", "deepseek");
    `version` the SGLang version; `model_path` the launch path /model_info reports; `family`
    ("qwen2-vl" | "internvl") the image placeholders SGLang's processor recognises."""

    role: str
    options: dict[str, float | None] = field(default_factory=dict)
    latency_s: float = 0.0
    target: str = ""
    version: str = ""
    model_path: str = ""
    family: str = ""

    @property
    def sglang_version(self) -> str:
        return self.version or (targets.DEFAULT_SGLANG_VERSION if self.target
                                else targets.LENIENT_VERSION)


def _spec(name: str, value: str | Mapping[str, Any], seed: int) -> ModelSpec:
    raw = {"role": value} if isinstance(value, str) else dict(value)
    role = raw.pop("role", None)
    if role not in ROLES:
        raise ValueError(f"model {name!r}: role must be one of {', '.join(ROLES)}, got {role!r}")
    allowed = {"seed": seed, **simulator.ROLE_OPTIONS[role]}
    unknown = sorted(set(raw) - set(allowed) - {"latency_s", *_STRICT_KEYS})
    if unknown:
        raise ValueError(f"model {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"allowed for a {role}: {', '.join(sorted(allowed))}")
    latency = float(raw.pop("latency_s", 0.0))
    strict = {k: str(raw.pop(k, "")) for k in _STRICT_KEYS}
    try:
        targets.check_target(strict["target"], strict["version"], strict["family"])
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}") from None
    return ModelSpec(role, {**allowed, **raw}, latency, **strict)


@dataclass(frozen=True)
class LogEntry:
    """One served item: a /generate batch gives one entry per item; a refused or faulted
    request gives one entry."""

    t: float
    path: str
    model: str
    role: str
    key: str  # content hash: prompt, images, sampling, sample marker
    status: int  # 0 when the connection was dropped
    ok: bool  # a well-formed 200 reply was produced
    fault: str | None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    sample_index: int = 0
    temperature: float | None = None
    batch_size: int = 1


# ---------------------------------------------------------------- the server

_UNLOGGED_MAX = 20_000  # items recorded before their log entries are built anyway


class LoopbackServer:
    """SIMULATOR models over HTTP on 127.0.0.1 (see the module docstring).

    models: name -> role ("mentor" | "intern" | "judge") or {"role": ..., **simulator options}
    faults: a Faults, a dict of its fields, or None. seed: default simulator seed of every model
    and the seed of fault and latency draws. latency: role -> seconds or (low, high) seconds.
    api_key: when set, POST endpoints need `Authorization: Bearer <api_key>`.
    default_model: the model `/generate` serves without a `/m/<name>` path prefix (default: the
    first intern, else the first model). keep_bodies: keep parsed request bodies in `bodies`.
    """

    def __init__(
        self,
        models: Mapping[str, str | Mapping[str, Any]],
        *,
        faults: Faults | Mapping[str, Any] | None = None,
        seed: int = 0,
        latency: Mapping[str, float | tuple[float, float]] | None = None,
        api_key: str | None = None,
        default_model: str | None = None,
        port: int = 0,
        keep_bodies: bool = False,
    ) -> None:
        if not models:
            raise ValueError("LoopbackServer needs at least one model")
        self.models = {name: _spec(name, v, seed) for name, v in models.items()}
        self.seed = seed
        self.latency = dict(latency or {})
        self._api_key = api_key
        interns = [n for n, s in self.models.items() if s.role == "intern"]
        self.default_model = default_model or (interns or list(self.models))[0]
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not served")
        self.keep_bodies = keep_bodies
        self.bodies: list[tuple[str, Any]] = []
        self._faults = as_faults(faults)
        self._port = port
        self._lock = threading.Lock()
        self._log: list[LogEntry] = []
        self._unlogged: list[tuple[float, str, str, str | tuple[Any, ...], dict[str, Any]]] = []
        self._seen: Counter[str] = Counter()
        self._caches = {name: PrefixCache() for name in self.models}
        self._http: HttpServer | None = None

    # -- lifecycle

    def start(self) -> LoopbackServer:
        http = HttpServer(self._answer, port=self._port)
        http.start()
        self._http = http
        return self

    def stop(self) -> None:
        """Stop serving and shut down open connections (a reply still waiting is dropped)."""
        if self._http is not None:
            self._http.stop()
        self._http = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        url = self.url if self._http else None
        return f"LoopbackServer(url={url!r}, models={list(self.models)})"

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the server is not running")
        return self._http.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, model: str) -> str:
        """Base URL whose `/generate`, `/model_info`, ... serve `model`."""
        return f"{self.url}/m/{model}"

    # -- runtime control and observation

    @property
    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def set_faults(self, faults: Faults | Mapping[str, Any] | None = None, **changes: Any) -> None:
        """Replace the fault config (`faults`), or change some of its fields (`changes`)."""
        with self._lock:
            new = as_faults(faults) if faults is not None else self._faults
            self._faults = as_faults({**new.__dict__, **changes}) if changes else new

    @property
    def log(self) -> list[LogEntry]:
        with self._lock:
            self._build_log()
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._unlogged.clear()
            self.bodies.clear()

    def counts(self) -> dict[str, Any]:
        """Totals over the log: requests, ok, failed, by_status, by_fault, by_model, tokens."""
        log = self.log
        return {
            "items": len(log), "ok": sum(e.ok for e in log), "failed": sum(not e.ok for e in log),
            "by_status": dict(Counter(e.status for e in log)),
            "by_fault": dict(Counter(e.fault for e in log if e.fault)),
            "by_model": dict(Counter(e.model for e in log)),
            "prompt_tokens": sum(e.prompt_tokens for e in log),
            "cached_tokens": sum(e.cached_tokens for e in log),
            "completion_tokens": sum(e.completion_tokens for e in log),
        }

    def flush_cache(self, model: str | None = None) -> None:
        with self._lock:
            for name, cache in self._caches.items():
                if model is None or name == model:
                    cache.clear()

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self._http.conns) if self._http is not None else 0

    def _answer(self, method: str, path: str, headers: Headers, raw: bytes) -> Response:
        """One request's reply (called on the transport's event loop thread)."""
        try:
            return self._dispatch(method, path, headers, raw)
        except Exception as e:  # a server bug must still answer
            return json_response(
                500, {"error": {"message": f"loopback bug: {type(e).__name__}: {e}"}})

    # -- routing

    def _dispatch(self, method: str, path: str, headers: Any, raw: bytes) -> Response:
        path = path.split("?", 1)[0]
        model = self.default_model
        m = re.match(r"^/m/([^/]+)(/.*)$", path)
        if m:
            model, path = m.group(1), m.group(2)
            if model not in self.models:
                return json_response(404, {"error": {"message": f"model {model!r} is not served"}})
        if method == "GET" and path in ("/health", "/health_generate", "/ready"):
            return Response(200)
        if method == "GET" and path in ("/v1/models", "/models"):
            return json_response(200, {"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "mics-loopback",
                 "root": n} for n in self.models]})
        spec = self.models[model]
        version = spec.sglang_version
        if method == "GET" and path in ("/model_info", "/get_model_info", "/server_info",
                                        "/get_server_info"):
            what = targets.info_routes(spec.target, version).get(path)
            if what == "model":
                return json_response(200, targets.model_info(spec.target, version, model,
                                                     spec.model_path))
            if what == "server":
                return json_response(200, targets.server_info(version))
        if path == "/flush_cache" and method in ("GET", "POST"):
            self.flush_cache(model if m else None)
            return Response(200, b"Cache flushed.\n", {"Content-Type": "text/plain"})
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions", "/generate"):
            return self._model_call(path, headers, raw, model)
        return json_response(404, {"error": {"message": f"no route for {method} {path}"}})

    def _model_call(self, path: str, headers: Any, raw: bytes, model: str) -> Response:
        """A chat or /generate request: its JSON body parsed, then `_model_reply`."""
        err = _error_body(path != "/generate")
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            return self._refuse(path, model, 400, err(f"invalid JSON body: {e}"))
        if not isinstance(body, dict):
            return self._refuse(path, model, 400, err("the request body must be a JSON object"))
        return self._model_reply(path, headers, body, model)

    def _model_reply(self, path: str, headers: Any, body: dict[str, Any], model: str
                     ) -> Response:
        """The reply to a chat or /generate request whose body is a JSON object."""
        chat = path != "/generate"
        err = _error_body(chat)
        if self._api_key is not None:
            auth = headers.get("Authorization") or ""
            if auth != f"Bearer {self._api_key}":
                return self._refuse(path, model, 401, {"error": {"message": "invalid api key"}})
        if chat:
            model = body.get("model") if isinstance(body.get("model"), str) else ""
            if model not in self.models:
                return self._refuse(path, model, 404, err(f"The model `{model}` does not exist."))
        spec = self.models[model]
        try:
            if chat:
                targets.check_chat(spec.target, body)
            else:
                targets.check_generate(spec.target, spec.sglang_version, body)
        except Refusal as e:
            return self._refuse(path, model, e.status, e.body)
        try:
            sample = int(headers.get("X-Mics-Sample") or body.get("seed") or 0) if chat else 0
        except (TypeError, ValueError):
            sample = 0
        if self.keep_bodies:
            with self._lock:
                self.bodies.append((path, body))
        # rids may be fresh per attempt: leave them out so fault draws stay reproducible
        key = digest(path, model, {k: v for k, v in body.items() if k != "rid"}, sample)
        fault, delay = self._draw(model, key)
        if fault is not None and fault not in faultlib.IN_REPLY:
            return self._fault(path, model, key, fault, chat)
        try:
            resp = (self._chat(path, body, model, sample, key, fault) if chat
                    else self._generate(body, model, fault))
        except BadRequest as e:
            return self._refuse(path, model, 400, err(str(e)))
        except Refusal as e:
            return self._refuse(path, model, e.status, e.body)
        resp.delay_s += delay
        return resp

    def _draw(self, model: str, key: str) -> tuple[str | None, float]:
        with self._lock:
            faults = self._faults
            n = self._seen[key]
            self._seen[key] += 1
        rng = random.Random(digest(self.seed, key, n))
        spec = self.latency.get(self.models[model].role, self.models[model].latency_s)
        delay = rng.uniform(*spec) if isinstance(spec, (tuple, list)) else float(spec)
        kind = faultlib.pick(faults, model, rng)
        if kind == "slow":
            delay += faults.slow_s
        return kind, delay

    def _fault(self, path: str, model: str, key: str, kind: str, chat: bool) -> Response:
        target = self.models[model].target
        self._record(path, model, key, {"status": faultlib.status(kind, target), "ok": False,
                                        "fault": kind})
        return faultlib.response(kind, model=model, target=target, faults=self.faults, chat=chat)

    def _refuse(self, path: str, model: str, status: int, body: Any) -> Response:
        self._record(path, model, (path, model, status), {"status": status, "ok": False})
        if isinstance(body, str):  # e.g. the router's plain-text deserialisation error
            return Response(status, body.encode(), {"Content-Type": "text/plain; charset=utf-8"})
        return json_response(status, body)

    def _record(self, path: str, model: str, key: str | tuple[Any, ...], fields: dict[str, Any]
                ) -> None:
        """Log one served item; `key` is its key, or the parts whose `digest` it is. The entry
        is built when the log is read (the bench's server is timed, its log seldom read)."""
        raw = (time.time(), path, model, key, fields)
        with self._lock:
            self._unlogged.append(raw)
            if len(self._unlogged) >= _UNLOGGED_MAX:  # they hold the prompts their keys hash
                self._build_log()

    def _build_log(self) -> None:
        """Turn the recorded items into log entries (holding the lock)."""
        self._log += [self._entry(*raw) for raw in self._unlogged]
        self._unlogged.clear()

    def _entry(self, t: float, path: str, model: str, key: str | tuple[Any, ...],
               fields: dict[str, Any]) -> LogEntry:
        role = self.models[model].role if model in self.models else ""
        return LogEntry(t=t, path=path, model=model, role=role,
                        key=key if isinstance(key, str) else digest(*key),
                        fault=fields.pop("fault", None), **fields)

    # -- simulated replies

    def _reply(self, model: str, text: str, temperature: float, sample: int) -> str:
        spec = self.models[model]
        return simulator.reply(spec.role, text, spec.options, seed=int(spec.options["seed"] or 0),
                               model=model, temperature=temperature, sample_index=sample)

    def _cache(self, model: str, prompts: list[tuple[int, ...]], outputs: list[list[str]]
               ) -> list[int]:
        """Match every prompt (its `prompt_chain`) against the cache as it was before this
        request, then insert prompt + output tokens (items of one request do not share with
        each other)."""
        with self._lock:
            cache = self._caches[model]
            hits = [cache.match_chain(p) for p in prompts]
            inserted: set[int] = set()  # prompts (the same object for the same text) in the cache
            for p, hit, out in zip(prompts, hits, outputs, strict=True):
                cache.insert_chain(p, out, len(p) if id(p) in inserted else hit)
                inserted.add(id(p))
        return hits

    def _chat(self, path: str, body: dict[str, Any], model: str, sample: int, key: str,
              fault: str | None) -> Response:
        prompt_text, images = chat_prompt(body.get("messages"))
        temperature, max_tokens = chat_sampling(body)
        target = self.models[model].target
        thinking = targets.thinking_tokens(target, body)
        text = self._reply(model, prompt_text, temperature, sample)
        if max_tokens is not None and thinking:  # thinking counts against the output limit
            text, finish = clip(text, max(0, max_tokens - thinking), body.get("stop"))
            if max_tokens <= thinking:
                finish = {"type": "length"}
        else:
            text, finish = clip(text, max_tokens, body.get("stop"))
        if fault == "abort":
            text, finish = text[: len(text) // 2], {"type": "abort"}
        elif fault == "content_filter":
            text, finish = "", {"type": "content_filter"}
        prompt = prompt_chain(prompt_text, images)
        out_toks = tokenize(text)
        [cached] = self._cache(model, [prompt], [out_toks])
        completion = len(out_toks) + (min(thinking, max_tokens or thinking))
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if target == "gemini" and not text:
            del message["content"]  # an all-thinking reply carries no content at all
        if fault == "content_filter":
            message["content"] = None  # Azure OpenAI: filtered content is null
        self._record(path, model, key, {
            "status": 200, "ok": fault not in ("abort", "content_filter"), "fault": fault,
            "prompt_tokens": len(prompt),
            "cached_tokens": cached,
            "completion_tokens": completion, "sample_index": sample, "temperature": temperature})
        return json_response(200, {
            "id": f"chatcmpl-{key[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish["type"]}],
            "usage": targets.usage(target, len(prompt), completion, cached),
        })

    def _generate(self, body: dict[str, Any], model: str, fault: str | None) -> Response:
        start = time.perf_counter()
        if body.get("input_ids") is not None or body.get("input_embeds") is not None:
            raise BadRequest("the loopback server accepts `text` only")
        if body.get("stream"):
            raise BadRequest("the loopback server does not stream")
        text = body.get("text")
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("`text` must be a string or a non-empty list of strings")
        n = len(texts)
        sps = [check_sampling({} if sp is None else sp)
               for sp in per_item(body.get("sampling_params"), n, "sampling_params")]
        images = generate_images(body.get("image_data"), single, n)
        rids = generate_rids(body.get("rid"), n)
        spec = self.models[model]
        if spec.target in targets.SGLANG_TARGETS:
            for t, imgs in zip(texts, images, strict=True):
                targets.check_images(spec.family, spec.sglang_version, t, imgs)
        items = []
        for t, sp, imgs in zip(texts, sps, images, strict=True):
            temperature = float(1.0 if sp.get("temperature") is None else sp["temperature"])
            max_new = sp.get("max_new_tokens")
            max_new = 128 if max_new is None else max_new
            custom = sp.get("custom_params") if isinstance(sp.get("custom_params"), dict) else {}
            sample = int(custom.get("sample_index", 0))
            out = "" if max_new == 0 else self._reply(model, sim_text_from_generate(t),
                                                      temperature, sample)
            out, finish = clip(out, max_new, sp.get("stop"))
            if max_new == 0:  # a prefill-only warm-up
                finish = {"type": "length", "length": 0}
            if fault == "abort" and not items:  # SGLang aborts a request of the batch
                out, finish = out[: len(out) // 2], {"type": "abort",
                                                     "message": "aborted (injected)"}
            items.append((t, sp, imgs, temperature, sample, out, finish))
        prompts = [prompt_chain(t, imgs) for t, _, imgs, *_ in items]
        outs = [tokenize(it[5]) for it in items]
        hits = self._cache(model, prompts, outs)
        latency = round(time.perf_counter() - start, 6)
        results = []
        for (t, sp, imgs, temperature, sample, out, finish), rid, prompt, cached, out_toks in zip(
                items, rids, prompts, hits, outs, strict=True):
            meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                    "completion_tokens": len(out_toks), "cached_tokens": cached,
                    "weight_version": "default", "e2e_latency": latency}
            if cached:
                meta["cached_tokens_details"] = {"device": cached, "host": 0}
            if imgs:
                meta["image_tokens"] = IMAGE_TOKENS * len(imgs)
            results.append({"text": out, "output_ids": _output_ids(out_toks), "meta_info": meta})
            aborted = finish["type"] == "abort"
            self._record("/generate", model, (t, imgs, sp, sample), {
                "status": 200, "ok": not aborted,
                "fault": fault if aborted or fault == "slow" else None,
                "prompt_tokens": len(prompt),
                "cached_tokens": cached,
                "completion_tokens": len(out_toks), "sample_index": sample,
                "temperature": temperature, "batch_size": n})
        return json_response(200, results[0] if single else results)


_IDS: dict[str, int] = {}  # token -> its output id, for the tokens seen lately


def _output_ids(tokens: list[str]) -> list[int]:
    """A reply's `output_ids`: crc32 of each token, modulo a vocabulary of 151,000."""
    ids = _IDS
    try:
        return [ids[x] for x in tokens]
    except KeyError:
        if len(ids) > 100_000:
            ids.clear()
        out = [zlib.crc32(x.encode()) % 151_000 for x in tokens]
        ids.update(zip(tokens, out, strict=True))
        return out


def _error_body(chat: bool) -> Any:
    """The error body of a refused request: OpenAI's shape on chat, SGLang's on /generate."""
    if chat:
        return lambda msg: {"error": {"message": msg}}
    return lambda msg: {"error": msg}


# ---------------------------------------------------------------- command line


def models_from_config(path: str | Path) -> dict[str, dict[str, Any]]:
    """Served models from a run config: every mentor, intern and the judge, by `model` name."""
    from mics.config import load_config

    cfg = load_config(path)
    out: dict[str, dict[str, Any]] = {}
    for role, group in (("mentor", cfg.mentors), ("intern", cfg.interns), ("judge", (cfg.judge,))):
        for m in group:
            allowed = {"seed", "latency_s", *simulator.ROLE_OPTIONS[role]}
            out[m.model] = {"role": role, **{k: v for k, v in m.options.items() if k in allowed}}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.loopback --config examples/simulated.toml --port 8900`."""
    ap = argparse.ArgumentParser(prog="python -m bench.loopback",
                                 description="Loopback test server: SIMULATOR models behind OpenAI "
                                             "chat and SGLang `/generate` wire formats.")
    ap.add_argument("--config", required=True, help="run config TOML naming the models to serve")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--fault-kinds", default="429,500,503,drop,malformed")
    ap.add_argument("--slow-s", type=float, default=1.0)
    ap.add_argument("--api-key-env", default="", help="require the key held by this variable")
    args = ap.parse_args(argv)
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    faults = Faults(rate=args.fault_rate, kinds=tuple(args.fault_kinds.split(",")),
                    slow_s=args.slow_s)
    srv = LoopbackServer(models_from_config(args.config), faults=faults, seed=args.seed,
                         api_key=key, port=args.port)
    with srv:
        print(f"serving {', '.join(srv.models)} at {srv.url} (chat: {srv.url}/v1); Ctrl-C stops",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

