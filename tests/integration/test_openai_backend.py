"""The `openai` backend and the `exact` judge, over real HTTP against the loopback server."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import make_questions
from PIL import Image as PILImage

from backends.base import Call, PermanentError, TransientError
from backends.exact import ExactJudge, choice_letter, matches
from backends.gate import CallGate
from backends.openai_chat import OpenAIChat
from backends.registry import build_chat, build_rollout
from backends.simulated import SimulatedModel
from bench.loopback import Faults, LoopbackServer, tokenize
from mics.config import ConfigError, ModelConfig
from mics.dataset import inspect_image
from mics.prompts import intern_prompt, judge_prompt, mentor_prompt
from mics.types import ImageRef, Prompt, Question, Reply, Sampling, Text

SERVED = {"sim-mentor": {"role": "mentor", "quality": 0.6}, "sim-intern": {"role": "intern",
          "skill": 0.9}, "sim-judge": "judge"}
SENTINEL = "sk-SENTINEL-never-shown-0123456789"


def cfg(srv: LoopbackServer, model: str = "sim-mentor", **kw: Any) -> ModelConfig:
    return ModelConfig(name=f"{model}-ep", backend="openai", model=model,
                       base_url=f"{srv.url}/v1", **kw)


def complete_once(model: OpenAIChat, c: Call) -> Reply:
    """One call and close, in one event loop (a client's connections belong to its loop)."""

    async def go() -> Reply:
        try:
            return await model.complete(c)
        finally:
            await model.aclose()

    return anyio.run(go)


def call(prompt: Prompt, temperature: float = 0.7, index: int = 0, **kw: Any) -> Call:
    return Call(prompt, Sampling(temperature=temperature, **kw), index)


def _image(path: Path, fmt: str, size: tuple[int, int]) -> ImageRef:
    img = PILImage.new("RGB", size, (120, 30, 200))
    img.save(path, format=fmt)
    data = path.read_bytes()
    mime, w, h = inspect_image(data)
    return ImageRef(str(path), hashlib.sha256(data).hexdigest(), mime, w, h)


@pytest.fixture
def question(tmp_path: Path) -> Question:
    big = _image(tmp_path / "big.png", "PNG", (1200, 800))
    jpeg = _image(tmp_path / "really-a-jpeg.png", "JPEG", (300, 200))  # extension lies
    q = make_questions(1)[0]
    return Question(q.qid, q.index, q.question, q.gt_answer, (big, jpeg),
                    (big.path, jpeg.path), q.case_info)


async def _both(sim: SimulatedModel, http: OpenAIChat, c: Call) -> tuple[Reply, Reply]:
    try:
        return await sim.complete(c), await http.complete(c)
    finally:
        await http.aclose()


def test_http_reply_equals_in_process_reply(question):
    mentor_cfg = ModelConfig(name="m", backend="simulated", model="sim-mentor",
                             options={"quality": 0.6})
    intern_cfg = ModelConfig(name="i", backend="simulated", model="sim-intern",
                             options={"skill": 0.9})
    judge_cfg = ModelConfig(name="j", backend="simulated", model="sim-judge")
    prefix = "### Step 1: Look. This points toward: Pneumothorax."
    with LoopbackServer(models=SERVED) as srv:
        cases = [
            (mentor_cfg, "mentor", mentor_prompt(question, ""), 0),
            (mentor_cfg, "mentor", mentor_prompt(question, prefix), 3),
            (intern_cfg, "intern", intern_prompt(question, prefix), 0),
            (judge_cfg, "judge", judge_prompt(question, question.gt_answer), 0),
            (judge_cfg, "judge", judge_prompt(question, "Appendicitis"), 1),
        ]
        for sim_cfg, role, prompt, index in cases:
            for temp in (1.2, 0.0):
                c = call(prompt, temp, index, max_tokens=2048)
                sim = SimulatedModel(sim_cfg, role)
                http = OpenAIChat(cfg(srv, sim_cfg.model), role)
                want, got = anyio.run(_both, sim, http, c)
                assert got.text == want.text, (role, temp, index)
                assert got.finish_reason == "stop" and got.usage.prompt_tokens > 0
                assert got.usage.latency_s > 0
        texts = {e.model: e for e in srv.log}
        assert set(texts) == set(SERVED) and all(e.ok for e in srv.log)


def test_request_body_sampling_and_images(question):
    with LoopbackServer(models=SERVED, keep_bodies=True) as srv:
        prompt = mentor_prompt(question, "")
        http = OpenAIChat(cfg(srv, options={"image_max_side": 256, "send_top_k": True,
                                            "send_seed": True}))
        complete_once(http, call(prompt, 0.3, 5, top_p=0.9, top_k=20, max_tokens=300,
                                 stop=("END",)))
        [(path, body)] = srv.bodies
        assert path == "/v1/chat/completions" and body["model"] == "sim-mentor"
        assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.9, 300)
        assert body["stop"] == ["END"] and body["top_k"] == 20 and body["seed"] == 5
        system, user = body["messages"]
        assert system == {"role": "system", "content": prompt.system}
        parts = user["content"]
        assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]  # prompt order
        assert parts[2]["text"] == prompt.parts[2].text
        decoded = []
        for part in parts[:2]:
            url = part["image_url"]["url"]
            head, payload = url.split(",", 1)
            mime, w, h = inspect_image(base64.b64decode(payload))
            assert head == f"data:{mime};base64"
            decoded.append((mime, w, h))
        assert decoded == [("image/png", 256, 171), ("image/jpeg", 256, 171)]
        assert srv.log[0].sample_index == 5

        plain = OpenAIChat(cfg(srv))  # defaults: no top_k, no seed; text-only -> a string
        complete_once(plain, call(judge_prompt(question, "x"), 0.0, max_tokens=8))
        body = srv.bodies[-1][1]
        assert "top_k" not in body and "seed" not in body and "stop" not in body
        assert isinstance(body["messages"][1]["content"], str)
        assert body["max_tokens"] == 8 and body["temperature"] == 0.0


