"""Export formats: schema tests and golden files on a fixed small simulated run.

Regenerate the goldens (then read the diff!) with ``MICS_REGEN_GOLDEN=1 pytest
tests/test_exports.py``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import anyio
import orjson
import pytest
from conftest import make_questions, sim_config
from typer.testing import CliRunner

from backends.gate import CallGate
from cli.app import app
from mics.config import parse_config
from mics.engine import Engine
from mics.export import (
    FILES,
    FORMATS,
    Filters,
    export,
    export_reference,
    sft_prompt,
    split_answer,
)
from mics.run import build_models
from mics.steps import FINAL_MARKER
from mics.types import ROOT_TEXT, ImageRef, Question
from store import RunStore

GOLDEN = Path(__file__).parent / "golden" / "exports"
OUT_FILES = ["results.jsonl", "failed.jsonl", *FILES.values(), "dataset_info.json"]


def fixed_questions() -> list[Question]:
    """Six questions; q0 has two modalities (three images), q3 one image."""
    qs = make_questions(6)
    fake = ImageRef(path="/nonexistent.png", sha256="0" * 64, mime="image/png", width=1,
                    height=1)
    paths = {"q0": ("q0/ct_group1/0.png", "q0/ct_group1/1.png", "q0/mri_group2/0.png"),
             "q3": ("q3/x-ray_group1/0.png",)}
    return [replace(q, images=(fake,) * len(paths[q.qid]), image_paths=paths[q.qid])
            if q.qid in paths else q for q in qs]


def fixed_config(**search):
    """Two mentors, two interns, depth 2: gives full scores at depths 1 and 2, max depth and
    all-zero stops on the fixed questions."""
    raw = sim_config(max_depth=2, **search)
    raw["mentors"], raw["interns"] = raw["mentors"][:2], raw["interns"][:2]
    return parse_config(raw)


def build_fixed_run(run_dir: Path, **search) -> Path:
    """Search the fixed questions in-process with the simulated backend; returns run_dir."""
    cfg = fixed_config(**search)
    with RunStore.open(run_dir, create=True) as store:
        store.put_meta("config", cfg.to_dict())
        models = build_models(cfg)
        anyio.run(lambda: Engine(cfg, store, models, CallGate(store, session="t")).run(
            fixed_questions()))
    return run_dir


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory) -> Path:
    return build_fixed_run(tmp_path_factory.mktemp("fixed") / "run")


@pytest.fixture(scope="module")
def exported(fixed_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    with RunStore.open(fixed_run, write=False) as store:
        export(store, out, list(FORMATS))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# ---------------------------------------------------------------- golden


def test_fixed_run_covers_every_stop_reason(fixed_run):
    with RunStore.open(fixed_run, write=False) as store:
        stops = {(r["stop_reason"], r["outcome"]["final_depth"]) for _, r in
                 store.iter_questions()}
    assert {("full_score", 1), ("full_score", 2), ("max_depth", 2), ("all_zero", 1)} <= stops


@pytest.mark.parametrize("name", OUT_FILES)
def test_golden(exported, name):
    got = (exported / name).read_bytes()
    golden = GOLDEN / name
    if os.environ.get("MICS_REGEN_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(got)
    assert got == golden.read_bytes(), f"{name} differs from {golden}"


def test_export_is_deterministic(tmp_path):
    outs = []
    for i in range(2):
        run = build_fixed_run(tmp_path / f"r{i}", concurrency=1 + 7 * i)
        with RunStore.open(run, write=False) as store:
            export(store, tmp_path / f"o{i}", list(FORMATS))
        outs.append({n: (tmp_path / f"o{i}" / n).read_bytes() for n in OUT_FILES})
    assert outs[0] == outs[1]


def test_reference_output_unchanged_by_the_new_exporter(fixed_run, exported, tmp_path):
    with RunStore.open(fixed_run, write=False) as store:
        export_reference(store, tmp_path)
    for name in ("results.jsonl", "failed.jsonl"):
        assert (tmp_path / name).read_bytes() == (exported / name).read_bytes()


# ---------------------------------------------------------------- schemas


DIFFICULTY = {"final_depth", "stop_reason", "stop_kind", "score_trajectory", "level"}


def check_difficulty(d: dict) -> None:
    assert set(d) == DIFFICULTY
    assert isinstance(d["final_depth"], int) and d["final_depth"] >= 1
    assert all(0.0 <= x <= 1.0 for x in d["score_trajectory"])
    if d["stop_kind"] == "full_score":
        assert d["level"] == d["final_depth"] and d["score_trajectory"][-1] == 1.0
        assert len(d["score_trajectory"]) == d["final_depth"]
    elif d["stop_kind"] == "max_depth":
        assert d["level"] == d["final_depth"] + 1
    else:
        assert d["level"] is None


def check_chain(prompt: str, target: str, images: list[str]) -> None:
    assert prompt.count("<image>") == len(images)
    assert "(Supplementary information is as follows:\nGender: " in prompt
    assert prompt.endswith("reason step-by-step to answer the above question.")
    assert target.startswith(ROOT_TEXT) and FINAL_MARKER not in target
    assert "### Step 1:" in target


def test_sft_schema(exported):
    records = read_jsonl(exported / "sft.jsonl")
    results = read_jsonl(exported / "results.jsonl")
    assert [r["id"] for r in records] == [r["rid"] for r in results]
    for r, ref in zip(records, results, strict=True):
        assert set(r) - {"image"} == {"id", "conversations", "answer", "gt_answer",
                                       "generated_by", "difficulty", "leaks_answer"}
        images = r.get("image", [])
        assert sorted(images) == sorted(ref["images"])
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"]
        check_chain(r["conversations"][0]["value"], r["conversations"][1]["value"], images)
        assert r["answer"] and ref["reasoning"].rstrip().endswith(r["answer"])
        assert r["generated_by"] == ref["generated_by"]
        check_difficulty(r["difficulty"])
        assert r["difficulty"]["final_depth"] == int(ref["final_depth"])


def test_sharegpt_schema(exported):
    records = read_jsonl(exported / "sharegpt.jsonl")
    sft = read_jsonl(exported / "sft.jsonl")
    for r, s in zip(records, sft, strict=True):
        assert set(r) == {"id", "messages", "images", "answer", "gt_answer", "generated_by",
                          "difficulty", "leaks_answer"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["images"] == s.get("image", [])
        assert [m["content"] for m in r["messages"]] == [t["value"] for t in s["conversations"]]
        check_chain(r["messages"][0]["content"], r["messages"][1]["content"], r["images"])
    info = orjson.loads((exported / "dataset_info.json").read_bytes())
    assert info["mics"]["file_name"] == "sharegpt.jsonl"
    assert info["mics"]["formatting"] == "sharegpt"


def test_step_values_schema(exported, fixed_run):
    records = read_jsonl(exported / "step_values.jsonl")
    with RunStore.open(fixed_run, write=False) as store:
        stored = [n for qid, _ in store.iter_questions() for n in store.get_nodes(qid)
                  if n["depth"] >= 0]
    assert [r["node_id"] for r in records] == [n["node_id"] for n in stored]
    keys = {"rid", "question", "gt_answer", "images", "node_id", "parent_id", "attempt",
            "depth", "mentor", "prefix", "step", "value", "correct", "total", "chosen",
            "reused", "difficulty", "leaks_answer"}
    for r in records:
        assert set(r) == keys
        assert r["value"] == r["correct"] / r["total"] and r["depth"] >= 1
        assert r["prefix"].startswith(ROOT_TEXT) and r["prefix"].endswith(r["step"])
        check_difficulty(r["difficulty"])
    assert {r["rid"] for r in records} == {f"q{i}" for i in range(6)}  # failures included


def test_preferences_schema(exported):
    records = read_jsonl(exported / "preferences.jsonl")
    assert records
    for r in records:
        assert set(r) == {"rid", "question", "gt_answer", "images", "depth", "parent_id",
                          "prefix", "chosen", "rejected", "margin", "difficulty"}
        c, j = r["chosen"], r["rejected"]
        assert set(c) == set(j) == {"node_id", "mentor", "step", "score", "correct", "total",
                                    "leaks_answer"}
        assert c["score"] > j["score"] and r["margin"] == c["score"] - j["score"]
        assert c["node_id"] != j["node_id"] and c["mentor"] != j["mentor"]
        assert c["node_id"].split(".")[1] == j["node_id"].split(".")[1] == f"d{r['depth'] - 1}"
        check_difficulty(r["difficulty"])


# ---------------------------------------------------------------- filters and prompt


def test_filters(fixed_run, tmp_path):
    with RunStore.open(fixed_run, write=False) as store:
        full = export(store, tmp_path / "full", ["sft", "step-values"],
                      Filters(only_full_score=True))
        shallow = export(store, tmp_path / "d1", ["step-values"], Filters(max_depth=1))
        scored = export(store, tmp_path / "s", ["sft", "reference"], Filters(min_score=1.0))
    for r in read_jsonl(tmp_path / "full" / "sft.jsonl"):
        assert r["difficulty"]["stop_kind"] == "full_score"
    assert full["sft"] == scored["sft"] == scored["results"]
    assert {r["difficulty"]["stop_kind"] for r in
            read_jsonl(tmp_path / "full" / "step_values.jsonl")} == {"full_score"}
    assert shallow["step-values"] > 0
    assert all(r["difficulty"]["final_depth"] == 1 and r["depth"] == 1
               for r in read_jsonl(tmp_path / "d1" / "step_values.jsonl"))


def test_sft_prompt_matches_chiron_eval_format():
    q = {"question": "What is the most likely diagnosis?",
         "case_info": "Chief complaint: Pain and palpable mass.\nAge: 15 years\nGender: Female\n"
                      "Image analysis:\nModality 1: x",
         "image_paths": ["197850/x-ray_group1/0.png", "197850/mri_group2/0.jpeg"]}
    prompt, images = sft_prompt(q)
    assert prompt == (
        "What is the most likely diagnosis? (Supplementary information is as follows:\n"
        "Gender: Female, Age: 15 years, Chief complaint: Pain and palpable mass.)\n"
        "Please base your response on the keyframes of the relevant medical imaging modality "
        "(Modality 1: <image>,\nModality 2: <image>) and reason step-by-step to answer the "
        "above question.")
    assert images == q["image_paths"]
    q["image_paths"] = ["1/ct_group2/0.png", "1/mri_group1/0.png", "1/mri_group1/1.png"]
    prompt, images = sft_prompt(q)
    assert "(Modality 1: <image>\n<image>,\nModality 2: <image>)" in prompt
    assert images == ["1/mri_group1/0.png", "1/mri_group1/1.png", "1/ct_group2/0.png"]


def test_split_answer():
    chain = f"{ROOT_TEXT}\n\n### Step 1: look.\n\n{FINAL_MARKER} Pneumothorax"
    assert split_answer(chain) == (f"{ROOT_TEXT}\n\n### Step 1: look.", "Pneumothorax")
    assert split_answer("no marker") == ("no marker", None)


# ---------------------------------------------------------------- CLI


def test_cli_export_all_and_errors(fixed_run, exported, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path), "-f", "all"])
    assert res.exit_code == 0, res.output
    for name in OUT_FILES:
        assert (tmp_path / name).read_bytes() == (exported / name).read_bytes()
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "x"),
                              "-f", "sft", "--answer-in-target", "--only-full-score"])
    assert res.exit_code == 0, res.output
    for r in read_jsonl(tmp_path / "x" / "sft.jsonl"):
        assert r["conversations"][1]["value"].endswith(f"{FINAL_MARKER} {r['answer']}")
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "y"),
                              "-f", "bogus"])
    assert res.exit_code == 2 and "bogus" in res.output
