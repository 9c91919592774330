"""Config validation: every mistake is named before any model call."""

from __future__ import annotations

import tomllib

import pytest
from helpers import ROOT, sim_config

from backends.registry import build_chat, build_rollout
from mics.config import ConfigError, config_changes, load_config, parse_config


def test_defaults_follow_the_reference_and_fix_its_bugs():
    cfg = parse_config(sim_config())
    assert cfg.search.max_depth == 3 and cfg.search.root_steps == 2
    assert cfg.search.intern_samples == (1.2, 0.2)
    assert cfg.search.judge_temperature == 0.0  # B11
    assert cfg.search.on_all_zero == "fail" and cfg.search.restarts == 0
    assert cfg.search.reuse_cached_step is True


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda d: d["search"].update(max_depht=3), "max_depht"),
    (lambda d: d["search"].update(max_depth="3"), "[search].max_depth"),
    (lambda d: d["search"].update(max_depth=0), "max_depth"),
    (lambda d: d["search"].update(root_steps=3), "root_steps"),
    (lambda d: d["search"].update(intern_samples=[]), "intern_samples"),
    (lambda d: d["search"].update(intern_samples=1.2), "[search].intern_samples: expected a "
                                                       "list of numbers, got float 1.2"),
    (lambda d: d["search"].update(on_all_zero="retry"), "on_all_zero"),
    (lambda d: d["search"].update(on_all_zero="restart:x"), "on_all_zero"),
    (lambda d: d.update(extra={}), "extra"),
    (lambda d: d.pop("judge"), "[judge] missing"),
    (lambda d: d.update(mentors=[]), "[[mentors]] missing"),
    (lambda d: d["mentors"][1].pop("model"), "[[mentors]] #2.model"),
    (lambda d: d["interns"][0].update(tempreature=1), "tempreature"),
    (lambda d: d["interns"][0].update(max_concurrency=0), "max_concurrency"),
    (lambda d: d["interns"][1].update(name="i0"), "duplicate name"),
    # sampling a server refuses (SGLang: top_k -1 or >= 1) fails here, not on every call
    (lambda d: d["search"].update(intern_top_k=0), "[search].intern_top_k: must be -1"),
    (lambda d: d["search"].update(intern_top_p=0.0), "[search].intern_top_p: must be in (0, 1]"),
    (lambda d: d["search"].update(mentor_top_p=1.5), "[search].mentor_top_p"),
    (lambda d: d["search"].update(intern_samples=[1.2, -0.1]), "[search].intern_samples: a "
                                                                "temperature must be >= 0"),
    (lambda d: d["search"].update(judge_temperature=-1.0), "[search].judge_temperature"),
    (lambda d: d["search"].update(intern_max_tokens=0), "[search].intern_max_tokens"),
    # an endpoint URL that could never be reached fails here, not as an outage at run time
    (lambda d: d["mentors"][0].update(base_url="not a url"), "[[mentors]] #1.base_url: 'not a "
                                                             "url' is not an endpoint URL"),
    (lambda d: d["judge"].update(base_url="127.0.0.1:8000/v1"), "must start with http://"),
    (lambda d: d["interns"][0].update(base_url="http://"), "[[interns]] #1.base_url: 'http://'"
                                                           " is not an endpoint URL: it names "
                                                           "no host"),
    (lambda d: d["mentors"][1].update(base_url="http://127.0.0.1:99999/v1"), "out of range"),
])
def test_errors_name_the_key(mutate, needle):
    data = sim_config()
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert needle in str(e.value)


def test_endpoint_urls_that_are_accepted():
    data = sim_config()
    for i, url in enumerate(["http://127.0.0.1:30000", "https://api.openai.com/v1",
                             "http://[::1]:8000/v1"]):
        data["mentors"][i % 2]["base_url"] = url
        assert parse_config(data).mentors[i % 2].base_url == url


def test_sglang_server_urls_are_checked():
    data = sim_config()
    data["interns"][0].update(backend="sglang", base_url="http://127.0.0.1:30000",
                              options={"urls": ["http://127.0.0.1:30001", "localhost:30002"]})
    with pytest.raises(ConfigError, match=r"options.urls\[1\]: 'localhost:30002' is not an "
                                          "endpoint URL"):
        build_rollout(parse_config(data).interns[0])


def test_restart_mode():
    assert parse_config(sim_config(on_all_zero="restart:3")).search.restarts == 3