def test_usage_reports_cached_tokens():
    prompt = Prompt("sys", (Text("Correct answer: X\n\nReasoning prefix:\n"),))
    with LoopbackServer(models=SERVED) as srv:
        http = OpenAIChat(cfg(srv))

        async def go() -> list[Reply]:
            try:
                return [await http.complete(call(prompt, t)) for t in (0.5, 0.9)]
            finally:
                await http.aclose()

        first, second = anyio.run(go)
        n = len(tokenize("sys\nCorrect answer: X\n\nReasoning prefix:\n"))
        assert first.usage.prompt_tokens == second.usage.prompt_tokens == n
        assert (first.usage.cached_tokens, second.usage.cached_tokens) == (0, n - 1)
        assert first.usage.completion_tokens == len(tokenize(first.text))


def test_rollout_runs_concurrent_completions_in_order(question):
    calls = [call(intern_prompt(question, f"### Step 1: s{k}. This points toward: X."), t)
             for k in range(4) for t in (1.2, 0.2)]
    with LoopbackServer(models=SERVED, latency={"intern": 0.2}) as srv:
        intern = build_rollout(cfg(srv, "sim-intern"))
        sim = SimulatedModel(ModelConfig(name="i", backend="simulated", model="sim-intern",
                                         options={"skill": 0.9}), "intern")

        async def go() -> list[Reply]:
            try:
                return await intern.rollout(calls)
            finally:
                await intern.aclose()

        got = anyio.run(go)
        want = anyio.run(sim.rollout, calls)
        assert [g.text for g in got] == [w.text for w in want]


