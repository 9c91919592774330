"""The simulated backend's options are a typed, frozen dataclass per role, checked like the
config, while its memo identity (and so every memo key of a stored run) stays byte for byte
what it was when the options were a dict (issue 12)."""

from __future__ import annotations

import orjson
import pytest

from backends import simulator
from backends.base import Call
from backends.keys import call_key
from backends.registry import build_chat, build_rollout
from backends.simulated import SimulatedModel
from backends.simulator import InternOptions, JudgeOptions, MentorOptions
from mics.config import ConfigError, ModelConfig
from mics.types import Prompt, Sampling, Text

CALL = Call(Prompt("sys", (Text("hello"),)), Sampling(temperature=0.7), 1)

# (role, options as the user wrote them) -> the identity and memo key computed by the code
# before the options were typed (commit 3a7ddc0, options still a dict). Integers stay integers.
PINNED = [
    ("mentor", {},
     '{"backend":"simulated","model":"sim-mentor","options":{"malformed_rate":0.0,'
     '"quality":0.5,"seed":0},"role":"mentor"}',
     "0c3488d09a4b846f8e41c9982aa722d2bf89e600c2197eda8369670aa62aba57"),
    ("intern", {},
     '{"backend":"simulated","model":"sim-intern","options":{"seed":0,"skill":0.8},'
     '"role":"intern"}',
     "d8d661a5516143d206e8e10af4da473ee21c14e8aea61a9c8f61a875a68b4dc0"),
    ("judge", {},
     '{"backend":"simulated","model":"sim-judge","options":{"seed":0},"role":"judge"}',
     "0ffe00664120b5cd3da247bae807612ca28d92a2fad8d1b7b7bdafc2ecbbb7e4"),
    ("mentor", {"quality": 1, "malformed_rate": 0, "leak_rate": 0.25, "seed": 3, "latency_s": 2},
     '{"backend":"simulated","model":"sim-mentor","options":{"leak_rate":0.25,'
     '"malformed_rate":0,"quality":1,"seed":3},"role":"mentor"}',
     "f12c3919dcdbac44cae77b32d2adaee9b503196451153ac350c71203b9ffc12b"),
    ("intern", {"skill": 1, "seed": 7},
     '{"backend":"simulated","model":"sim-intern","options":{"seed":7,"skill":1},'
     '"role":"intern"}',
     "747f39977c7c0eb7af6505a7f9fbbd401e5a81ff461af77ba53431f86f80ab63"),
    ("judge", {"seed": 2, "latency_s": 0.5},
     '{"backend":"simulated","model":"sim-judge","options":{"seed":2},"role":"judge"}',
     "57c34822c007b0eaf67fde0dc6e4c2645e1b949382a21a520387e88037098691"),
]


def _model(role: str, options: dict, name: str = "x") -> SimulatedModel:
    return SimulatedModel(ModelConfig(name=name, backend="simulated", model=f"sim-{role}",
                                      options=options), role)


@pytest.mark.parametrize(("role", "options", "identity", "key"), PINNED)
def test_identity_and_memo_key_are_pinned(role: str, options: dict, identity: str,
                                          key: str) -> None:
    model = _model(role, options)
    assert orjson.dumps(model.identity(), option=orjson.OPT_SORT_KEYS).decode() == identity
    assert call_key(model.identity(), CALL) == key


def test_options_are_typed_frozen_dataclasses_per_role() -> None:
    mentor = _model("mentor", {"quality": 1, "leak_rate": 0, "latency_s": 2})
    assert mentor.options == MentorOptions(quality=1.0, leak_rate=0.0, latency_s=2.0)
    assert isinstance(mentor.options.quality, float) and isinstance(mentor.options.leak_rate,
                                                                    float)
    with pytest.raises(AttributeError):
        mentor.options.quality = 0.1  # type: ignore[misc]  # frozen
    assert _model("intern", {}).options == InternOptions()
    assert _model("judge", {"seed": 4}).options == JudgeOptions(seed=4)
    # the role table the loopback server reads is derived from these classes, unchanged
    assert simulator.ROLE_OPTIONS == {
        "mentor": {"quality": 0.5, "malformed_rate": 0.0, "leak_rate": None},
        "intern": {"skill": 0.8}, "judge": {"unparsable_rate": None}}


@pytest.mark.parametrize(("role", "options", "message"), [
    ("mentor", {"quality": "high"}, r"model 'x': options\.quality: expected float, got str"),
    ("mentor", {"leak_rate": "some"}, r"model 'x': options\.leak_rate: expected float"),
    ("mentor", {"leak_rate": True}, r"model 'x': options\.leak_rate: expected float"),
    ("intern", {"seed": 1.5}, r"model 'x': options\.seed: expected int, got float"),
    ("intern", {"quality": 0.5}, r"unknown simulated intern option\(s\) quality; allowed: "
                                 r"latency_s, seed, skill"),
    ("judge", {"latency_s": -1}, r"options\.latency_s must be >= 0"),
])
def test_bad_options_are_config_errors_naming_model_and_key(role: str, options: dict,
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _model(role, options)


def test_registry_reports_bad_simulated_options_as_config_errors() -> None:
    bad = ModelConfig(name="m9", backend="simulated", model="m", options={"skill": "x"})
    with pytest.raises(ConfigError, match=r"model 'm9': options\.skill"):
        build_rollout(bad)
    with pytest.raises(ConfigError, match=r"model 'm9': unknown simulated judge option"):
        build_chat(bad, "judge")
