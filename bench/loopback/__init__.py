"""Loopback test server: SIMULATOR models behind OpenAI chat and SGLang `/generate` wire formats.

Replies come from `backends.simulator`, computed from the same text `backends.simulated.render_text`
builds, so an in-process simulated run and a run over HTTP give identical replies. Prefix-cache
accounting (`cached_tokens`) is a real longest-common-prefix match over every token sequence the
model has seen, in the tokens of `tokenize`. Faults (429/5xx, slow, dropped, malformed, 4xx) are
injected at a seeded rate or forced per model, and can be changed while the server runs.

    with LoopbackServer(models={"m": "mentor", "i": {"role": "intern", "skill": 0.9}}) as srv:
        srv.url            # http://127.0.0.1:PORT  (chat: srv.url + "/v1")
        srv.url_for("i")   # http://127.0.0.1:PORT/m/i  (/generate served by model "i")

The sample index a simulator needs comes from the `X-Mics-Sample` header (or `seed`) on chat
requests and from `sampling_params.custom_params.sample_index` on /generate items.

Strict modes: a served model may name a real `target` ("sglang" with a `version`, "router",
"openai", "openai-reasoning", "gemini", "dashscope", "deepseek"); it then refuses and reports
what that server does (bench/targets.py, docs/endpoints.md). Without one it is lenient.

Modules: `server` (served models, routing, the request log, replies), `transport` (HTTP/1.1 on
an event loop), `wire` (the OpenAI chat and SGLang /generate formats), `faults` (what can go wrong
and how it looks on the wire), `tokens` (the token and prefix-cache model); `bench/targets.py`
holds the strict modes.

Stdlib only: `transport` is a small HTTP/1.1 server on an asyncio event loop in a background
thread (bytes on the wire as http.server's, a fraction of its CPU: the bench's server runs beside
the engine it times), with TCP_NODELAY and a listen backlog of 1024 (both needed for honest
timings on loopback: without the first, Nagle's algorithm and delayed ACKs stall small replies
~40 ms each; with a backlog of 5, 16+ connections at once stall 1 s).
"""

from __future__ import annotations

from bench.loopback.faults import FAULT_KINDS, Faults
from bench.loopback.server import (
    ROLES,
    LogEntry,
    LoopbackServer,
    ModelSpec,
    main,
    models_from_config,
)
from bench.loopback.tokens import IMAGE_TOKENS, PrefixCache, image_hash, tokenize
from bench.loopback.wire import (
    SGLANG_SAMPLING_KEYS,
    Response,
    json_response,
    sim_text_from_generate,
)

__all__ = [
    "FAULT_KINDS", "IMAGE_TOKENS", "ROLES", "SGLANG_SAMPLING_KEYS", "Faults", "LogEntry",
    "LoopbackServer", "ModelSpec", "PrefixCache", "Response", "image_hash", "json_response",
    "main", "models_from_config", "sim_text_from_generate", "tokenize",
]
