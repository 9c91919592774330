"""The openai backend, the call gate and `mics doctor` against the loopback server's strict
OpenAI, Gemini, DashScope and DeepSeek modes (issue 11)."""

from __future__ import annotations

import time
from dataclasses import replace
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import pytest

from backends.base import Call, FatalError, PermanentError, TransientError
from backends.gate import CallGate, RunAborted
from backends.http import parse_duration, retry_after
from backends.openai_chat import OpenAIChat
from bench.loopback import LoopbackServer
from mics.config import ConfigError, ModelConfig, SearchConfig, parse_config
from mics.doctor import check_model
from mics.types import Prompt, Reply, Sampling, Text

PROMPT = Prompt("You are a mentor.", (Text("Case: chest pain. Propose the next step."),))


def served(target: str, role: str = "mentor") -> dict[str, Any]:
    return {"m": {"role": role, "target": target}}


def chat(srv: LoopbackServer, **options: Any) -> OpenAIChat:
    return OpenAIChat(ModelConfig(name="ep", backend="openai", model="m",
                                  base_url=f"{srv.url}/v1", options=options))


def complete(model: OpenAIChat, temperature: float = 0.7, max_tokens: int = 2048) -> Reply:
    async def go() -> Reply:
        try:
            return await model.complete(Call(PROMPT, Sampling(temperature=temperature,
                                                              max_tokens=max_tokens)))
        finally:
            await model.aclose()

    return anyio.run(go)


def bodies(srv: LoopbackServer) -> list[dict[str, Any]]:
    return [b for _, b in srv.bodies]


# ---------------------------------------------------------------- reasoning models


def test_reasoning_models_refuse_max_tokens_and_sampling_unless_configured():
    with LoopbackServer(served("openai-reasoning"), keep_bodies=True) as srv:
        with pytest.raises(PermanentError, match="max_completion_tokens"):
            complete(chat(srv))
        with pytest.raises(PermanentError, match="'temperature' does not support 0.7"):
            complete(chat(srv, max_tokens_field="max_completion_tokens"))
        reply = complete(chat(srv, max_tokens_field="max_completion_tokens",
                              send_sampling=False, reasoning_effort="low"))
        body = bodies(srv)[-1]
    assert reply.text
    assert body["max_completion_tokens"] == 2048 and body["reasoning_effort"] == "low"
    assert "temperature" not in body and "top_p" not in body and "max_tokens" not in body


def test_openai_refuses_fields_it_does_not_know():
    with LoopbackServer(served("openai")) as srv:
        with pytest.raises(PermanentError, match="Unrecognized request argument supplied: top_k"):
            complete(chat(srv, send_top_k=True))
        assert complete(chat(srv)).text


def test_reply_changing_options_are_part_of_the_memo_identity():
    with LoopbackServer(served("openai")) as srv:
        plain, tuned = chat(srv), chat(srv, max_tokens=8192, reasoning_effort="low")
        assert plain.identity() == {"backend": "openai", "model": "m"}  # old keys unchanged
        assert tuned.identity() == {"backend": "openai", "model": "m", "max_tokens": 8192,
                                    "reasoning_effort": "low"}
    with pytest.raises(ValueError, match="send_sampling"):
        OpenAIChat(ModelConfig(name="x", backend="openai", model="m", base_url="http://h",
                               options={"send_sampling": "no"}))


# ---------------------------------------------------------------- Gemini thinking


def test_gemini_thinking_eats_a_small_limit_and_the_error_says_so():
    with LoopbackServer(served("gemini"), keep_bodies=True) as srv:
        with pytest.raises(PermanentError) as info:
            complete(chat(srv))  # 2048 tokens, dynamic thinking (4096 in the loopback)
        with pytest.raises(PermanentError, match="only works in thinking mode"):
            complete(chat(srv, reasoning_effort="none"))
        reply = complete(chat(srv, reasoning_effort="low", max_tokens=8192))
        body = bodies(srv)[-1]
    message = str(info.value)
    assert "empty reply" in message and '"length"' in message and "2048" in message
    assert "options.max_tokens" in message and "reasoning_effort" in message
    assert reply.text and reply.finish_reason == "stop"
    assert body["max_tokens"] == 8192 and body["reasoning_effort"] == "low"


def test_doctor_probe_needs_real_text_at_the_runs_limit():
    search = SearchConfig()
    with LoopbackServer(served("gemini"), keep_bodies=True) as srv:
        base = ModelConfig(name="gemini", backend="openai", model="m", base_url=f"{srv.url}/v1")
        bad = anyio.run(check_model, "mentor", base, search)
        tuned = replace(base, options={"reasoning_effort": "low", "max_tokens": 8192})
        good = anyio.run(check_model, "mentor", tuned, search)
        sent = [b.get("max_tokens") for b in bodies(srv)]
    assert not bad.ok and "empty reply" in bad.message
    assert good.ok and "512 px" in good.message  # the mentor image size is reported
    assert sent == [search.mentor_max_tokens, 8192]


