"""The loopback test server over real HTTP on 127.0.0.1: wire formats, prefix cache, faults."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Sequence
from pathlib import Path

import anyio
import httpx
import pytest
from helpers import ROOT, make_questions
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from backends import simulator
from backends.base import Call
from backends.simulated import SimulatedModel, render_text
from bench.loopback import (
    IMAGE_TOKENS,
    Faults,
    LoopbackServer,
    PrefixCache,
    models_from_config,
    sim_text_from_generate,
    tokenize,
)
from bench.loopback.tokens import chain, prompt_chain
from bench.loopback.wire import digest, generate_rids
from mics.config import ModelConfig
from mics.prompts import intern_prompt
from mics.types import Image, Sampling, Text

MODELS = {"mentor-a": {"role": "mentor", "quality": 0.7}, "intern-a": "intern",
          "judge-a": "judge"}


def _png(color: str, size: tuple[int, int] = (16, 16)) -> str:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _lcp(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class RefCache:
    """The expected cache: every sequence inserted so far, matched by brute force."""

    def __init__(self) -> None:
        self.seqs: list[list[str]] = []

    def match(self, tokens: list[str]) -> int:
        best = max((_lcp(tokens, s) for s in self.seqs), default=0)
        return min(best, max(0, len(tokens) - 1))


def test_tokenize_is_lossless_and_images_have_their_own_tokens():
    text = "Hello, world!  Step 1: look.\n\n### The final answer is: X "
    assert "".join(tokenize(text)) == text
    a, b = _png("red"), _png("blue")
    ta = tokenize("sys\n<image>Question", [a])
    tb = tokenize("sys\n<image>Question", [b])
    assert len(ta) == len(tb) == len(tokenize("sys\n")) + IMAGE_TOKENS + len(tokenize("Question"))
    assert _lcp(ta, tb) == len(tokenize("sys\n"))  # different images share nothing after
    qwen = "<|vision_start|><|image_pad|><|vision_end|>Q"
    assert tokenize(qwen, [a]) == tokenize("<image>Q", [a])
    assert tokenize("Q", [a])[:IMAGE_TOKENS] == ta[2:2 + IMAGE_TOKENS]  # no placeholder: first


def test_memoised_tokens_and_prefix_hashes_equal_the_plain_computation():
    text = "<|im_start|>user\nWhy? <image> Look.<|im_end|>\n"
    first = tokenize(text)
    first.append("changed")  # a caller's list is its own: the memo is not touched
    assert tokenize(text) == first[:-1] and "".join(tokenize(text)) == text
    assert prompt_chain(text) == tuple(chain(tokenize(text)))
    img = _png("red")
    assert prompt_chain(text, [img]) == tuple(chain(tokenize(text, [img])))
    assert prompt_chain(text, [img]) != prompt_chain(text)
    head, tail = tokenize("a b"), tokenize(" c d")
    assert chain(tail, chain(head)[-1]) == chain(head + tail)[len(head):]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(
    ["a", "b", "Z", "_", "7", "\u00e9", "\u0663", " ", "  ", "\n", "\t", "\u00a0", ".", "#",
     ":", "<image>", "<|image_pad|>", "<IMG_CONTEXT>", "<", ">", "|", "image"]),
    max_size=40).map("".join),
    min_size=1, max_size=12))
def test_tokens_from_a_remembered_neighbour_equal_a_fresh_tokenization(suffixes):
    """Texts that grow from one another (as prompts do) are tokenized from the remembered text
    sharing the longest prefix: tokens and prefix hashes must equal a fresh computation."""
    from bench.loopback import tokens

    memo = tokens._Recent(size=4)  # small: evictions happen too
    texts = ["".join(suffixes[:i + 1]) for i in range(len(suffixes))] + suffixes
    for text in texts + texts[::-1]:
        got = memo.get(text)
        assert list(got.tokens) == tokens._tokenize(text, ())
        assert got.prefix_hashes() == tuple(chain(tokens._tokenize(text, ())))
        assert got.ends == [len("".join(got.tokens[:i + 1])) for i in range(len(got.tokens))]
    assert len(memo.texts) <= 4 and set(memo.sorted) <= set(memo.texts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(["a", " b", "c", "\n", "<img:0>"]),
                                   max_size=12),
                          st.lists(st.sampled_from(["x", " y", "a"]), max_size=4)),
                min_size=1, max_size=8),
       st.integers(1, 3))
def test_prefix_cache_by_prefix_hashes_equals_by_tokens(items, batch):
    """match_chain / insert_chain (what the server uses) give what match / insert give, for
    requests of `batch` items matched before any of them is inserted."""
    plain, hashed = PrefixCache(), PrefixCache()
    for start in range(0, len(items), batch):
        group = items[start:start + batch]
        want = [plain.match(p) for p, _ in group]
        chains = [tuple(chain(p)) for p, _ in group]
        got = [hashed.match_chain(c) for c in chains]
        assert got == want
        for (p, out), c, hit in zip(group, chains, got, strict=True):
            plain.insert(p + out)
            hashed.insert_chain(c, out, hit)
        assert hashed._seen == plain._seen


def test_digest_and_fresh_rids_keep_their_format():
    import hashlib
    import json
    import uuid

    parts = ("/generate", "m", {"text": ["\u00e9 x" * 300, "y"], "b": [1.5, None, True]}, 2)
    assert digest(*parts) == hashlib.sha256(
        json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    rids = generate_rids(None, 50)
    assert len(set(rids)) == 50
    assert all(uuid.UUID(hex=r).hex == r and uuid.UUID(hex=r).version == 4
               and uuid.UUID(hex=r).variant == uuid.RFC_4122 for r in rids)


def test_admin_endpoints_and_models_list():
    with LoopbackServer(models=MODELS) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/health").status_code == 200
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == list(MODELS)
        info = c.get("/model_info").json()
        assert info["model_path"] == "intern-a" and info["is_generation"] is True
        assert c.get(f"{srv.url_for('judge-a')}/model_info").json()["model_path"] == "judge-a"
        assert c.post("/flush_cache").status_code == 200
        assert c.get("/nope").status_code == 404
        assert c.get("/m/unknown/health").status_code == 404


def test_chat_round_trip_matches_simulator_text():
    system, user = "You are a clinician.", "Correct answer: Pneumonia\n\nReasoning prefix:\n"
    with LoopbackServer(models=MODELS) as srv, httpx.Client(base_url=srv.url) as c:
        for path in ("/v1/chat/completions", "/chat/completions"):
            r = c.post(path, headers={"X-Mics-Sample": "3"}, json={
                "model": "mentor-a", "temperature": 0.7, "top_p": 1.0, "max_tokens": 4096,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": [{"type": "text", "text": user}]}]})
            assert r.status_code == 200
            data = r.json()
            assert data["object"] == "chat.completion" and data["model"] == "mentor-a"
            choice = data["choices"][0]
            assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
            want = simulator.mentor_reply(f"{system}\n{user}", seed=0, model="mentor-a",
                                          temperature=0.7, sample_index=3, quality=0.7)
            assert choice["message"]["content"] == want
            usage = data["usage"]
            assert usage["prompt_tokens"] == len(tokenize(f"{system}\n{user}"))
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert "cached_tokens" in usage["prompt_tokens_details"]
        # The second path saw the same prompt: all but the last token is cached.
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
        r = c.post("/v1/chat/completions", json={"model": "nobody", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]


def test_generate_single_and_batch_with_per_item_sampling():
    text = "Question: Q?\n\nReasoning prefix:\n### Step 1: x. This points toward: Pneumonia."
    with LoopbackServer(models=MODELS) as srv, httpx.Client(base_url=srv.url) as c:
        one = c.post("/generate", json={"text": text, "rid": "r1",
                                        "sampling_params": {"temperature": 0.2,
                                                            "max_new_tokens": 64}}).json()
        assert isinstance(one, dict) and one["meta_info"]["id"] == "r1"
        temps = [1.2, 0.2, 0.0]
        batch = c.post("/generate", json={
            "text": [text] * 3, "rid": "q",
            "sampling_params": [{"temperature": t, "top_p": 1.0, "top_k": -1,
                                 "max_new_tokens": 64} for t in temps]}).json()
        assert isinstance(batch, list) and len(batch) == 3
        assert [b["meta_info"]["id"] for b in batch] == ["q_0", "q_1", "q_2"]
        for item, t in zip(batch, temps, strict=True):
            assert item["text"] == simulator.intern_reply(text, seed=0, model="intern-a",
                                                          temperature=t)
            meta = item["meta_info"]
            assert meta["finish_reason"]["type"] == "stop"
            assert meta["completion_tokens"] == len(tokenize(item["text"])) == len(
                item["output_ids"])
            assert set(meta) >= {"prompt_tokens", "cached_tokens", "e2e_latency"}
        assert batch[1]["text"] == one["text"]  # same prompt and temperature
        # max_new_tokens truncates (finish "length"); a stop string cuts (finish "stop").
        cut = c.post("/generate", json={"text": [text, text], "sampling_params": [
            {"temperature": 0.2, "max_new_tokens": 2},
            {"temperature": 0.2, "max_new_tokens": 64, "stop": ["answer"]}]}).json()
        assert cut[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
        assert cut[0]["text"] == "".join(tokenize(one["text"])[:2])
        assert cut[1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "answer"}
        assert cut[1]["text"] == one["text"].split("answer")[0]


def test_generate_rejects_bad_sampling_params():
    with LoopbackServer(models=MODELS) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post("/generate", json={"text": "hi", "sampling_params": {"seed": 1}})
        assert r.status_code == 400 and "unknown field `seed`" in r.json()["error"]
        assert "sampling_seed" in r.json()["error"]
        r = c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1.5}})
        assert r.status_code == 400 and "max_new_tokens" in r.json()["error"]
        r = c.post("/generate", json={"text": ["a", "b"], "sampling_params": [{}]})
        assert r.status_code == 400 and "batch size" in r.json()["error"]
        r = c.post("/generate", json={"text": ["a", "b"], "image_data": [_png("red")]})
        assert r.status_code == 400
        r = c.post("/generate", json={"text": ["a", "b"], "rid": ["x", "x"]})
        assert r.status_code == 400
        r = c.post("/generate", content=b"{not json")
        assert r.status_code == 400
        for bad, says in (({"top_k": 0}, "top_k must be -1"), ({"top_p": 0.0}, "top_p must be"),
                          ({"temperature": -0.5}, "temperature must be non-negative")):
            r = c.post("/generate", json={"text": ["a", "b"], "sampling_params": [{}, bad]})
            assert r.status_code == 400 and says in r.json()["error"], bad
        ok = {"top_k": -1, "top_p": 1.0, "temperature": 0.0, "max_new_tokens": 0}
        assert c.post("/generate", json={"text": "a", "sampling_params": ok}).status_code == 200
        assert [e.status for e in srv.log] == [400] * 9 + [200]


def test_cached_tokens_are_the_longest_prefix_match():
    red, blue = _png("red"), _png("blue")
    root = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<image>Question: why?"
    prefixes = [root + f"\nStep {k}: reasoning number {k}, with words." for k in range(3)]
    ref = RefCache()
    with LoopbackServer(models=MODELS) as srv, httpx.Client(base_url=srv.url) as c:

        def send(texts: list[str], images: list[str], max_new: int) -> list[dict]:
            body = {"text": texts, "image_data": [[i] for i in images],
                    "sampling_params": [{"max_new_tokens": max_new, "temperature": 0.5}
                                        for _ in texts]}
            out = c.post("/generate", json=body).json()
            toks = [tokenize(t, [i]) for t, i in zip(texts, images, strict=True)]
            for item, tk in zip(out, toks, strict=True):  # items of one request do not share
                assert item["meta_info"]["cached_tokens"] == ref.match(tk)
                assert item["meta_info"]["prompt_tokens"] == len(tk)
                assert item["meta_info"]["image_tokens"] == IMAGE_TOKENS
            for item, tk in zip(out, toks, strict=True):
                ref.seqs.append(tk + tokenize(item["text"]))
            return out

        warm = send([root], [red], 0)  # warm-up: no text, but the prompt enters the cache
        assert warm[0]["text"] == "" and warm[0]["meta_info"]["completion_tokens"] == 0
        assert warm[0]["meta_info"]["finish_reason"]["type"] == "length"
        send(prefixes, [red] * 3, 0)
        fan = send(prefixes * 2, [red] * 6, 32)
        assert all(f["meta_info"]["cached_tokens"] == f["meta_info"]["prompt_tokens"] - 1
                   for f in fan)
        other = send([prefixes[0]], [blue], 8)  # another image: only the text before it
        assert other[0]["meta_info"]["cached_tokens"] == len(
            tokenize("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"))
        # A continuation of prompt + output hits almost entirely.
        cont = prefixes[1] + fan[1]["text"] + " more"
        send([cont], [red], 4)
        # After a flush nothing is cached; chat on the same model shares the same cache.
        srv.flush_cache()
        ref.seqs.clear()
        send(["S\n<image>Question: why?"], [red], 0)
        r = c.post("/v1/chat/completions", json={"model": "intern-a", "max_tokens": 8,
                                                 "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": red}},
                                         {"type": "text", "text": "Question: why? More."}]}]})
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(
            tokenize("S\n<image>Question: why?", [red]))
        s = srv.counts()
        assert s["cached_tokens"] == sum(e.cached_tokens for e in srv.log) > 0


def test_chatml_generate_equals_in_process_intern(tmp_path):
    """A client rendering Qwen ChatML to /generate gets the in-process simulated reply."""
    q = make_questions(1)[0]
    prompt = intern_prompt(q, "### Step 1: Look. This points toward: Pneumothorax.")
    img = _png("green")
    cfg = ModelConfig(name="i", backend="simulated", model="intern-a", options={"skill": 0.9})
    sim = SimulatedModel(cfg, "intern")
    user = "".join(p.text if isinstance(p, Text) else "<image>" for p in prompt.parts)
    chatml = (f"<|im_start|>system\n{prompt.system}<|im_end|>\n<|im_start|>user\n"
              f"<|vision_start|><|image_pad|><|vision_end|>{user}<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert sim_text_from_generate(chatml) == f"{prompt.system}\n<image>{user}"
    temps = (1.2, 0.2)
    with LoopbackServer(models={"intern-a": {"role": "intern", "skill": 0.9}}) as srv:
        out = httpx.post(f"{srv.url}/generate", json={
            "text": [chatml] * 2, "image_data": [[img]] * 2,
            "sampling_params": [{"temperature": t, "max_new_tokens": 512} for t in temps]}).json()
    # The in-process prompt with the image in front renders to the same simulator text.
    with_image = type(prompt)(prompt.system, (_fake_image(tmp_path), *prompt.parts))
    assert render_text(with_image) == f"{prompt.system}\n<image>{user}"
    calls = [Call(with_image, Sampling(temperature=t, max_tokens=512)) for t in temps]
    want = anyio.run(sim.rollout, calls)
    assert [o["text"] for o in out] == [w.text for w in want]


def _fake_image(tmp_path: Path) -> Image:
    from mics.types import ImageRef

    p = tmp_path / "g.png"
    PILImage.new("RGB", (4, 4), "green").save(p)
    return Image(ImageRef(str(p), "0" * 64, "image/png", 4, 4))


def test_faults_are_seeded_by_request_and_changeable_at_runtime():
    def run(seed: int) -> list[str | None]:
        faults = Faults(rate=0.5, kinds=("429", "500", "503", "malformed", "400"))
        with LoopbackServer(models=MODELS, faults=faults, seed=seed) as srv, \
                httpx.Client(base_url=srv.url) as c:
            for k in range(30):
                c.post("/generate", json={"text": f"prompt {k % 10}",
                                          "sampling_params": {"max_new_tokens": 4}})
            return [e.fault for e in srv.log]

    a, b, c_ = run(1), run(1), run(2)
    assert a == b and a != c_
    assert 5 < sum(f is not None for f in a) < 25
    assert {f for f in a if f} <= {"429", "500", "503", "malformed", "400"}

    with LoopbackServer(models=MODELS, faults={"rate": 1.0, "kinds": ["429"],
                                               "retry_after_s": 0.07}) as srv, \
            httpx.Client(base_url=srv.url) as c:
        r = c.post("/generate", json={"text": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "0.07"
        srv.set_faults(rate=0.0)
        assert c.post("/generate", json={"text": "x"}).status_code == 200
        srv.set_faults(forced={"intern-a": "503"})
        assert c.post("/generate", json={"text": "x"}).status_code == 503
        ok = c.post("/v1/chat/completions", json={"model": "judge-a", "messages": [
            {"role": "user", "content": "Model answer: Flu\n\nCorrect answer: flu"}]})
        assert ok.json()["choices"][0]["message"]["content"] == "Yes"
        srv.set_faults(Faults(forced={"judge-a": "401"}))
        r = c.post("/v1/chat/completions", json={"model": "judge-a", "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json() == {"error": {"message": "invalid api key"}}
        srv.set_faults(forced={"intern-a": "malformed"})
        r = c.post("/generate", json={"text": "x"})
        assert r.status_code == 200
        with pytest.raises(ValueError):
            r.json()
        srv.set_faults(forced={"intern-a": "drop"})
        with pytest.raises(httpx.RemoteProtocolError):
            c.post("/generate", json={"text": "x"})
        assert [e.status for e in srv.log][-1] == 0
        with pytest.raises(ValueError, match="unknown fault kind"):
            srv.set_faults(kinds=("418",))


def test_slow_fault_and_latency():
    with LoopbackServer(models=MODELS, faults=Faults(forced={"intern-a": "slow"}, slow_s=0.5),
                        latency={"judge": 2.0}) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/generate", json={"text": "x"}, timeout=0.1)
        with pytest.raises(httpx.ReadTimeout):  # the judge's reply waits its latency
            httpx.post(f"{srv.url}/v1/chat/completions", json={
                "model": "judge-a", "messages": [{"role": "user", "content": "x"}]},
                timeout=0.5)


def test_api_key_is_checked_when_configured():
    with LoopbackServer(models=MODELS, api_key="k-123") as srv, \
            httpx.Client(base_url=srv.url) as c:
        body = {"model": "judge-a", "messages": [{"role": "user", "content": "x"}]}
        assert c.post("/v1/chat/completions", json=body).status_code == 401
        r = c.post("/v1/chat/completions", json=body,
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k-123"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200


def test_request_log_entries_and_counts():
    with LoopbackServer(models=MODELS) as srv, httpx.Client(base_url=srv.url) as c:
        c.post("/generate", json={"text": ["a b", "a c"], "sampling_params": [
            {"temperature": 0.1, "max_new_tokens": 3}, {"temperature": 0.9,
                                                        "max_new_tokens": 3}]})
        c.post("/v1/chat/completions", headers={"X-Mics-Sample": "2"}, json={
            "model": "mentor-a", "messages": [{"role": "user", "content": "hi"}]})
        log = srv.log
        assert [(e.path, e.model, e.role, e.status, e.ok) for e in log] == [
            ("/generate", "intern-a", "intern", 200, True),
            ("/generate", "intern-a", "intern", 200, True),
            ("/v1/chat/completions", "mentor-a", "mentor", 200, True)]
        assert [e.temperature for e in log] == [0.1, 0.9, 1.0]
        assert log[0].batch_size == 2 and log[2].sample_index == 2
        assert len({e.key for e in log}) == 3 and all(len(e.key) == 64 for e in log)
        counts = srv.counts()
        assert counts["items"] == 3 and counts["ok"] == 3
        assert counts["by_model"] == {"intern-a": 2, "mentor-a": 1}
        srv.clear_log()
        assert srv.log == []


def test_concurrent_clients_and_clean_stop():
    srv = LoopbackServer(models=MODELS).start()
    errors: list[Exception] = []
    client = httpx.Client(base_url=srv.url, limits=httpx.Limits(max_connections=32))

    def worker(k: int) -> None:
        try:
            for j in range(10):
                r = client.post("/generate", json={"text": f"shared root {j}",
                                                   "sampling_params": {"max_new_tokens": 2}})
                assert r.status_code == 200
        except Exception as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.get("/health")  # idle keep-alive connections stay open
    srv.stop()  # closes them too: the next request finds nothing listening
    with pytest.raises(httpx.TransportError):
        client.get("/health")
    client.close()
    assert not errors and len(srv.log) == 320


def test_models_from_config_and_validation():
    models = models_from_config(ROOT / "examples" / "simulated.toml")
    assert models["sim-mentor-c"] == {"role": "mentor", "quality": 0.35, "malformed_rate": 0.1}
    assert models["sim-intern-1"]["role"] == "intern" and models["sim-judge"]["role"] == "judge"
    with pytest.raises(ValueError, match="role"):
        LoopbackServer(models={"x": "teacher"})
    with pytest.raises(ValueError, match="unknown option"):
        LoopbackServer(models={"x": {"role": "intern", "quality": 1}})
    with pytest.raises(ValueError, match="rate"):
        Faults(rate=2.0)
