"""The sglang intern backend against the loopback server's /generate, over real HTTP."""

from __future__ import annotations

import socket
from dataclasses import replace

import anyio
import pytest
from helpers import make_questions
from PIL import Image as PILImage

from backends.base import Call, PermanentError
from backends.registry import build_rollout
from backends.simulated import SimulatedModel
from bench.loopback import LoopbackServer
from mics.config import ModelConfig
from mics.dataset import inspect_image
from mics.prompts import intern_prompt
from mics.types import ImageRef, Sampling


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> ImageRef:
    import hashlib

    path = tmp_path_factory.mktemp("img") / "scan.png"
    PILImage.new("RGB", (64, 48), (120, 30, 30)).save(path)
    data = path.read_bytes()
    mime, w, h = inspect_image(data)
    return ImageRef(str(path), hashlib.sha256(data).hexdigest(), mime, w, h)


def intern_cfg(url: str, tok, **options) -> ModelConfig:
    return ModelConfig(name="i0", backend="sglang", model="i0", base_url=url,
                       options={"tokenizer": str(tok), **options})


def calls_for(q, prefixes, temps=(1.2, 0.2)):
    return [Call(intern_prompt(q, p), Sampling(temperature=t, top_p=0.9, top_k=20,
                                               max_tokens=64))
            for p in prefixes for t in temps]


def test_render_is_prefix_stable_with_one_placeholder_per_image(tokenizer_dir, image):
    model = build_rollout(intern_cfg("http://127.0.0.1:9", tokenizer_dir))
    q = replace(make_questions(1)[0], images=(image, image))
    a, b = (model.render(intern_prompt(q, p)) for p in ("Path.\n\n### Step 1: a", "Path.\n\nX"))
    assert a.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    root = model.root_text(intern_prompt(q, "Path.\n\n### Step 1: a"))
    assert a.startswith(root) and b.startswith(root)
    assert q.question in root and "Path." not in root
    assert a.endswith("<|im_start|>assistant\n")


def test_rollout_matches_in_process_simulator_and_sends_explicit_sampling(tokenizer_dir, image):
    q = replace(make_questions(1)[0], images=(image,))
    calls = calls_for(q, ["Let's think.\n\n### Step 1: This points toward: Pneumothorax.",
                          "Let's think.\n\n### Step 1: Look."])
    with LoopbackServer({"i0": {"role": "intern", "skill": 0.9}}, keep_bodies=True) as srv:
        model = build_rollout(intern_cfg(srv.url_for("i0"), tokenizer_dir, warmup=False))
        replies = anyio.run(model.rollout, calls)
        body = next(b for path, b in srv.bodies if path == "/generate")
    sim = SimulatedModel(ModelConfig(name="i0", backend="simulated", model="i0",
                                     options={"skill": 0.9}), "intern")
    expected = anyio.run(sim.rollout, calls)
    assert [r.text for r in replies] == [r.text for r in expected]
    assert body["sampling_params"] == [
        {"temperature": c.sampling.temperature, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64,
         "sampling_seed": model.seed(c)} for c in calls]
    assert all(len(imgs) == 1 and imgs[0].startswith("data:image/png;base64,")
               for imgs in body["image_data"])
    assert all(r.usage.prompt_tokens > 0 for r in replies)


def test_cached_tokens_are_recorded_and_warmup_raises_the_hit_rate(tokenizer_dir, image):
    q = replace(make_questions(1)[0], images=(image,))
    prefixes = [f"Let's think.\n\n### Step 1: Observation number {k} about the scan."
                for k in range(3)]
    rates = {}
    for warm in (True, False):
        with LoopbackServer({"i0": "intern"}) as srv:
            model = build_rollout(intern_cfg(srv.url_for("i0"), tokenizer_dir, warmup=warm))
            replies = anyio.run(model.rollout, calls_for(q, prefixes))
            served = [e for e in srv.log if e.path == "/generate"][-len(replies):]
        assert [r.usage.cached_tokens for r in replies] == [e.cached_tokens for e in served]
        rates[warm] = (sum(r.usage.cached_tokens for r in replies)
                       / sum(r.usage.prompt_tokens for r in replies))
    assert rates[True] >= 0.85
    assert rates[False] < rates[True] - 0.3


def test_wrong_model_and_unreachable_server_name_the_url(tokenizer_dir):
    q = make_questions(1)[0]
    with LoopbackServer({"other": "intern"}) as srv:
        url = srv.url_for("other")
        model = build_rollout(intern_cfg(url, tokenizer_dir))
        results = anyio.run(model.rollout, calls_for(q, ["p"]))
        assert all(isinstance(r, PermanentError) and "serves" in str(r) and url in str(r)
                   for r in results)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    model = build_rollout(intern_cfg(dead, tokenizer_dir))
    results = anyio.run(model.rollout, calls_for(q, ["p"]))
    assert all(isinstance(r, PermanentError) and "unreachable" in str(r) and dead in str(r)
               for r in results)


def test_several_servers_one_question_one_server(tokenizer_dir):
    """Each question's calls all reach one server (its prefix cache stays warm), and the six
    questions spread over both: read from the servers' own request bodies."""
    servers = [LoopbackServer({"i0": "intern"}, keep_bodies=True) for _ in range(2)]
    with servers[0] as a, servers[1] as b:
        model = build_rollout(intern_cfg(a.url_for("i0"), tokenizer_dir,
                                         urls=[b.url_for("i0")], warmup=False))
        qs = make_questions(6)

        async def all_questions() -> None:
            for q in qs:
                await model.rollout(calls_for(q, ["p1", "p2"]))
            await model.aclose()

        anyio.run(all_questions)
    served = []  # per server: the question of every prompt it was sent
    for srv in servers:
        texts = [t for path, body in srv.bodies if path == "/generate"
                 for t in ([body["text"]] if isinstance(body["text"], str) else body["text"])]
        served.append([next(q.qid for q in qs if q.question in t) for t in texts])
    assert sum(map(len, served)) == len(qs) * 4  # 2 prefixes x 2 temperatures per question
    assert set(served[0]) and set(served[1])  # both servers used ...
    assert not set(served[0]) & set(served[1])  # ... but no question on both
    assert set(served[0]) | set(served[1]) == {q.qid for q in qs}


def test_unknown_option_is_an_error(tokenizer_dir):
    from mics.config import ConfigError

    with pytest.raises(ConfigError, match="warmpu"):
        build_rollout(intern_cfg("http://127.0.0.1:9", tokenizer_dir, warmpu=False))
