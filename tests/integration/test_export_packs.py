"""The training exports' user turn follows the run's prompt pack: a math-pack run over the
bundled chart dataset (generic format) exports a turn with no medical wording; a medical run,
and a run stored before packs were recorded, keep the Chiron-o1 turn byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest
from helpers import ROOT
from test_exports import GOLDEN, OUT_FILES, build_fixed_run, out_bytes, read_jsonl

from mics import search_sync
from mics.chart_data import write_chart_dataset
from mics.export import FORMATS, TEXT_ONLY, escape_placeholders, export, run_pack, sft_prompt
from mics.types import Question
from store import RunStore

EXAMPLE = ROOT / "examples" / "math.toml"
MEDICAL_WORDS = ("Chief complaint", "Gender", "Supplementary", "keyframes", "Modality",
                 "medical")
PLANTED = "Read the <image> carefully."  # a literal placeholder in one question's text
TWO_IMAGES = ["two/ct_group2/0.png", "two/ct_group1/0.png"]  # listed against group order


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The math-pack run over the chart dataset: one question with a planted ``<image>``,
    one with two images listed against their ``_group<k>`` order; (run, records by id)."""
    work = tmp_path_factory.mktemp("packs")
    jsonl, images = write_chart_dataset(work / "charts", n=12)
    records = [orjson.loads(line) for line in jsonl.read_bytes().splitlines()]
    charted = [r for r in records if r.get("images")]
    charted[0]["question"] += " " + PLANTED
    png = images / charted[1]["images"][0]
    for p in TWO_IMAGES:
        (images / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, images / p)
    charted[1]["images"] = TWO_IMAGES
    jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    run = work / "run"
    search_sync(EXAMPLE, jsonl, run, image_root=images)
    return run, {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def math_out(charts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("math-out")
    with RunStore.open(charts[0], write=False) as store:
        assert run_pack(store) == "math"
        export(store, out, list(FORMATS))
    return out


def check_plain_turn(turn: str, images: list[str], record: dict) -> None:
    """No medical wording, one ``<image>`` per image, the question, never the context."""
    assert not [w for w in MEDICAL_WORDS if w.lower() in turn.lower()], turn
    assert turn.count("<image>") == len(images)
    question = escape_placeholders(record["question"])
    assert turn == "\n".join([question, *["<image>"] * len(images), TEXT_ONLY])
    if record.get("context"):
        assert record["context"] not in turn


def user_turns(out: Path) -> list[tuple[str, str, list[str]]]:
    """(rid, user turn, images) of every row of every training file."""
    rows = []
    for r in read_jsonl(out / "sft.jsonl"):
        rows.append((r["id"], r["conversations"][0]["value"], r.get("image", [])))
    for r in read_jsonl(out / "sharegpt.jsonl"):
        rows.append((r["id"], r["messages"][0]["content"], r["images"]))
    for r in read_jsonl(out / "preferences.jsonl"):
        blocks = r["prompt"][0]["content"]
        assert sum(b == {"type": "image"} for b in blocks) == len(r["images"])
        text = "<image>".join(b["text"] for b in blocks if b["type"] == "text")
        rows.append((r["metadata"]["rid"], text, r["images"]))
    for r in read_jsonl(out / "preferences_sharegpt.jsonl"):
        rows.append((r["metadata"]["rid"], r["conversations"][0]["value"], r["images"]))
    for r in read_jsonl(out / "prm.jsonl"):
        rows.append((r["metadata"]["rid"], r["prompt"], r["images"]))
    return rows


def test_math_pack_exports_a_plain_user_turn(charts, math_out):
    run, records = charts
    rows = user_turns(math_out)
    for name in ("sft.jsonl", "sharegpt.jsonl", "preferences.jsonl",
                 "preferences_sharegpt.jsonl", "prm.jsonl"):
        assert read_jsonl(math_out / name), f"{name} is empty"
    for rid, turn, images in rows:
        check_plain_turn(turn, images, records[rid])
    seen = {rid: images for rid, _turn, images in rows}
    assert any(not images for images in seen.values())  # text-only word problems too
    planted = next(rid for rid, r in records.items() if PLANTED in r["question"])
    two = next(rid for rid, r in records.items() if r.get("images") == TWO_IMAGES)
    assert {planted, two} <= set(seen)
    assert any("Read the [image] carefully." in turn for rid, turn, _ in rows if rid == planted)
    root = run.parent / "charts" / "images"
    for r in read_jsonl(math_out / "sft.jsonl"):  # record order, relative paths
        assert r.get("image", []) == records[r["id"]].get("images", [])
    for r in read_jsonl(math_out / "sharegpt.jsonl"):  # record order, absolute paths
        listed = records[r["id"]].get("images", [])
        assert r["images"] == [str(root.resolve() / p) for p in listed]


def test_math_pack_hf_sft_turn(charts, math_out):
    datasets = pytest.importorskip("datasets")
    from mics.export_hf import export_hf

    run, records = charts
    with RunStore.open(run, write=False) as store:
        export_hf(store, math_out)
    rows = datasets.load_from_disk(str(math_out / "hf" / "sft"))
    assert len(rows) == len(read_jsonl(math_out / "sft.jsonl"))
    for r in rows:
        blocks = r["messages"][0]["content"]
        text = "<image>".join(b["text"] for b in blocks if b["type"] == "text")
        check_plain_turn(text, r["images"], records[r["id"]])
    prm = datasets.load_from_disk(str(math_out / "hf" / "prm"))
    for r in prm:
        check_plain_turn(r["prompt"], r["images"], records[r["metadata"]["rid"]])


def test_sft_prompt_per_pack():
    q = Question(qid="1", index=0, question="Is <image> the larger bar?", gt_answer="yes",
                 images=(), case_info="Gender: Female\nThe chart shows apples.",
                 image_paths=("1/ct_group2/0.png", "1/mri_group1/0.png"))
    assert sft_prompt(q, "math") == (
        "Is [image] the larger bar?\n<image>\n<image>\n"
        "Please reason step-by-step to answer the above question.", list(q.image_paths))
    text_only = Question(qid="2", index=1, question="What is 2 + 3?", gt_answer="5",
                         images=(), case_info="None", image_paths=())
    assert sft_prompt(text_only, "math") == (
        "What is 2 + 3?\nPlease reason step-by-step to answer the above question.", [])
    medical, images = sft_prompt(q)
    assert sft_prompt(q, "medical") == (medical, images)
    assert "Gender: Female, Age: N/A, Chief complaint: N/A)" in medical
    assert "keyframes of the relevant medical imaging modality" in medical
    assert images == ["1/mri_group1/0.png", "1/ct_group2/0.png"]  # modality order


def test_medical_and_unrecorded_pack_keep_the_chiron_turn(tmp_path):
    """A medical run, and the same run with its recorded pack removed (a run stored before
    packs), export the golden files byte for byte, with the medical wording in every turn."""
    run = build_fixed_run(tmp_path / "run")
    for name in ("medical", "unrecorded"):
        if name == "unrecorded":
            with RunStore.open(run) as store:
                config = store.get_meta("config")
                del config["prompts"]
                store.put_meta("config", config)
        out = tmp_path / name
        with RunStore.open(run, write=False) as store:
            assert run_pack(store) == "medical"
            export(store, out, list(FORMATS))
        for f in OUT_FILES:
            assert out_bytes(out, f) == (GOLDEN / f).read_bytes(), f"{name}: {f} differs"
        rows = user_turns(out)
        assert rows
        for _rid, turn, images in rows:
            assert "(Supplementary information is as follows:\nGender: " in turn
            assert "Chief complaint: " in turn and turn.count("<image>") == len(images)
            assert ("medical imaging modality" in turn) == bool(images)