def test_rollout_sends_every_completion_at_once(question):
    """Concurrent, not one after another: the server holds every reply (60 s) and still sees
    all the rollout's requests arrive; then it stops, dropping the held replies."""
    calls = [call(intern_prompt(question, f"### Step 1: s{k}."), t)
             for k in range(4) for t in (1.2, 0.2)]
    srv = LoopbackServer(models=SERVED, latency={"intern": 60.0}).start()
    intern = build_rollout(cfg(srv, "sim-intern", max_retries=0))

    async def go() -> None:
        try:
            await intern.rollout(calls)
        finally:
            await intern.aclose()

    client = threading.Thread(target=anyio.run, args=(go,), daemon=True)
    client.start()
    try:
        deadline = time.monotonic() + 50  # a deadline for a failing run, not a speed check
        while len(srv.log) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.02)
        arrived = len(srv.log)
    finally:
        srv.stop()
        client.join(timeout=30)
    assert arrived == len(calls)
    assert not client.is_alive()  # the dropped replies ended the rollout


def _fail(srv: LoopbackServer, model_cfg: ModelConfig, c: Call) -> Exception:
    http = OpenAIChat(model_cfg)

    async def go() -> Exception:
        try:
            await http.complete(c)
        except Exception as e:  # returned for inspection
            return e
        finally:
            await http.aclose()
        raise AssertionError("the call did not fail")

    return anyio.run(go)


PROMPT = Prompt("sys", (Text("hello"),))


@pytest.mark.parametrize("kind", ["429", "500", "503", "drop", "malformed", "slow"])
def test_transient_faults(kind):
    faults = Faults(forced={"sim-judge": kind}, slow_s=1.0, retry_after_s=0.05)
    with LoopbackServer(models=SERVED, faults=faults) as srv:
        e = _fail(srv, cfg(srv, "sim-judge", timeout_s=0.3), call(PROMPT))
        assert isinstance(e, TransientError) and e.retryable, (kind, e)
        assert "sim-judge" in str(e)
        if kind == "429":
            assert e.retry_after == pytest.approx(0.05)
            assert "HTTP 429" in str(e)


@pytest.mark.parametrize(("kind", "server_text"), [
    ("400", "bad request (injected)"), ("401", "invalid api key"), ("404", "does not exist")])
def test_permanent_faults_name_the_endpoint(kind, server_text):
    with LoopbackServer(models=SERVED, faults=Faults(forced={"sim-judge": kind})) as srv:
        e = _fail(srv, cfg(srv, "sim-judge"), call(PROMPT))
        assert isinstance(e, PermanentError) and not e.retryable
        msg = str(e)
        assert f"HTTP {kind}" in msg and server_text in msg
        assert "sim-judge-ep" in msg and "sim-judge" in msg and srv.url in msg


def test_unknown_model_is_permanent():
    with LoopbackServer(models=SERVED) as srv:
        e = _fail(srv, cfg(srv, "gpt-nonexistent"), call(PROMPT))
        assert isinstance(e, PermanentError) and "gpt-nonexistent" in str(e)


def test_api_key_is_sent_and_never_shown(monkeypatch):
    monkeypatch.setenv("MICS_TEST_KEY", SENTINEL)
    with LoopbackServer(models=SERVED, api_key=SENTINEL) as srv:
        good = OpenAIChat(cfg(srv, "sim-judge", api_key_env="MICS_TEST_KEY"))
        reply = complete_once(good, call(PROMPT))
        assert reply.text == "No"
        assert SENTINEL not in repr(good) and SENTINEL not in repr(good.__dict__)
        errors = []
        with LoopbackServer(models=SERVED, api_key="another-key") as other:
            errors.append(_fail(other, cfg(other, "sim-judge", api_key_env="MICS_TEST_KEY"),
                                call(PROMPT)))
        for kind in ("500", "drop", "slow"):
            srv.set_faults(forced={"sim-judge": kind}, slow_s=0.5)
            errors.append(_fail(srv, cfg(srv, "sim-judge", api_key_env="MICS_TEST_KEY",
                                         timeout_s=0.2), call(PROMPT)))
        assert isinstance(errors[0], PermanentError) and "invalid api key" in str(errors[0])
        for e in errors:
            assert SENTINEL not in str(e) and SENTINEL not in repr(e)
            assert SENTINEL not in repr(e.args) and e.__cause__ is None
    monkeypatch.delenv("MICS_TEST_KEY")
    with pytest.raises(ValueError, match="MICS_TEST_KEY"):
        OpenAIChat(ModelConfig(name="k", backend="openai", model="m",
                               base_url="http://127.0.0.1:9/v1", api_key_env="MICS_TEST_KEY"))


