"""Prompt templates in the config: the default pack renders today's prompts byte for byte, the
math pack loads, and every bad template is refused at load with the table and key named."""

from __future__ import annotations

import hashlib
import json
import tomllib

import pytest
from helpers import ROOT, sim_config

from mics.config import ConfigError, RunConfig, load_config, parse_config
from mics.prompts import (
    INTERN_INSTRUCTION,
    MEDICAL,
    MENTOR_TEMPLATE,
    intern_prompt,
    judge_prompt,
    mentor_prompt,
    pack_templates,
)
from mics.templates import TEMPLATE_KEYS, TemplateError, check_template
from mics.types import ImageRef, Question, Text

IMG = ImageRef("/x/a.png", "ab" * 32, "image/png", 10, 10)
QUESTIONS = [  # braces in values must come out verbatim, never be read as placeholders
    Question("q1", 0, "What is {answer} in {0}?", "Pneumothorax {x}", (IMG, IMG), ("a", "b"),
             "Chief complaint: {case_info}\nAge: 3"),
    Question("q2", 1, "Plain?", "Yes", (), (), "None"),
]
PREFIXES = ["", "Let's think.\n### Step 1: {prefix} look", "### Step 1: a\n\n### Step 2: b"]
# sha256 of these prompts rendered by mics/prompts.py before templates existed (commit 52aeb5f)
PRE_TEMPLATE_DIGEST = "9040f1efb03b548de8420404dd1cacf3ef2a36947751e097e98d0cc117b0717a"


def rendered(templates=None) -> str:
    extra = () if templates is None else (templates,)
    out = []
    for q in QUESTIONS:
        for p in PREFIXES:
            out += [mentor_prompt(q, p, *extra).key_material(),
                    intern_prompt(q, p, *extra).key_material(),
                    judge_prompt(q, p or "ans", *extra).key_material()]
    return json.dumps(out, sort_keys=True)


def with_prompts(**prompts) -> dict:
    return {**sim_config(), "prompts": prompts}


def test_default_pack_renders_the_pre_template_prompts_byte_for_byte():
    assert hashlib.sha256(rendered().encode()).hexdigest() == PRE_TEMPLATE_DIGEST
    cfg = parse_config(sim_config())
    assert cfg.prompts == MEDICAL and cfg.prompts.pack == "medical"
    assert rendered(cfg.prompts) == rendered()
    q = QUESTIONS[1]
    assert intern_prompt(q, "P").parts == (Text(f"Question: {q.question}{INTERN_INSTRUCTION}"),
                                           Text("P"))
    assert mentor_prompt(q, "P").user_text() == MENTOR_TEMPLATE.format(
        case_info=q.case_info, question=q.question, answer=q.gt_answer, prefix="P")


def test_math_pack_renders_its_own_prompts_and_keeps_interns_blind():
    cfg = parse_config(with_prompts(pack="math"))
    assert cfg.prompts == pack_templates("math") and cfg.prompts.pack == "math"
    assert rendered(cfg.prompts) != rendered()
    q = Question("c1", 0, "How many?", "7", (IMG,), ("c.png",), "Bars are 2 units apart.")
    mentor = mentor_prompt(q, "### Step 1: x", cfg.prompts)
    assert "Additional information:\nBars are 2 units apart." in mentor.user_text()
    assert "Correct answer: 7" in mentor.user_text() and "chart" in mentor.system
    intern = intern_prompt(q, "### Step 1: x", cfg.prompts)
    assert intern.parts[-1] == Text("### Step 1: x")  # the prefix stays last
    assert "Bars are" not in intern.user_text() and "7" not in intern.user_text()
    assert "Model answer: 8" in judge_prompt(q, "8", cfg.prompts).user_text()


def test_a_single_override_keeps_the_rest_of_the_pack():
    judge = "Q: {question}\nModel answer: {model_answer}\nCorrect answer: {answer}\nYes or No?"
    cfg = parse_config(with_prompts(pack="math", judge=judge))
    math = pack_templates("math")
    assert cfg.prompts.judge == judge
    assert all(getattr(cfg.prompts, k) == getattr(math, k) for k in TEMPLATE_KEYS if k != "judge")


