"""Re-export of the random-model builders, which live in `bench/models.py`."""

from bench.models import (  # noqa: F401
    CHAT_TEMPLATE,
    QWEN2_05B_SIZES,
    TEXT_SPECIALS,
    VL_SPECIALS,
    build_qwen2_05b_shape,
    build_tiny_lm,
    build_tiny_qwen2_vl,
    build_tokenizer,
)
