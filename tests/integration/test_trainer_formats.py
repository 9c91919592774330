"""Each export of a demo run, read by the trainers' own loading code.

A simulated search over the ten Chiron-o1 demo cases (one question with a literal
``<image>`` in its text), exported with ``-f all -f hf``, then loaded with ``datasets``, TRL's
data utilities and a tiny chat tokenizer. LLaMA-Factory does not install on this CPU stack
(it pulls a CUDA torch), and InternVL's trainer is not a package, so their loading steps are
re-done here from their source, cited at each step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from helpers import CHIRON, ROOT
from PIL import Image

from mics.export import Filters, escape_placeholders, exportable_questions, sft_prompt
from mics.export_trainers import prompt_blocks, step_sections
from mics.types import Question
from store import RunStore

datasets = pytest.importorskip("datasets")

EXAMPLE = ROOT / "examples" / "simulated.toml"
JSONL = ("results.jsonl", "sft.jsonl", "sharegpt.jsonl", "step_values.jsonl",
         "preferences.jsonl", "preferences_sharegpt.jsonl", "prm.jsonl")
PLANTED = "169992"  # the demo case whose question gets a literal <image>


def mics(*args: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, f"mics {args}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo run's export folder (its images stay in ../shared, under CHIRON/images)."""
    if not (CHIRON / "demo.jsonl").is_file():
        pytest.fail("../shared/data/chiron-demo is missing: CI always has it beside the checkout")
    work = tmp_path_factory.mktemp("trainers")
    lines = []
    for line in (CHIRON / "demo.jsonl").read_text().splitlines():
        rec = orjson.loads(line)
        if rec["rid"] == PLANTED:
            rec["messages"][0]["content"] += " Compare the <image> with the prior study."
        lines.append(orjson.dumps(rec).decode())
    data = work / "demo.jsonl"
    data.write_text("\n".join(lines) + "\n")
    mics("search", data, "--image-root", CHIRON / "images", "--config", EXAMPLE,
         "--run", work / "run")
    mics("export", work / "run", "--out", work / "out", "-f", "all", "-f", "hf",
         "--include-partial")
    return work / "out"


def load_json(path: Path, cache: Path) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=str(path), split="train",
                                 cache_dir=str(cache))


def opens(path: str) -> bool:
    with Image.open(path) as im:
        im.load()
    return True


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("name", JSONL)
def test_every_file_loads_with_datasets_json(demo, name, tmp_path):
    ds = load_json(demo / name, tmp_path)
    assert len(ds) == len(read_jsonl(demo / name)) > 0


def test_literal_image_tag_is_escaped_everywhere(demo):
    [rec] = [r for r in read_jsonl(demo / "sft.jsonl") if r["id"] == PLANTED]
    prompt = rec["conversations"][0]["value"]
    assert "Compare the [image] with the prior study." in prompt
    assert prompt.count("<image>") == len(rec["image"]) == 1
    assert escape_placeholders("a <IMAGE> b </img> <IMG_CONTEXT> <video>") == \
        "a [IMAGE] b [/img] [IMG_CONTEXT] [video]"
    prompt, images = sft_prompt(Question(qid="1", index=0, question="Is <image> here?",
                                         gt_answer="no", images=(), case_info="",
                                         image_paths=("1/ct_group1/0.png",)))
    assert prompt.startswith("Is [image] here?") and prompt.count("<image>") == len(images)


# ---------------------------------------------------------------- InternVL


