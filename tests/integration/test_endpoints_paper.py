"""examples/paper.toml, as shipped, against strict loopback stand-ins for each of its real
targets: `mics doctor` passes, and without the Gemini options it fails the way Gemini would."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import ROOT

from bench.loopback import LoopbackServer
from mics.config import RunConfig, load_config
from mics.doctor import doctor

TARGETS = {"gpt-4o": "openai", "gemini-2.5-pro": "gemini", "qwen2.5-vl-72b-instruct": "dashscope",
           "deepseek-chat": "deepseek"}
# intern served name -> (strict SGLang version, launch path the server reports)
INTERNS = {"qwen2.5-vl-7b": ("0.5.2", "/models/Qwen2.5-VL-7B-Instruct"),
           "qwen2-vl-7b": ("0.5.6", "/models/Qwen2-VL-7B-Instruct"),
           "internvl3-8b": ("0.5.7", "/models/InternVL3-8B")}


def served() -> dict[str, Any]:
    roles = {"deepseek-chat": "judge"}
    models: dict[str, Any] = {m: {"role": roles.get(m, "mentor"), "target": t}
                              for m, t in TARGETS.items()}
    for name, (version, path) in INTERNS.items():
        models[name] = {"role": "intern", "target": "sglang", "version": version,
                        "model_path": path, "family": "internvl" if "internvl" in name
                        else "qwen2-vl"}
    return models


def on_loopback(cfg: RunConfig, srv: LoopbackServer, tok: Path) -> RunConfig:
    """The paper config with every base_url on the loopback server (and a local tokenizer)."""
    mentors = tuple(replace(m, base_url=f"{srv.url}/v1") for m in cfg.mentors)
    interns = tuple(replace(i, base_url=srv.url_for(i.name),
                            options={**i.options, "tokenizer": str(tok)}) for i in cfg.interns)
    return replace(cfg, mentors=mentors, interns=interns,
                   judge=replace(cfg.judge, base_url=f"{srv.url}/v1"))


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "GEMINI_API_KEY", "DASHSCOPE_API_KEY", "DEEPSEEK_API_KEY"):
        monkeypatch.setenv(var, "test-key")


def test_paper_config_passes_doctor_against_strict_targets(keys, tokenizer_dir):
    cfg = load_config(ROOT / "examples" / "paper.toml")
    with LoopbackServer(served()) as srv:
        checks = anyio.run(doctor, on_loopback(cfg, srv, tokenizer_dir))
        bare = replace(cfg, mentors=tuple(replace(m, options={}) for m in cfg.mentors))
        without = anyio.run(doctor, on_loopback(bare, srv, tokenizer_dir))
    assert all(c.ok for c in checks), [(c.name, c.message) for c in checks if not c.ok]
    by_name = {c.name: c for c in checks}
    assert "SGLang 0.5.2" in by_name["qwen2.5-vl-7b"].message
    assert "512 px" in by_name["gpt-4o"].message
    failed = {c.name: c.message for c in without if not c.ok}
    assert set(failed) == {"gemini"} and "empty reply" in failed["gemini"]