# ---------------------------------------------------------------- rate limits and quota


def test_gemini_429_body_gives_the_wait():
    faults = {"forced": {"m": "429"}, "retry_after_s": 53}
    with LoopbackServer(served("gemini"), faults=faults) as srv, \
            pytest.raises(TransientError) as info:
        complete(chat(srv, reasoning_effort="low", max_tokens=8192))
    assert info.value.status == 429 and info.value.retry_after == 53.0


def test_openai_429_prefers_retry_after_ms():
    faults = {"forced": {"m": "429"}, "retry_after_s": 0.25}
    with LoopbackServer(served("openai"), faults=faults) as srv, \
            pytest.raises(TransientError) as info:
        complete(chat(srv))
    assert info.value.retry_after == 0.25  # retry-after says 1 (whole seconds)


def _resp(status: int = 429, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    return httpx.Response(status, headers=headers, **kw)


def test_retry_after_sources_in_order():
    assert retry_after(_resp(headers={"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after(_resp(headers={"retry-after": "7"})) == 7.0
    dated = retry_after(_resp(headers={"retry-after": formatdate(time.time() + 120,
                                                                 usegmt=True)}))
    assert dated is not None and 100 < dated <= 120
    assert retry_after(_resp(headers={"x-ratelimit-reset-requests": "6m0s",
                                      "x-ratelimit-reset-tokens": "20ms"})) == 360.0
    # the limit that was hit decides: a spent request budget does not wait for the tokens'
    hit = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s",
           "x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "149000"}
    assert retry_after(_resp(headers=hit)) == 1.0
    assert retry_after(_resp(headers={**hit, "x-ratelimit-remaining-requests": "12",
                                      "x-ratelimit-remaining-tokens": "0"})) == 360.0
    assert retry_after(_resp(500, headers=hit)) is None  # a 5xx never waits on them
    assert retry_after(_resp(json=[{"error": {"details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "53s"}]}}])) == 53.0
    assert retry_after(_resp(json={"error": {"message": "slow down"}})) is None
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("soon") is None


@pytest.mark.parametrize(("target", "status"), [("openai", 429), ("deepseek", 402),
                                                ("dashscope", 429)])
def test_quota_errors_stop_the_run_naming_the_endpoint(target, status, run_store):
    with LoopbackServer(served(target), faults={"forced": {"m": "quota"}}) as srv:
        with pytest.raises(FatalError) as info:
            complete(chat(srv))
        model = chat(srv)
        gate = CallGate(run_store)

        async def go() -> None:
            try:
                call = Call(PROMPT, Sampling(temperature=0.5, max_tokens=64))
                await gate.chat(model, call, role="mentor", qid="q0")
            finally:
                await model.aclose()

        with pytest.raises(RunAborted, match="out of quota"):
            anyio.run(go)
        sent = srv.counts()["items"]
    assert info.value.status == status and "ep (m at" in str(info.value)
    assert sent == 2  # one call each: a quota error is never retried
    [failure] = run_store.iter_failures()
    assert failure["attempts"] == 1 and failure["model"] == "ep"


def test_server_requested_waits_are_capped_per_endpoint_not_by_max_backoff():
    cfg = ModelConfig(name="e", backend="openai", model="m", max_backoff_s=30.0)
    assert CallGate.backoff_delay(cfg, 1, 53.0) == 53.0
    capped = ModelConfig(name="e", backend="openai", model="m", max_rate_limit_wait_s=40.0)
    assert CallGate.backoff_delay(capped, 1, 53.0) == 40.0
    assert CallGate.backoff_delay(cfg, 10, None) <= 30.0
    base = {"name": "e", "backend": "openai", "model": "m"}
    conf = {"mentors": [base], "interns": [base], "judge": base}
    with pytest.raises(ConfigError, match="max_rate_limit_wait_s"):
        parse_config({**conf, "judge": {**base, "max_rate_limit_wait_s": -1}})


# ---------------------------------------------------------------- cached tokens


def test_deepseek_cache_hits_are_read():
    with LoopbackServer(served("deepseek", role="judge"), keep_bodies=True) as srv:
        complete(chat(srv), temperature=0.0, max_tokens=8)
        second = complete(chat(srv), temperature=0.0, max_tokens=8)
        with httpx.Client() as c:
            raw = c.post(f"{srv.url}/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x"}]}).json()
    assert "prompt_tokens_details" not in raw["usage"]
    assert "prompt_cache_hit_tokens" in raw["usage"]
    assert second.usage.cached_tokens > 0
