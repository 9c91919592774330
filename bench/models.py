"""Random models built offline for tests and benchmarks (tiny Qwen2, Qwen2-VL, Qwen2.5-VL).

The builders are deterministic: the same seed writes byte-identical folders. Weights use
`initializer_range=0.2` and an untied output head, so greedy output is not degenerate.
torch/transformers are imported inside the builders only. Tests get them through the
session fixtures in `tests/conftest.py`.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

TEXT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VL_SPECIALS = TEXT_SPECIALS + (
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

# ChatML; a message's content is a string or a list of {"type": "text"|"image"} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_TEXT_SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128}
# Qwen2-0.5B's shape with a 2048-token vocabulary (about 362M parameters, 1.45 GB in float32).
QWEN2_05B_SIZES = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "intermediate_size": 4864}


def _training_files(n: int = 60) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(stdlib.glob("*.py"))[:n]]


def build_tokenizer(specials: tuple[str, ...] = TEXT_SPECIALS) -> Any:
    """A byte-level BPE (vocab 2048) trained on stdlib sources, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(_training_files(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _special_ids(tok: Any) -> dict[str, int | None]:
    return {"eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "bos_token_id": None}


def _save(model: Any, tok: Any, out: Path, ids: dict[str, int | None]) -> Path:
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_tiny_lm(directory: str | Path, seed: int = 0) -> Path:
    """A 336k-parameter Qwen2 causal LM with its tokenizer, saved into `directory`."""
    return _build_qwen2(directory, seed, _TEXT_SIZES)


def build_qwen2_05b_shape(directory: str | Path, seed: int = 0) -> Path:
    """A random Qwen2 of Qwen2-0.5B's shape (vocab 2048) with its tokenizer, saved (1.45 GB)."""
    return _build_qwen2(directory, seed, QWEN2_05B_SIZES)


def _build_qwen2(directory: str | Path, seed: int, sizes: dict[str, int]) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    ids = _special_ids(tok)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok), max_position_embeddings=2048, initializer_range=0.2,
        tie_word_embeddings=False, **sizes, **ids,
    )
    return _save(Qwen2ForCausalLM(config).eval(), tok, Path(directory), ids)


def build_tiny_qwen2_vl(directory: str | Path, seed: int = 0) -> Path:
    """A 416k-parameter Qwen2-VL with tokenizer and PIL image processor, saved into `directory`."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = build_tokenizer(VL_SPECIALS)
    ids = _special_ids(tok)
    text_config = {
        "vocab_size": len(tok), "max_position_embeddings": 4096, "initializer_range": 0.2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [2, 3, 3]},
        **_TEXT_SIZES, **ids,
    }
    vision_config = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                     "mlp_ratio": 2, "initializer_range": 0.2}
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    out = _save(Qwen2VLForConditionalGeneration(config).eval(), tok, Path(directory), ids)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(out)
    return out