def test_templates_are_stored_in_full_and_round_trip():
    cfg = parse_config(with_prompts(pack="math", intern_system="Be {{brief}}."))
    stored = cfg.to_dict()
    assert stored["prompts"]["intern"] == pack_templates("math").intern
    assert RunConfig.from_dict(stored) == cfg
    assert cfg.prompts.system("intern") == "Be {brief}."  # doubled braces are literal
    assert parse_config(with_prompts(judge_system="")).prompts.system("judge") == ""
    legacy = {k: v for k, v in parse_config(sim_config()).to_dict().items()
              if k not in ("prompts", "dataset")}  # a run stored before templates existed
    assert RunConfig.from_dict(legacy).prompts == MEDICAL


@pytest.mark.parametrize(("prompts", "key", "words"), [
    ({"mentor": MENTOR_TEMPLATE + "{hint}"}, "mentor", ["unknown placeholder", "{hint}"]),
    ({"mentor": "{question} {prefix}"}, "mentor", ["missing placeholder", "{answer}"]),
    ({"judge": "{model_answer} is it?"}, "judge", ["missing", "{answer}"]),
    ({"judge": "{model_answer} {answer} {prefix}"}, "judge", ["{prefix}", "B9"]),
    ({"intern": "{question} {answer} {prefix}"}, "intern", ["{answer}", "B10"]),
    ({"intern": "{question} {context} {prefix}"}, "intern", ["{context}", "B10"]),
    ({"intern": "{prefix} then {question}"}, "intern", ["very end"]),
    ({"intern": "{question} {prefix}{prefix}"}, "intern", ["once"]),
    ({"intern": "{question}\n{prefix}\n"}, "intern", ["very end"]),
    ({"intern": "{question} {{prefix}}"}, "intern", ["missing", "{prefix}"]),
    ({"mentor_system": "You are {role}."}, "mentor_system", ["unknown placeholder", "none"]),
    ({"judge": "{model_answer} {answer"}, "judge", ["malformed"]),
    ({"judge": "{model_answer} {answer} }"}, "judge", ["malformed"]),
    ({"mentor": "{question.__class__} {answer} {prefix}"}, "mentor", ["not a plain name"]),
    ({"mentor": "{question} {answer!r} {prefix}"}, "mentor", ["conversion"]),
    ({"mentor": "{question} {answer:>9} {prefix}"}, "mentor", ["format spec"]),
    ({"mentor": "{} {answer} {prefix}"}, "mentor", ["not a plain name"]),
    ({"judge": 42}, "judge", ["expected a string"]),
    # no final-answer line asked for: every sample unanswered, every question all-zero
    ({"intern": "Q: {question}\n{prefix}"}, "intern",
     ["neither intern nor intern_system", "### The final answer is:"]),
    ({"mentor": "{question} {answer} {prefix}"}, "mentor", ["neither mentor nor mentor_system"]),
])
def test_bad_templates_are_refused_naming_table_and_key(prompts, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(with_prompts(**prompts))
    msg = str(e.value)
    assert msg.startswith(f"[prompts].{key}:"), msg
    for w in words:
        assert w in msg, msg


def test_unknown_prompt_keys_and_packs_are_refused():
    with pytest.raises(ConfigError, match=r"\[prompts\]: unknown key\(s\) mentor_template"):
        parse_config(with_prompts(mentor_template="x"))
    with pytest.raises(ConfigError, match=r"\[prompts\].pack: unknown pack 'legal'.*medical, math"):
        parse_config(with_prompts(pack="legal"))
    with pytest.raises(ConfigError, match=r"\[prompts\]: expected a table"):
        parse_config({**sim_config(), "prompts": "math"})
    with pytest.raises(TemplateError, match="unknown template"):
        check_template("critic", "{question}")


def test_example_config_and_bundled_pack_file_are_valid():
    cfg = load_config(ROOT / "examples" / "math.toml")
    assert cfg.prompts.pack == "math" and cfg.dataset.format == "generic"
    pack_file = ROOT / "mics" / "resources" / "prompts-math.toml"
    table = tomllib.loads(pack_file.read_text())["prompts"]  # pasteable as a config table
    assert parse_config({**sim_config(), "prompts": table}).prompts == cfg.prompts
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["mics"]
    assert any(pack_file.match(f"mics/{g}") for g in globs)  # shipped in the wheel
