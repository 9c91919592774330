"""The one implementation of each concern the backends share: call keys, chat messages, stop
clipping, typed options (issue 12)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.base import Call
from backends.keys import call_key
from backends.local_prefix import PrefixLRU, PrefixMatch
from backends.messages import chat_messages, image_slot
from backends.openai_chat import OpenAIChat, OpenAIOptions
from backends.sglang import SGLangOptions, SGLangRollout
from backends.stops import clip_at_stop
from mics.config import ConfigError, ModelConfig, SearchConfig, parse_config, parse_on_all_zero
from mics.types import Image, ImageRef, Prompt, Sampling, Text

IMG = ImageRef(path="x.png", sha256="ab" * 32, mime="image/png", width=4, height=4)
PROMPT = Prompt("sys", (Text("Look: "), Image(IMG), Text("what is it?")))
CALL = Call(PROMPT, Sampling(temperature=0.7, max_tokens=32, stop=("\n\n",)), sample_index=2)


def _sha(material: dict) -> str:
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def test_call_key_keeps_the_bytes_of_both_former_copies() -> None:
    identity = {"backend": "openai", "model": "m"}
    prompt = CALL.prompt.key_material()
    assert call_key(identity, CALL) == _sha({"model": identity, "prompt": prompt,
                                             "sampling": CALL.sampling.to_dict(), "sample": 2})
    # the local backend's call hash (its sampling seeds): no model, sampling via asdict
    assert call_key(None, CALL) == _sha({"prompt": prompt, "sampling": asdict(CALL.sampling),
                                         "sample": 2})
    assert call_key(None, CALL) != call_key({}, CALL)


@settings(max_examples=200, deadline=None)
@given(system=st.text(max_size=20), texts=st.lists(st.text(max_size=30), max_size=4),
       temp=st.floats(0, 2), top_k=st.integers(-1, 100), index=st.integers(0, 9),
       stop=st.lists(st.text(max_size=4), max_size=2),
       identity=st.none() | st.dictionaries(st.text(max_size=8),
                                            st.integers(-2**63, 2**63 - 1) | st.text(max_size=8),
                                            max_size=4))
def test_call_key_equals_the_plain_sorted_json_hash(system, texts, temp, top_k, index, stop,
                                                     identity) -> None:
    """The key assembled from cached parts is the hash of the whole material, sorted."""
    parts = tuple(Text(t) for t in texts) + (Image(IMG),)
    call = Call(Prompt(system, parts), Sampling(temperature=temp, top_k=top_k,
                                                stop=tuple(stop)), sample_index=index)
    material = {"prompt": call.prompt.key_material(), "sampling": call.sampling.to_dict(),
                "sample": index}
    if identity is not None:
        material["model"] = identity
    assert call_key(identity, call) == _sha(material)
    other = Call(call.prompt, Sampling(temperature=temp / 2 + 0.1), sample_index=index + 1)
    material.update(sampling=other.sampling.to_dict(), sample=index + 1)
    assert call_key(identity, other) == _sha(material)  # the same prompt's cached head


def _material(identity: dict | None, call: Call) -> dict:
    material = {"prompt": call.prompt.key_material(), "sampling": call.sampling.to_dict(),
                "sample": call.sample_index}
    return material if identity is None else {**material, "model": identity}


def test_a_call_hashed_again_gets_its_kept_key_for_an_equal_identity_only() -> None:
    """Issue 15: the gate hashes a call, then an SGLang intern hashes the same call object for
    its sampling seed; the second is the kept key, and a different identity is hashed afresh."""
    call = Call(PROMPT, Sampling(temperature=0.7, max_tokens=32, stop=("\n\n",)), 2)
    model = SGLangRollout(ModelConfig(name="i", backend="sglang", model="m",
                                      base_url="http://127.0.0.1:9"))
    first = call_key(model.identity(), call)  # as the gate does
    assert first == _sha(_material(model.identity(), call))
    assert call_key(model.identity(), call) is first  # an equal identity (another dict): kept
    assert model.seed(call) == int(first[:8], 16) & 0x7FFF_FFFF
    other = {"backend": "sglang", "model": "n"}
    for identity in (other, None, model.identity(), None, {}, other):
        assert call_key(identity, call) == _sha(_material(identity, call))
    fresh = Call(call.prompt, call.sampling, 2)  # equal, not the same object: hashed afresh
    assert call_key(model.identity(), fresh) == first and model.seed(fresh) == model.seed(call)


def test_calls_that_are_equal_but_serialize_apart_never_share_a_key() -> None:
    """0.0 == -0.0, 1 == 1.0 == True: equal values (equal hashes) whose JSON differs."""
    calls = [Call(PROMPT, Sampling(temperature=t, top_k=k), sample_index=i)
             for t in (0.0, -0.0, 1, 1.0) for k in (1, True) for i in (0, 1, True)]
    identity = {"backend": "openai", "model": "m"}
    for _ in range(2):  # a second round hashes each call object again
        keys = [call_key(identity, c) for c in calls]
        assert keys == [_sha(_material(identity, c)) for c in calls]
        assert len(set(keys)) == len(calls)
    again = [Call(c.prompt, c.sampling, c.sample_index) for c in calls]  # equal objects
    assert [call_key(identity, c) for c in reversed(again)] == keys[::-1]


@pytest.mark.parametrize(("text", "stop", "want"), [
    ("a\n\nb", ("\n\n",), ("a", "\n\n")),
    ("abc", ("x",), ("abc", None)),
    ("abc", ("",), ("abc", None)),
    ("a.b!c", (".", "!"), ("a", ".")),
    ("xyz", ("yz", "y"), ("x", "y")),  # same place: the smaller stop string
    ("a|b", "|", ("a", "|")),
    ("ab", None, ("ab", None)),
])
def test_clip_at_stop(text: str, stop: object, want: tuple[str, str | None]) -> None:
    assert clip_at_stop(text, stop) == want  # type: ignore[arg-type]


def test_chat_messages_for_each_backend_shape() -> None:
    user_parts = [{"type": "text", "text": "Look: "}, {"type": "image"},
                  {"type": "text", "text": "what is it?"}]
    assert chat_messages(PROMPT, image_slot) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": user_parts}]
    assert chat_messages(PROMPT, as_text=True)[1]["content"] == "Look: what is it?"
    marked = chat_messages(PROMPT, lambda _: {"type": "text", "text": "<image>\n"}, as_text=True)
    assert marked[1]["content"] == "Look: <image>\nwhat is it?"
    no_system = chat_messages(Prompt("", (Text("q"),)), as_text=True, empty_system=False)
    assert no_system == [{"role": "user", "content": "q"}]
    assert chat_messages(Prompt("", (Text("q"),)))[0] == {"role": "system", "content": ""}


def test_prefix_match_is_typed_and_still_a_pair() -> None:
    torch = pytest.importorskip("torch")
    lru = PrefixLRU(4)
    t = torch.zeros(1, 1, 3, 2)
    lru.put((1, 2, 3), [(t, t)])
    hit = lru.match((1, 2, 9))
    assert isinstance(hit, PrefixMatch) and hit.length == 2 and hit.kv is not None
    assert hit.kv[0][0].shape[2] == 2
    assert lru.match((7,)) == PrefixMatch(0, None) == (0, None)


def test_backend_options_are_checked_like_the_config() -> None:
    base = ModelConfig(name="m1", backend="openai", model="x", base_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"model 'm1': options\.send_seed: expected bool"):
        OpenAIOptions.parse(ModelConfig(**{**asdict(base), "options": {"send_seed": "yes"}}))
    with pytest.raises(ConfigError, match=r"model 'm1': unknown openai option\(s\) colour"):
        OpenAIOptions.parse(ModelConfig(**{**asdict(base), "options": {"colour": 1}}))
    opts = OpenAIChat(ModelConfig(**{**asdict(base), "options": {"max_tokens": 64}})).options
    assert opts.max_tokens == 64 and opts.image_max_side == 512
    with pytest.raises(AttributeError):
        opts.max_tokens = 1  # type: ignore[misc]  # frozen
    sg = ModelConfig(name="s", backend="sglang", model="x", base_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"options\.warmup: expected bool"):
        SGLangOptions.parse(ModelConfig(**{**asdict(sg), "options": {"warmup": 1}}))
    with pytest.raises(ConfigError, match="options.urls must be a list"):
        SGLangOptions.parse(ModelConfig(**{**asdict(sg), "options": {"urls": "http://a"}}))
    assert SGLangOptions.parse(sg)["family"] == "qwen2-vl"


def test_on_all_zero_is_parsed_in_one_place() -> None:
    assert parse_on_all_zero("fail") == 0 and parse_on_all_zero("restart:3") == 3
    assert SearchConfig(on_all_zero="restart:2").restarts == 2
    for bad in ("restart:0", "restart", "again:2", "restart:x"):
        with pytest.raises(ConfigError, match=r"\[search\]\.on_all_zero"):
            parse_on_all_zero(bad)
    table = {"search": {"on_all_zero": "restart:-1"},
             "mentors": [{"name": "a", "backend": "simulated", "model": "a"}],
             "interns": [{"name": "b", "backend": "simulated", "model": "b"}],
             "judge": {"name": "j", "backend": "simulated", "model": "j"}}
    with pytest.raises(ConfigError, match="on_all_zero"):
        parse_config(table)


def test_family_messages_are_the_one_source_of_an_images_text() -> None:
    """The sglang backend's messages per family, and the Jinja-free compiled template, which
    renders the same user content (an InternVL image is written in one place)."""
    from backends.chat_templates import Compiled
    from backends.messages import family_messages

    assert family_messages(PROMPT, "internvl")[1]["content"] == "Look: <image>\nwhat is it?"
    asked = family_messages(PROMPT, "internvl", lambda: "<IMG_CONTEXT>\n")[1]["content"]
    assert asked == "Look: <IMG_CONTEXT>\nwhat is it?"
    assert family_messages(PROMPT, "text")[1]["content"] == "Look: what is it?"
    assert family_messages(PROMPT, "qwen2-vl")[1]["content"] == [
        {"type": "text", "text": "Look: "}, {"type": "image"},
        {"type": "text", "text": "what is it?"}]
    internvl = Compiled("internvl", "<h>", "<m>", "<t>")
    assert internvl.render(PROMPT) == "<h>sys<m>Look: <image>\nwhat is it?<t>"
    assert internvl.content(PROMPT, lambda: "<IMG_CONTEXT>\n") == asked
    qwen = Compiled("qwen2-vl", "", "|", "", image="<|vision_start|><|image_pad|><|vision_end|>")
    assert qwen.content(PROMPT) == "Look: <|vision_start|><|image_pad|><|vision_end|>what is it?"
    assert Compiled("text", "", "", "").content(PROMPT) == "Look: what is it?"


def test_a_reply_that_is_not_json_is_one_transient_error() -> None:
    """The sglang server, its info routes and the router read JSON through one helper."""
    import httpx

    from backends.base import TransientError
    from backends.http import json_body

    assert json_body(httpx.Response(200, json={"text": "a"}), "i0 at u", "/generate") == {
        "text": "a"}
    with pytest.raises(TransientError, match=r"^i0 at http://h:1: malformed JSON from /generate$"):
        json_body(httpx.Response(200, content=b"<html>"), "i0 at http://h:1", "/generate")
