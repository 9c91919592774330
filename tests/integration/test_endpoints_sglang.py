"""The sglang backend against the loopback server's strict SGLang and router modes (issue 11):
each request is checked the way the real server version checks it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import httpx
import pytest
from helpers import make_questions
from PIL import Image as PILImage

from backends.base import BackendError, Call, FatalError, PermanentError
from backends.registry import build_rollout
from backends.sglang import SGLangRollout, internvl_placeholder, parse_version
from bench.loopback import LoopbackServer
from mics.config import ModelConfig
from mics.dataset import inspect_image
from mics.prompts import intern_prompt
from mics.types import ImageRef, Question, Sampling

QWEN_PATH = "/models/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> ImageRef:
    import hashlib

    path = tmp_path_factory.mktemp("img") / "scan.png"
    PILImage.new("RGB", (32, 24), (10, 200, 30)).save(path)
    data = path.read_bytes()
    mime, w, h = inspect_image(data)
    return ImageRef(str(path), hashlib.sha256(data).hexdigest(), mime, w, h)


def served(version: str, target: str = "sglang", **extra: Any) -> dict[str, Any]:
    return {"i": {"role": "intern", "skill": 0.9, "target": target, "version": version,
                  "model_path": QWEN_PATH, **extra}}


def intern(url: str, tok, model: str = "Qwen/Qwen2.5-VL-7B-Instruct", **options: Any
           ) -> SGLangRollout:
    return build_rollout(ModelConfig(name="qwen-intern", backend="sglang", model=model,
                                     base_url=url, options={"tokenizer": str(tok), **options}))


def calls(q: Question, n_samples: int = 2) -> list[Call]:
    return [Call(intern_prompt(q, "Let's think.\n\n### Step 1: Look."),
                 Sampling(temperature=t, max_tokens=32), k)
            for k, t in enumerate((1.2, 0.2)[:n_samples])]


def rollout(model: SGLangRollout, batch: list[Call]) -> list[Any]:
    async def go() -> list[Any]:
        try:
            return await model.rollout(batch)
        finally:
            await model.aclose()

    return anyio.run(go)


def generate_bodies(srv: LoopbackServer) -> list[dict[str, Any]]:
    return [b for path, b in srv.bodies if path == "/generate"]


def with_image(image: ImageRef) -> Question:
    return replace(make_questions(1)[0], images=(image,))


def test_old_server_has_only_get_routes_and_we_fall_back(tokenizer_dir, image):
    with LoopbackServer(served("0.5.2"), keep_bodies=True) as srv:
        url = srv.url_for("i")
        with httpx.Client() as c:  # the strict server behaves like 0.5.2 ...
            assert c.get(f"{url}/model_info").status_code == 404
            assert c.get(f"{url}/server_info").status_code == 404
            info = c.get(f"{url}/get_model_info").json()
            assert info["model_path"] == QWEN_PATH and "served_model_name" not in info
        model = intern(url, tokenizer_dir, warmup=False)
        results = rollout(model, calls(with_image(image)))  # ... and we still get replies
        bodies = generate_bodies(srv)
    assert all(not isinstance(r, BackendError) for r in results), results
    assert model.versions[url] == (0, 5, 2)
    # 0.5.2 has no sampling_seed: none is sent (the strict server would refuse it)
    assert bodies and all("sampling_seed" not in sp for b in bodies for sp in b["sampling_params"])


def test_sampling_seed_is_refused_before_0_5_3_and_sent_from_it(tokenizer_dir, image):
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 2, "sampling_seed": 7}}
    with LoopbackServer(served("0.5.2")) as old, httpx.Client() as c:
        refused = c.post(f"{old.url_for('i')}/generate", json=body)
    assert refused.status_code == 400 and "sampling_seed" in refused.text

    q = with_image(image)
    with LoopbackServer(served("0.5.3"), keep_bodies=True) as srv:
        model = intern(srv.url_for("i"), tokenizer_dir, warmup=False)
        first = rollout(model, calls(q))
        again = intern(srv.url_for("i"), tokenizer_dir, warmup=False)
        second = rollout(again, calls(q))
        bodies = generate_bodies(srv)
    assert all(not isinstance(r, BackendError) for r in first + second)
    seeds = [[sp["sampling_seed"] for sp in b["sampling_params"]] for b in bodies]
    assert seeds[0] == seeds[1]  # the same call, re-sent, samples with the same seed
    assert len(set(seeds[0])) == 2  # two samples of one prompt get different seeds
    assert seeds[0] == [model.seed(c) for c in calls(q)]


def test_model_check_matches_launch_path_and_explains_a_mismatch(tokenizer_dir, image):
    q = with_image(image)
    with LoopbackServer(served("0.5.9")) as srv:
        url = srv.url_for("i")
        ok = rollout(intern(url, tokenizer_dir, warmup=False), calls(q))
        explicit = rollout(intern(url, tokenizer_dir, model="anything", warmup=False,
                                  served_model=QWEN_PATH), calls(q))
        wrong = rollout(intern(url, tokenizer_dir, model="Qwen/Qwen2-VL-7B-Instruct",
                               warmup=False), calls(q))
    assert all(not isinstance(r, BackendError) for r in ok + explicit)
    assert all(isinstance(r, FatalError) for r in wrong)
    message = str(wrong[0])
    assert f"model_path='{QWEN_PATH}'" in message and "Qwen/Qwen2-VL-7B-Instruct" in message
    assert url in message and "served_model" in message


def test_model_check_accepts_the_tokenizer_folder_name(tokenizer_dir, image):
    q = with_image(image)
    results = {}
    for path in (f"/srv/{tokenizer_dir.name}", "/srv/other"):  # options.tokenizer's folder
        with LoopbackServer(served("0.5.9", model_path=path)) as srv:
            results[path] = rollout(intern(srv.url_for("i"), tokenizer_dir, model="my-intern",
                                           warmup=False), calls(q))
    assert all(not isinstance(r, BackendError) for r in results[f"/srv/{tokenizer_dir.name}"])
    assert all(isinstance(r, FatalError) and "options.tokenizer=" in str(r)
               for r in results["/srv/other"])


@pytest.mark.parametrize(("version", "placeholder"), [("0.5.6", "<IMG_CONTEXT>"),
                                                      ("0.5.7", "<image>")])
def test_internvl_placeholder_follows_the_server_version(tokenizer_dir, image, version,
                                                         placeholder):
    q = replace(with_image(image), images=(image, image))
    spec = served(version, family="internvl", model_path="/models/InternVL3-8B")
    with LoopbackServer(spec, keep_bodies=True) as srv:
        model = intern(srv.url_for("i"), tokenizer_dir, model="OpenGVLab/InternVL3-8B",
                       family="internvl")
        results = rollout(model, calls(q))
        texts = [t for b in generate_bodies(srv) for t in b["text"]]
    assert all(not isinstance(r, BackendError) for r in results), results
    assert internvl_placeholder(parse_version(version)) == placeholder
    assert texts and all(t.count(placeholder) == 2 for t in texts)


def test_the_wrong_internvl_placeholder_is_what_the_strict_server_refuses(tokenizer_dir, image):
    spec = served("0.5.6", family="internvl", model_path="/models/InternVL3-8B")
    with LoopbackServer(spec) as srv:
        model = intern(srv.url_for("i"), tokenizer_dir, model="OpenGVLab/InternVL3-8B",
                       family="internvl", image_placeholder="<image>", warmup=False)
        results = rollout(model, calls(with_image(image)))
    assert all(isinstance(r, BackendError) and r.status == 500 for r in results)
    assert "no image features were loaded" in str(results[0])


def test_internvl_refuses_to_guess_without_a_version(tokenizer_dir):
    model = intern("http://127.0.0.1:9", tokenizer_dir, family="internvl")
    with pytest.raises(FatalError, match="does not report its version"):
        model.placeholder_for("http://127.0.0.1:9", None)
    with pytest.raises(FatalError, match="image_placeholder"):
        model.placeholder()
    assert model.placeholder_for("http://127.0.0.1:9", parse_version("0.5.6")) == "<IMG_CONTEXT>"
    assert model.placeholder_for("http://127.0.0.1:9", parse_version("0.5.7")) == "<image>"
    with pytest.raises(FatalError, match="image_placeholder"):
        model.placeholder()  # asking does not choose: only a checked server does


def test_internvl_servers_that_disagree_on_the_placeholder_are_refused(tokenizer_dir, image):
    """Two servers, SGLang 0.5.6 (<IMG_CONTEXT>) and 0.5.7 (<image>), behind one intern:
    whichever is met second is refused, saying they disagree; the first one serves."""
    specs = [served(v, family="internvl", model_path="/models/InternVL3-8B")
             for v in ("0.5.6", "0.5.7")]
    with LoopbackServer(specs[0]) as a, LoopbackServer(specs[1]) as b:
        model = intern(a.url_for("i"), tokenizer_dir, model="OpenGVLab/InternVL3-8B",
                       family="internvl", urls=[b.url_for("i")], warmup=False)

        async def every_question() -> list[Any]:
            try:
                return [r for i in range(6) for r in await model.rollout(
                    calls(replace(with_image(image), qid=f"q{i}", question=f"Case {i}?")))]
            finally:
                await model.aclose()

        results = anyio.run(every_question)
    refused = [r for r in results if isinstance(r, FatalError)]
    assert refused and all("disagree" in str(r) for r in refused)
    assert any(not isinstance(r, BackendError) for r in results)


def test_placeholder_count_is_checked_before_sending(tokenizer_dir, image):
    q = replace(with_image(image), question="Where is the lesion in <image>?")
    with LoopbackServer(served("0.5.23"), keep_bodies=True) as srv:
        model = intern(srv.url_for("i"), tokenizer_dir, warmup=False)
        results = rollout(model, calls(q))
        sent = generate_bodies(srv)
    assert all(isinstance(r, PermanentError) and "2 image placeholder(s) for 1 image(s)"
               in str(r) for r in results)
    assert sent == []


def test_router_takes_one_text_per_request_and_serves_get_routes(tokenizer_dir):
    with LoopbackServer(served("0.5.6", target="router")) as srv, httpx.Client() as c:
        url = srv.url_for("i")
        batch = c.post(f"{url}/generate", json={"text": ["a", "b"],
                                                "sampling_params": {"max_new_tokens": 2}})
        single = c.post(f"{url}/generate", json={"text": "a",
                                                 "sampling_params": {"max_new_tokens": 2}})
        assert c.get(f"{url}/model_info").status_code == 404
        model = intern(url, tokenizer_dir)

        async def check() -> None:  # falls back to /get_model_info and /get_server_info
            try:
                await model.check(url)
            finally:
                await model.aclose()

        anyio.run(check)
    assert batch.status_code == 422 and "invalid type: sequence, expected a string" in batch.text
    assert single.status_code == 200 and isinstance(single.json()["text"], str)
    assert model.versions[url] == (0, 5, 6)


def test_doctor_names_the_server_version_and_image_size(tokenizer_dir):
    from mics.doctor import check_model

    with LoopbackServer(served("0.5.6")) as srv:
        cfg = ModelConfig(name="qwen-intern", backend="sglang",
                          model="Qwen/Qwen2.5-VL-7B-Instruct", base_url=srv.url_for("i"),
                          options={"tokenizer": str(tokenizer_dir)})
        check = anyio.run(check_model, "intern", cfg)
    assert check.ok, check.message
    assert "SGLang 0.5.6" in check.message and "full size" in check.message