def test_unknown_backend_and_options_are_config_errors():
    data = sim_config()
    data["mentors"][0]["backend"] = "gpt"  # backends come from config, never from names
    cfg = parse_config(data)
    with pytest.raises(ConfigError, match="backend 'gpt'"):
        build_chat(cfg.mentors[0], "mentor")
    data = sim_config()
    data["interns"][0]["options"] = {"skil": 1}
    with pytest.raises(ConfigError, match="skil"):
        build_rollout(parse_config(data).interns[0])


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[search\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["simulated.toml", "paper.toml", "local.toml"])
def test_examples_parse(name):
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.mentors and cfg.interns and cfg.judge
    for m in (*cfg.mentors, *cfg.interns, cfg.judge):
        assert "key" not in str(m.options).lower() or m.api_key_env


def test_bundled_demo_config_is_the_example():
    bundled = (ROOT / "mics" / "resources" / "simulated.toml").read_text()
    assert bundled == (ROOT / "examples" / "simulated.toml").read_text()
    assert tomllib.loads(bundled)


def test_round_trip_through_dict():
    cfg = parse_config(sim_config(on_all_zero="restart:2"))
    assert parse_config(cfg.to_dict()) == cfg


def test_sglang_interns_wait_long_for_a_batch_unless_told_otherwise():
    """A batched /generate answers only when its last prompt is done (and a client that gives
    up aborts the batch on the server): an SGLang model without `timeout_s` waits 600 s; one
    that sets it keeps its own; other backends keep 120 s."""
    data = sim_config()
    sglang = {"backend": "sglang", "base_url": "http://127.0.0.1:30000",
              "options": {"tokenizer": "/models/x"}}
    data["interns"][0].update(sglang)
    data["interns"][1].update(sglang, timeout_s=45)
    data["mentors"][0].update(backend="openai", base_url="http://127.0.0.1:1/v1", options={})
    cfg = parse_config(data)
    assert [m.timeout_s for m in cfg.interns] == [600.0, 45.0, 120.0]
    assert cfg.mentors[0].timeout_s == 120.0
    assert parse_config(cfg.to_dict()).interns[1].timeout_s == 45.0  # stored runs keep theirs


def test_two_models_that_are_one_to_the_memo_are_refused_before_a_run():
    """Two interns (or mentors) with the same backend, model and reply options have the same
    memo keys: the second would be answered with the first's replies and every sample counted
    twice. A new run refuses them, naming both."""
    from mics.run import build_models

    data = sim_config()
    data["interns"][1].update(model="i0", options={"skill": 0.95})  # i0's model and options
    models = build_models(parse_config(data))
    with pytest.raises(ConfigError, match=r"\[\[interns\]\] 'i0' and 'i1' are the same model"):
        models.preflight()
    data["interns"][1]["options"] = {"skill": 0.9}  # another reply option: another model
    build_models(parse_config(data)).preflight()
    data = sim_config()
    data["mentors"][2].update(model="m0", options={"quality": 0.6})
    with pytest.raises(ConfigError, match=r"\[\[mentors\]\] 'm0' and 'm2'"):
        build_models(parse_config(data)).preflight()


def test_checks_for_new_runs_never_block_reading_a_stored_run():
    """A run stored before a new-run check (a top_k a server refuses, a prompt that asks for no
    final-answer line) is still read, so it can be exported, inspected and resumed."""
    from mics.config import RunConfig

    data = sim_config()
    data["search"]["intern_top_k"] = 0
    data["prompts"] = {"intern": "Q: {question}\n{prefix}"}
    with pytest.raises(ConfigError):
        parse_config(data)
    stored = RunConfig.from_dict(data)
    assert stored.search.intern_top_k == 0 and stored.prompts.intern.startswith("Q: ")


def test_config_changes_tell_endpoint_settings_from_what_shapes_a_reply():
    old = parse_config(sim_config())
    data = sim_config()
    data["mentors"][0].update(base_url="http://127.0.0.1:9/v1", max_concurrency=3,
                              api_key_env="OTHER_KEY", timeout_s=9.0)
    data["interns"][0]["options"] = {**data["interns"][0].get("options", {}), "urls": []}
    data["search"]["concurrency"] = 2
    endpoint, other = config_changes(old, parse_config(data))
    assert other == []
    assert {p.rsplit(".", 1)[-1] for p in endpoint} == {
        "base_url", "max_concurrency", "api_key_env", "timeout_s", "urls", "concurrency"}
    data["mentors"][0]["model"] = "another"
    data["search"]["max_depth"] = 4
    data["interns"][1]["options"] = {**data["interns"][1].get("options", {}), "x": 1}
    _endpoint, other = config_changes(old, parse_config(data))
    assert other == ["[search].max_depth", "[[mentors]] #1 (m0).model",
                     "[[interns]] #2 (i1).options.x"]