def test_options_are_validated_and_registered():
    base = ModelConfig(name="gpt", backend="openai", model="gpt-x", base_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="gpt") as info:
        OpenAIChat(ModelConfig(**{**base.__dict__, "options": {"image_size": 3}}))
    assert "image_max_side" in str(info.value) and "image_size" in str(info.value)
    with pytest.raises(ConfigError, match="image_size"):
        build_chat(ModelConfig(**{**base.__dict__, "options": {"image_size": 3}}), "mentor")
    model = build_chat(base, "mentor")
    assert isinstance(model, OpenAIChat)
    assert model.identity() == {"backend": "openai", "model": "gpt-x"}
    assert isinstance(build_rollout(base), OpenAIChat)
    anyio.run(model.aclose)
    judge = build_chat(ModelConfig(name="j", backend="exact", model="exact"), "judge")
    assert isinstance(judge, ExactJudge) and judge.identity() == {"backend": "exact", "rules": 3}
    with pytest.raises(ConfigError):
        build_chat(ModelConfig(name="j", backend="exact", model="exact", options={"x": 1}),
                   "judge")


def test_gate_retries_injected_faults_to_success(run_store):
    faults = Faults(rate=0.5, kinds=("429", "500", "503", "drop", "malformed"),
                    retry_after_s=0.01)
    with LoopbackServer(models=SERVED, faults=faults, seed=3) as srv:
        model = OpenAIChat(cfg(srv, "sim-judge", max_retries=12, backoff_s=0.001,
                               max_backoff_s=0.01))
        gate = CallGate(run_store)
        prompts = [Prompt("s", (Text(f"Model answer: a{k}\n\nCorrect answer: a{k}"),))
                   for k in range(12)]

        async def go() -> list[Any]:
            out: list[Any] = [None] * len(prompts)

            async def one(i: int) -> None:
                out[i] = await gate.chat(model, call(prompts[i], 0.0), role="judge", qid="q")

            try:
                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(one, i)
            finally:
                await model.aclose()
            return out

        out = anyio.run(go)
        assert all(isinstance(r, Reply) and r.text == "Yes" for r in out)
        assert gate.counts["retries"] > 0
        assert sum(e.fault is not None for e in srv.log) == gate.counts["retries"]


@pytest.mark.parametrize(("answer", "gold", "verdict"), [
    ("Pneumonia", "pneumonia", True),
    ("The pneumonia.", "Pneumonia", True),
    ("Right lower lobe pneumonia", "pneumonia", True),
    ("Pneumonitis", "pneumonia", False),
    ("pneumonia", "Right lower lobe pneumonia", False),
    ("(B)", "B", True),
    ("B", "B. Pneumonia", True),
    ("Option B", "B", True),
    ("The answer is (B).", "B", True),
    ("b)", "B", True),
    ("(C)", "B", False),
    ("C. Pneumonia", "B. Pneumonia", False),
    ("Pneumonia", "B. Pneumonia", True),
    ("(A)", "A", True),
    ("A pneumothorax", "A", False),
    ("e.g. pneumonia", "E", False),
    ("", "Pneumonia", False),
    ("Pneumonia", "", False),
])
def test_exact_matching(answer, gold, verdict):
    assert matches(answer, gold) is verdict


def test_exact_judge_reads_the_judge_prompt():
    q = make_questions(1)[0]  # gold: Pneumothorax
    judge = ExactJudge(ModelConfig(name="j", backend="exact", model="exact"))

    async def verdicts() -> list[str]:
        out = []
        for ans in ("pneumothorax", "Tension pneumothorax", "Pleural effusion",
                    "Pneumothorax\n\nwith more lines"):
            out.append((await judge.complete(call(judge_prompt(q, ans), 0.0))).text)
        return out

    assert anyio.run(verdicts) == ["Yes", "Yes", "No", "Yes"]
    assert choice_letter("Option d") == "D" and choice_letter("i.e. x") is None
    assert choice_letter("d", gold=True) == "D"


