"""The Jinja-free chat-template renderer equals `apply_chat_template` for every family."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from backends.chat_templates import compile_template, jinja_render, render_prompt
from bench.parts import INTERNVL_TEMPLATE, QWEN2_VL_TEMPLATE
from mics.config import ModelConfig
from mics.types import Image, ImageRef, Prompt, Text

pytest.importorskip("transformers")

# Verbatim from the model repos' tokenizer / chat_template files.
QWEN2_VL = QWEN2_VL_TEMPLATE  # as bench parts renders it
QWEN2_TEXT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL = INTERNVL_TEMPLATE  # InternVL2's InternLM2 chat models
TRIMMING = (  # content-dependent (Llama-3 style): must fall back to Jinja
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SKIPS_EMPTY_SYSTEM = (
    "{% for message in messages %}{% if message['content'] %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = ["Step", "1:", "the", "{{", "}}", "{%", "%}", "\n", "\n\n", " ", "<|im_end|>", "é",
          "### ", "'", '"', "\\", "None", "findings", "\t", "<image>"]


def _tokenizer(path: Path, template: str):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    return tok


def _prompts(n: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    img = ImageRef(path="x.png", sha256="a" * 64, mime="image/png", width=4, height=4)
    out = []
    for _ in range(n):
        def text() -> str:
            return "".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 12)))
        parts: list[Text | Image] = []
        for _ in range(rng.randint(1, 5)):
            parts.append(Image(img) if rng.random() < 0.3 else Text(text()))
        out.append(Prompt(text() if rng.random() < 0.9 else "", tuple(parts)))
    return out


@pytest.mark.parametrize("family,template", [
    ("qwen2-vl", None), ("text", None), ("internvl", None),
    ("qwen2-vl", QWEN2_VL), ("text", QWEN2_TEXT), ("text", QWEN2_VL),
    ("internvl", INTERNVL), ("internvl", QWEN2_TEXT),
])
def test_compiled_rendering_equals_apply_chat_template(tokenizer_dir: Path, family: str,
                                                       template: str | None) -> None:
    tok = _tokenizer(tokenizer_dir, template) if template else _tokenizer(
        tokenizer_dir, __import__("bench.models").models.CHAT_TEMPLATE)
    assert compile_template(tok, family) is not None
    for prompt in _prompts(200, seed=len(family)):
        assert render_prompt(tok, family, prompt) == jinja_render(tok, prompt, family)


@pytest.mark.parametrize("template", [TRIMMING, SKIPS_EMPTY_SYSTEM])
def test_content_dependent_templates_fall_back_to_jinja(tokenizer_dir: Path,
                                                        template: str) -> None:
    tok = _tokenizer(tokenizer_dir, template)
    assert compile_template(tok, "text") is None
    assert render_prompt(tok, "text", Prompt("s", (Text(" a "),))) is None


def test_sglang_backend_renders_like_apply_chat_template(tokenizer_dir: Path) -> None:
    from backends.sglang import SGLangRollout
    from backends.template_source import load_chat_template

    reference = load_chat_template(str(tokenizer_dir), "i0")  # loaded apart from the model's
    for family in ("qwen2-vl", "internvl", "text"):
        model = SGLangRollout(ModelConfig(
            name="i0", backend="sglang", model="i0", base_url="http://127.0.0.1:9",
            options={"tokenizer": str(tokenizer_dir), "family": family,
                     "image_placeholder": "<image>"}))  # InternVL's: never guessed
        for prompt in _prompts(30, seed=7):
            assert model.render(prompt) == jinja_render(reference, prompt, family)
