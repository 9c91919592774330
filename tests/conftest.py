"""Shared fixtures (pytest injects them by name); plain helpers are in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CHIRON, sim_config

from mics.config import parse_config
from store import RunStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def config():
    return parse_config(sim_config())


@pytest.fixture
def run_store(tmp_path: Path) -> Iterator[RunStore]:
    """A real, writable LMDB run store in tmp_path (what the call gate stores into)."""
    with RunStore.open(tmp_path / "run", create=True) as store:
        yield store


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


@pytest.fixture
def chiron() -> Path:
    if not (CHIRON / "demo.jsonl").is_file():
        pytest.fail(f"the Chiron demo data is missing: {CHIRON} (tests need ../shared next to "
                    "the repository; .ci/run says so before running)")
    return CHIRON
