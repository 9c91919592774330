"""Export formats: schema tests and golden files on a fixed small simulated run.

Regenerate the goldens (then read the diff!) with ``MICS_REGEN_GOLDEN=1 pytest
tests/integration/test_exports.py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import anyio
import orjson
import pytest
from helpers import ROOT, make_questions, sim_config
from typer.testing import CliRunner

from backends.gate import CallGate
from cli.app import app
from mics.config import parse_config
from mics.engine import Engine
from mics.export import (
    FILES,
    FORMATS,
    INTERNVL_META,
    Filters,
    export,
    export_reference,
    sft_prompt,
    split_answer,
)
from mics.run import build_models
from mics.steps import FINAL_MARKER
from mics.types import ROOT_TEXT, ImageRef, Node, Question
from store import RunStore

GOLDEN = ROOT / "tests" / "golden" / "exports"
OUT_FILES = ["results.jsonl", "failed.jsonl", *FILES.values(), "dataset_info.json",
             INTERNVL_META]
# the image root the fixed run records (no file is read from it)
IMAGE_ROOT = "/data/mics-fixed/images"


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
        store.put_meta("dataset", {"path": "/data/mics-fixed/fixed.jsonl", "sha256": "0" * 64,
                                   "image_root": IMAGE_ROOT, "limit": None})
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


def out_bytes(out: Path, name: str) -> bytes:
    """A file's bytes, with the export folder (in InternVL's meta file) as <OUT>."""
    return (out / name).read_bytes().replace(str(out.resolve()).encode(), b"<OUT>")


# ---------------------------------------------------------------- golden


def test_fixed_run_covers_every_stop_reason(fixed_run):
    with RunStore.open(fixed_run, write=False) as store:
        stops = {(r["stop_reason"], r["outcome"]["final_depth"]) for _, r in
                 store.iter_questions()}
    assert {("full_score", 1), ("full_score", 2), ("max_depth", 2), ("all_zero", 1)} <= stops


@pytest.mark.parametrize("name", OUT_FILES)
def test_golden(exported, name):
    got = out_bytes(exported, name)
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
        outs.append({n: out_bytes(tmp_path / f"o{i}", n) for n in OUT_FILES})
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
        assert r["images"] == [f"{IMAGE_ROOT}/{p}" for p in s.get("image", [])]
        assert [m["content"] for m in r["messages"]] == [t["value"] for t in s["conversations"]]
        check_chain(r["messages"][0]["content"], r["messages"][1]["content"], r["images"])
    info = orjson.loads((exported / "dataset_info.json").read_bytes())
    assert info["mics"]["file_name"] == "sharegpt.jsonl"
    assert info["mics"]["formatting"] == "sharegpt"
    assert info["mics_preferences"]["file_name"] == "preferences_sharegpt.jsonl"
    assert info["mics_preferences"]["ranking"] is True


def test_internvl_meta(exported):
    meta = orjson.loads((exported / INTERNVL_META).read_bytes())
    assert meta == {"mics": {"root": IMAGE_ROOT,
                             "annotation": str((exported / "sft.jsonl").resolve()),
                             "data_augment": False, "repeat_time": 1,
                             "length": len(read_jsonl(exported / "sft.jsonl"))}}


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


def test_preferences_schema(exported, fixed_run):
    records = read_jsonl(exported / "preferences.jsonl")
    sft = {r["id"]: r for r in read_jsonl(exported / "sft.jsonl")}
    with RunStore.open(fixed_run, write=False) as store:
        trees = {qid: {n["node_id"]: n for n in store.get_nodes(qid)}
                 for qid, _ in store.iter_questions()}
    assert records
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected", "images", "metadata"}
        m = r["metadata"]
        nodes = trees[m["rid"]]
        assert set(m) == {"rid", "gt_answer", "depth", "parent_id", "chosen", "rejected",
                          "margin", "difficulty"}
        c, j = m["chosen"], m["rejected"]
        assert set(c) == set(j) == {"node_id", "mentor", "score", "correct", "total",
                                    "leaks_answer"}
        assert c["score"] > j["score"] and m["margin"] == c["score"] - j["score"]
        assert c["node_id"] != j["node_id"] and c["mentor"] != j["mentor"]
        assert c["node_id"].split(".")[1] == j["node_id"].split(".")[1] == f"d{m['depth'] - 1}"
        assert nodes[c["node_id"]]["chosen"] and nodes[c["node_id"]]["parent_id"] == m["parent_id"]
        # each side: the whole chain through its step; the prefix before it is shared
        assert r["chosen"] == [{"role": "assistant", "content": nodes[c["node_id"]]["prefix"]}]
        assert r["rejected"] == [{"role": "assistant", "content": nodes[j["node_id"]]["prefix"]}]
        parent = nodes[m["parent_id"]]["prefix"]
        assert r["chosen"][0]["content"].startswith(parent)
        assert r["rejected"][0]["content"].startswith(parent)
        # the prompt is sft's user turn with its <image> placeholders as image blocks
        s = sft[m["rid"]]
        [user] = r["prompt"]
        assert user["role"] == "user"
        text = "<image>".join(b["text"] for b in user["content"] if b["type"] == "text")
        assert text == s["conversations"][0]["value"]
        assert sum(b == {"type": "image"} for b in user["content"]) == len(r["images"])
        assert r["images"] == [f"{IMAGE_ROOT}/{p}" for p in s.get("image", [])]
        check_difficulty(m["difficulty"])
    ranked = read_jsonl(exported / "preferences_sharegpt.jsonl")
    assert len(ranked) == len(records)
    for r, t in zip(ranked, records, strict=True):
        assert r["conversations"] == [{"from": "human",
                                       "value": sft[t["metadata"]["rid"]]["conversations"][0][
                                           "value"]}]
        assert r["chosen"] == {"from": "gpt", "value": t["chosen"][0]["content"]}
        assert r["rejected"] == {"from": "gpt", "value": t["rejected"][0]["content"]}
        assert r["images"] == t["images"] and r["metadata"] == t["metadata"]


def test_prm_schema(exported, fixed_run):
    records = read_jsonl(exported / "prm.jsonl")
    with RunStore.open(fixed_run, write=False) as store:
        trees = {qid: store.get_nodes(qid) for qid, _ in store.iter_questions()}
    leaves = [(qid, n["node_id"]) for qid, t in trees.items() for n in t if n["depth"] >= 0
              and not any(m["parent_id"] == n["node_id"] for m in t)]
    assert [(r["metadata"]["rid"], r["metadata"]["node_ids"][-1]) for r in records] == leaves
    for r in records:
        nodes = {n["node_id"]: n for n in trees[r["metadata"]["rid"]]}
        assert set(r) == {"prompt", "completions", "labels", "values", "images", "metadata"}
        ids = r["metadata"]["node_ids"]
        assert len(r["completions"]) == len(r["labels"]) == len(r["values"]) == len(ids)
        assert all(isinstance(x, bool) for x in r["labels"])
        assert r["labels"] == [v > 0 for v in r["values"]]
        assert r["values"] == [nodes[i]["score"] for i in ids]
        assert all(c.startswith("### Step ") and c.count("### Step") == 1
                   for c in r["completions"])
        # the completions are the leaf's chain, one step section each, root to leaf
        chain = nodes[ids[-1]]["prefix"]
        # steps join with one newline (two between the root's two steps, as the reference)
        assert re.sub(r"\n\n+", "\n", chain) == "\n".join([ROOT_TEXT, *r["completions"]])
        path = list(dict.fromkeys(ids))
        assert [nodes[i]["depth"] for i in path] == list(range(len(path)))
        assert all(nodes[i]["chosen"] for i in path[:-1])
        assert r["metadata"]["label_rule"] == "positive"
        check_difficulty(r["metadata"]["difficulty"])
    assert {r["metadata"]["rid"] for r in records} == set(trees)  # failures too


def test_prm_full_score_rule(fixed_run, tmp_path):
    with RunStore.open(fixed_run, write=False) as store:
        export(store, tmp_path, ["prm"], prm_label="full")
        with pytest.raises(ValueError, match="PRM label rule"):
            export(store, tmp_path, ["prm"], prm_label="maybe")
    records = read_jsonl(tmp_path / "prm.jsonl")
    assert any(r["labels"] for r in records)
    for r in records:
        assert r["labels"] == [v == 1.0 for v in r["values"]]


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
    q = Question(qid="197850", index=0, question="What is the most likely diagnosis?",
                 gt_answer="x", images=(), case_info="Chief complaint: Pain and palpable mass.\n"
                 "Age: 15 years\nGender: Female\nImage analysis:\nModality 1: x",
                 image_paths=("197850/x-ray_group1/0.png", "197850/mri_group2/0.jpeg"))
    prompt, images = sft_prompt(q)
    assert prompt == (
        "What is the most likely diagnosis? (Supplementary information is as follows:\n"
        "Gender: Female, Age: 15 years, Chief complaint: Pain and palpable mass.)\n"
        "Please base your response on the keyframes of the relevant medical imaging modality "
        "(Modality 1: <image>,\nModality 2: <image>) and reason step-by-step to answer the "
        "above question.")
    assert images == list(q.image_paths)
    q = replace(q, image_paths=("1/ct_group2/0.png", "1/mri_group1/0.png", "1/mri_group1/1.png"))
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
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path), "-f", "all",
                                 "--include-partial"])  # the library default (golden)
    assert res.exit_code == 0, res.output
    for name in OUT_FILES:
        assert out_bytes(tmp_path, name) == out_bytes(exported, name)
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "x"),
                              "-f", "sft", "--answer-in-target", "--only-full-score"])
    assert res.exit_code == 0, res.output
    for r in read_jsonl(tmp_path / "x" / "sft.jsonl"):
        assert r["conversations"][1]["value"].endswith(f"{FINAL_MARKER} {r['answer']}")
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "y"),
                              "-f", "bogus"])
    assert res.exit_code == 2 and "bogus" in res.output


def test_cli_image_root_override_and_hf_errors(fixed_run, tmp_path):
    runner = CliRunner()
    moved = tmp_path / "moved"
    moved.mkdir()
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "o"),
                              "-f", "sharegpt", "-f", "sft", "--image-root", str(moved),
                              "--include-partial"])
    assert res.exit_code == 0, res.output
    [q0] = [r for r in read_jsonl(tmp_path / "o" / "sharegpt.jsonl") if r["id"] == "q0"]
    assert q0["images"] == [str(moved / p) for p in ("q0/ct_group1/0.png", "q0/ct_group1/1.png",
                                                     "q0/mri_group2/0.png")]
    meta = orjson.loads((tmp_path / "o" / INTERNVL_META).read_bytes())
    assert meta["mics"]["root"] == str(moved)
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "x"),
                              "--image-root", str(tmp_path / "absent"), "-f", "sft"])
    assert res.exit_code == 2 and "--image-root" in res.output
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "x"),
                              "-f", "prm", "--prm-label", "most"])
    assert res.exit_code == 2 and "--prm-label" in res.output
    pytest.importorskip("datasets")
    # the fixed run's images do not exist: hf (which embeds them) names the one it lacks
    res = runner.invoke(app, ["export", str(fixed_run), "--out", str(tmp_path / "h"), "-f", "hf"])
    assert res.exit_code == 2 and re.search(r"question q\d: image q\d/\S+ \(under \S+\) cannot "
                                            "be read for --format hf", res.output)
    assert not (tmp_path / "h" / "hf").exists() and not (tmp_path / "h" / "hf.tmp").exists()


def test_unscored_nodes_take_part_in_no_pair_and_no_path():
    """A node never evaluated (no intern sample, so no score) is neither a side of a
    preference pair nor a step of a PRM path."""
    from mics.export_trainers import preference_pairs, search_paths

    def node(nid: str, parent: str | None, depth: int, correct_total: tuple[int, int] | None,
             chosen: bool = False) -> Node:
        correct, total = correct_total or (0, 0)
        return Node(node_id=nid, parent_id=parent, attempt=0, depth=depth, mentor=nid,
                    step="", prefix=nid, chain="", correct=correct, total=total, chosen=chosen)

    nodes = [node("r", None, -1, None, chosen=True),
             node("a", "r", 0, (1, 2), chosen=True), node("b", "r", 0, (0, 2)),
             node("c", "r", 0, None),
             node("d", "a", 1, (2, 2), chosen=True), node("e", "a", 1, None)]
    assert [n.evaluated for n in nodes] == [False, True, True, False, True, False]
    pairs = [(c.node_id, r.node_id) for c, r in preference_pairs(nodes)]
    assert pairs == [("a", "b")]
    assert [[n.node_id for n in p] for p in search_paths(nodes)] == [["b"], ["a", "d"]]


def test_a_second_export_into_the_folder_keeps_the_first_dataset_info_entry(fixed_run, tmp_path):
    """sharegpt, then preferences, into one folder: LLaMA-Factory still finds both."""
    for fmt in ("sharegpt", "preferences"):
        res = CliRunner().invoke(app, ["export", str(fixed_run), "--out", str(tmp_path), "-f",
                                       fmt])
        assert res.exit_code == 0, res.output
    info = orjson.loads((tmp_path / "dataset_info.json").read_bytes())
    assert set(info) == {"mics", "mics_preferences"}
    assert info["mics"]["file_name"] == "sharegpt.jsonl"
