"""Shared fixtures: small configs, questions and a real LMDB run store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mics.config import ModelConfig, parse_config
from mics.types import Question

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CHIRON = ROOT.parent / "shared" / "data" / "chiron-demo"


def sim_config(**search: Any) -> dict[str, Any]:
    """A simulated config as a mapping (3 mentors, 3 interns, judge)."""
    return {
        "search": {"seed": 0, **search},
        "mentors": [
            {"name": f"m{i}", "backend": "simulated", "model": f"m{i}",
             "options": {"quality": q}}
            for i, q in enumerate((0.6, 0.45, 0.35))
        ],
        "interns": [
            {"name": f"i{i}", "backend": "simulated", "model": f"i{i}", "options": {"skill": s}}
            for i, s in enumerate((0.95, 0.85, 0.75))
        ],
        "judge": {"name": "judge", "backend": "simulated", "model": "judge"},
    }


@pytest.fixture
def config():
    return parse_config(sim_config())


def make_questions(n: int = 6) -> list[Question]:
    answers = ["Pneumothorax", "Aortic dissection", "Pacemaker lead fracture",
               "Sudden cardiac death", "Renal cell carcinoma", "Appendicitis"]
    return [
        Question(qid=f"q{i}", index=i, question=f"What is the diagnosis in case {i}?",
                 gt_answer=answers[i % len(answers)], images=(), image_paths=(),
                 case_info=f"Chief complaint: pain {i}\nAge: 40 years\nGender: Male\n"
                           "Image analysis:\nCaptions: None")
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 text model with its tokenizer, built once per test session."""
    pytest.importorskip("torch")
    from bench.models import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2-VL model with tokenizer and image processor, built once."""
    pytest.importorskip("torch")
    from bench.models import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatML tokenizer with Qwen-VL image tokens (for the sglang backend)."""
    pytest.importorskip("transformers")
    from bench.models import VL_SPECIALS, build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(VL_SPECIALS).save_pretrained(out)
    return out


def local_rollout(path: Path, **options: Any):  # noqa: ANN201 - LocalRollout, imported lazily
    """The local backend on a model folder (no weights load until the first rollout)."""
    from backends.local import LocalRollout

    return LocalRollout(ModelConfig(name="tiny", backend="local", model=str(path),
                                    options=options))


@pytest.fixture
def chiron() -> Path:
    if not (CHIRON / "demo.jsonl").is_file():
        pytest.fail(f"the Chiron demo data is missing: {CHIRON} (tests need ../shared next to "
                    "the repository; .ci/run says so before running)")
    return CHIRON