def test_internvl_meta_and_sft(demo):
    """InternVL internvl_chat/internvl/train/internvl_chat_finetune.py: build_datasets reads
    the --meta_path JSON (repeat_time, root, annotation, data_augment), LazySupervisedDataset
    asserts the annotation ends with 'jsonl', joins each image to ``root`` with
    os.path.join (get_image_path), sends a list ``image`` to
    multi_modal_multi_image_get_item and a string to multi_modal_get_item; the preprocess
    functions (internvl/train/dataset.py) assert one ``<image>`` per image."""
    meta = orjson.loads((demo / "internvl_meta.json").read_bytes())
    [(name, entry)] = meta.items()
    assert set(entry) >= {"root", "annotation", "data_augment", "repeat_time", "length"}
    assert entry["annotation"].endswith("jsonl") and os.path.isabs(entry["annotation"])
    assert Path(entry["root"]) == (CHIRON / "images").resolve()
    lines = Path(entry["annotation"]).read_text().splitlines()
    assert len(lines) == entry["length"] > 0 and entry["repeat_time"] == 1
    opened = 0
    for line in lines:
        item = orjson.loads(line)
        assert isinstance(item["image"], list)  # one type for the column, see docs/exports.md
        human, gpt = item["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == len(item["image"])
        assert "<image>" not in gpt["value"]
        opened += sum(opens(os.path.join(entry["root"], p)) for p in item["image"])
    assert opened == 14  # every demo image


# ---------------------------------------------------------------- LLaMA-Factory


def lf_entry(demo: Path, name: str) -> dict:
    """LLaMA-Factory src/llamafactory/data/parser.py DatasetAttr defaults + join()."""
    info = orjson.loads((demo / "dataset_info.json").read_bytes())[name]
    attr = {"formatting": "alpaca", "ranking": False, "messages": "conversations",
            "images": None, "chosen": None, "rejected": None, "role_tag": "from",
            "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
            "observation_tag": "observation", "function_tag": "function_call",
            "system_tag": "system"}
    attr.update({k: info[k] for k in ("formatting", "ranking") if k in info})
    attr.update(info.get("columns", {}))
    attr.update(info.get("tags", {}))
    attr["file_name"] = info["file_name"]
    return attr


def lf_convert(example: dict, a: dict, media_dir: Path) -> tuple[list, list, list]:
    """SharegptDatasetConverter.__call__ and DatasetConverter._find_medias
    (src/llamafactory/data/converter.py), raising where they log and skip."""
    odd = (a["user_tag"], a["observation_tag"])
    even = (a["assistant_tag"], a["function_tag"])
    messages = example[a["messages"]]
    for i, m in enumerate(messages):
        assert m[a["role_tag"]] in (odd, even)[i % 2], "Invalid role tag"
    assert len(messages) % 2 == (1 if a["ranking"] else 0), "Invalid message count"
    prompt = [m[a["content_tag"]] for m in messages]
    if a["ranking"]:
        chosen, rejected = example[a["chosen"]], example[a["rejected"]]
        assert isinstance(chosen, dict) and isinstance(rejected, dict)
        assert chosen[a["role_tag"]] in even and rejected[a["role_tag"]] in even
        response = [chosen[a["content_tag"]], rejected[a["content_tag"]]]
    else:
        prompt, response = prompt[:-1], prompt[-1:]
    images = []
    for p in example[a["images"]] or []:  # joined to media_dir only if that is a file
        joined = os.path.join(media_dir, p)
        images.append(joined if os.path.isfile(joined) else p)
    return prompt, response, images


def lf_validate(prompt: list[str], response: list[str], images: list[str]) -> None:
    """mm_plugin.py MMPluginMixin._validate_messages: placeholders == images, per pair."""
    for answer in response[:1] if len(response) == 2 else response:
        assert sum(t.count("<image>") for t in [*prompt, answer]) == len(images)
        assert sum(t.count(tag) for t in [*prompt, answer] for tag in ("<video>", "<audio>")) == 0


@pytest.mark.parametrize("name", ["mics", "mics_preferences"])
def test_llamafactory_loads_with_default_media_dir(demo, name, tmp_path):
    a = lf_entry(demo, name)
    assert a["formatting"] == "sharegpt" and a["ranking"] is (name == "mics_preferences")
    ds = load_json(demo / a["file_name"], tmp_path)  # LLaMA-Factory loads files this way
    opened = set()
    for example in ds:
        # media_dir defaults to dataset_dir (hparams/data_args.py __post_init__)
        prompt, response, images = lf_convert(example, a, demo)
        assert prompt and len(response) == (2 if a["ranking"] else 1)
        lf_validate(prompt, response, images)
        for p in images:
            assert opens(p)
            opened.add(p)
    assert len(opened) == 14


# ---------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from bench.models import VL_SPECIALS, build_tokenizer

    return build_tokenizer(VL_SPECIALS)


def test_trl_preferences(demo, chat_tokenizer, tmp_path):
    trl = pytest.importorskip("trl.data_utils")
    ds = load_json(demo / "preferences.jsonl", tmp_path)
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    assert len(ds) > 0
    for ex in ds:
        assert trl.is_conversational(ex)
        assert trl.maybe_extract_prompt(ex) is ex  # explicit prompt: kept as it is
        out = trl.maybe_apply_chat_template(ex, chat_tokenizer)
        assert out["prompt"].endswith("<|im_start|>assistant\n")
        assert out["prompt"].count("<|image_pad|>") == len(ex["images"])
        for side in ("chosen", "rejected"):
            assert out[side].startswith("Let's think about how to solve this problem")
            assert out[side].endswith("<|im_end|>\n")
        # DataCollatorForVisionPreference: fill the image blocks with the decoded images
        filled = trl.prepare_multimodal_messages(ex["prompt"], images=ex["images"])
        pictures = [b["image"] for b in filled[0]["content"] if b["type"] == "image"]
        assert len(pictures) == len(ex["images"]) >= 1
        assert all(isinstance(p, Image.Image) and p.size[0] > 1 for p in pictures)


def test_trl_prm_stepwise_supervision(demo, tmp_path):
    """TRL's stepwise supervision (docs dataset_formats.md): prompt, completions, labels.
    PRMTrainer.tokenize_row (trl/experimental/prm/prm_trainer.py) calls int(label) on each
    label and zips completions with labels strictly."""
    trl = pytest.importorskip("trl.data_utils")
    ds = load_json(demo / "prm.jsonl", tmp_path)
    assert ds.features["labels"].feature.dtype == "bool"
    assert ds.features["prompt"].dtype == "string"
    assert all(opens(p) for p in {p for ex in ds for p in ex["images"]})
    for ex in ds:
        assert not trl.is_conversational(ex)
        labels = [int(x) for x in ex["labels"]]
        assert labels == [int(v > 0) for v in ex["values"]]
        assert len(ex["completions"]) == len(labels) > 0
        assert all(step_sections(c) == [c] for c in ex["completions"])  # one step each


# ---------------------------------------------------------------- --format hf


def test_hf_folder_loads_with_images(demo):
    sft = read_jsonl(demo / "sft.jsonl")
    prefs = read_jsonl(demo / "preferences.jsonl")
    prm = read_jsonl(demo / "prm.jsonl")
    for name, rows in (("sft", sft), ("preferences", prefs), ("prm", prm)):
        ds = datasets.load_from_disk(str(demo / "hf" / name))
        assert len(ds) == len(rows)
        assert isinstance(ds.features["images"].feature, datasets.Image)
        first = ds[0]["images"]
        assert first and all(isinstance(im, Image.Image) for im in first)
        parquet = datasets.Dataset.from_parquet(str(demo / "hf" / f"{name}.parquet"))
        assert len(parquet) == len(rows)
    ds = datasets.load_from_disk(str(demo / "hf" / "sft"))
    for row, ref in zip(ds, sft, strict=True):
        assert row["id"] == ref["id"] and len(row["images"]) == len(ref["image"])
        user, assistant = row["messages"]
        text = "<image>".join(b["text"] for b in user["content"] if b["type"] == "text")
        assert text == ref["conversations"][0]["value"]
        assert assistant["content"] == [{"type": "text", "text": ref["conversations"][1]["value"]}]
        assert [b["type"] for b in user["content"] if b["type"] == "image"] == \
            ["image"] * len(ref["image"])
    ds = datasets.load_from_disk(str(demo / "hf" / "preferences"))
    assert ds[0]["chosen"] == prefs[0]["chosen"] and ds[0]["metadata"]["rid"] == \
        prefs[0]["metadata"]["rid"]


def test_hf_export_is_byte_identical_on_rerun(demo, tmp_path):
    run = demo.parent / "run"
    mics("export", run, "--out", tmp_path, "-f", "hf", "--include-partial")
    for f in sorted((demo / "hf").rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "hf" / f.relative_to(demo / "hf")).read_bytes(), f


def test_prompt_blocks_keep_image_positions():
    assert prompt_blocks("a <image>\n<image>, b") == [
        {"type": "text", "text": "a "}, {"type": "image"}, {"type": "text", "text": "\n"},
        {"type": "image"}, {"type": "text", "text": ", b"}]
    assert prompt_blocks("<image>") == [{"type": "image"}]
    assert step_sections("### Step 1: a\n\n### Step 2: b") == ["### Step 1: a", "### Step 2: b"]


def test_hf_exclude_leaks_reports_the_questions_it_left_out(demo, tmp_path):
    """`-f hf --exclude-leaks` says how many questions it left out, as the JSONL formats do."""
    run = demo.parent / "run"
    sft = mics("export", run, "--out", tmp_path / "j", "-f", "sft", "--exclude-leaks")
    hf = mics("export", run, "--out", tmp_path / "h", "-f", "hf", "--exclude-leaks")
    said = [next(ln for ln in p.stdout.splitlines() if ln.startswith("--exclude-leaks"))
            for p in (sft, hf)]
    assert said[0] == said[1]
    left = int(said[0].split(": ", 1)[1].split()[0])
    with RunStore.open(run, write=False) as store:
        every = sum(1 for _ in exportable_questions(store, Filters()))
        kept = sum(1 for _ in exportable_questions(store, Filters(exclude_leaks=True)))
    assert left == every - kept