def _tree(store: Any, qid: str) -> list[tuple[Any, ...]]:
    return [(n["node_id"], n["step"], n["correct"], n["total"], n["chosen"],
             [s["answer"] for s in n["samples"]]) for n in store.get_nodes(qid)]


def test_engine_over_http_with_faults_matches_in_process(tmp_path):
    """The whole search over loopback HTTP, with injected faults, gives the in-process trees."""
    from helpers import sim_config

    from mics.config import parse_config
    from mics.engine import Engine
    from mics.run import build_models
    from store import RunStore

    qs = make_questions(3)
    sim = sim_config()
    served = {m["model"]: {"role": role, **m.get("options", {})}
              for role, group in (("mentor", sim["mentors"]), ("intern", sim["interns"]),
                                  ("judge", [sim["judge"]]))
              for m in group}
    faults = Faults(rate=0.1, retry_after_s=0.001)
    results = []
    with LoopbackServer(models=served, faults=faults, seed=0) as srv:
        http = {**sim, "mentors": [], "interns": [], "judge": None}
        retry = {"backend": "openai", "base_url": f"{srv.url}/v1", "max_retries": 20,
                 "backoff_s": 0.001, "max_backoff_s": 0.005, "options": {}}
        http["mentors"] = [{**m, **retry} for m in sim["mentors"]]
        http["interns"] = [{**m, **retry} for m in sim["interns"]]
        http["judge"] = {**sim["judge"], **retry}
        for i, raw in enumerate((sim, http)):
            cfg = parse_config(raw)
            with RunStore.open(tmp_path / f"r{i}", create=True) as store:
                models = build_models(cfg)
                gate = CallGate(store, session="t")

                async def go(cfg=cfg, store=store, models=models, gate=gate) -> None:
                    try:
                        await Engine(cfg, store, models, gate).run(qs)
                    finally:
                        for m in (*models.mentors, *models.interns, models.judge):
                            await m.aclose()

                anyio.run(go)
                results.append({q.qid: _tree(store, q.qid) for q in qs})
                if i == 1:
                    assert gate.counts["retries"] > 0 and gate.counts["failed"] == 0
        assert srv.counts()["by_fault"]
    assert results[0] == results[1]


def test_an_intern_sends_top_k_and_full_size_images_by_default(question):
    """B8 and B21 for an intern on an OpenAI-compatible server (vLLM, SGLang): left out, top_k
    comes from the model's generation_config (Qwen2-VL: 1, so every temperature is greedy); the
    intern sends the search's top_k and full-size images unless its options say otherwise, and
    its memo identity says so. A mentor keeps the reference's defaults and keys."""
    prompt = intern_prompt(question, "### Step 1: Look.")
    with LoopbackServer(models=SERVED, keep_bodies=True) as srv:
        intern = build_rollout(cfg(srv, "sim-intern"))
        complete_once(intern, call(prompt, 1.2, top_k=-1, max_tokens=64))
        body = srv.bodies[-1][1]
        assert body["top_k"] == -1
        sizes = [inspect_image(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))[1:]
                 for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
        assert sizes == [(1200, 800), (300, 200)]
        assert intern.identity() == {"backend": "openai", "model": "sim-intern",
                                     "send_top_k": True, "image_max_side": 0}
        mentor = build_chat(cfg(srv), "mentor")
        complete_once(mentor, call(prompt, 1.0, max_tokens=64))
        assert "top_k" not in srv.bodies[-1][1]
        assert mentor.identity() == {"backend": "openai", "model": "sim-mentor"}
        own = build_rollout(cfg(srv, "sim-intern", options={"send_top_k": False,
                                                            "image_max_side": 256}))
        complete_once(own, call(prompt, 1.2, max_tokens=64))
        assert "top_k" not in srv.bodies[-1][1]
        assert own.identity() == {"backend": "openai", "model": "sim-intern",
                                  "image_max_side": 256}
