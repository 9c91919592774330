"""Issue 15: the engine's CPU savings change when work is done, never what is computed."""

from __future__ import annotations

import gc

from mics.answers import _lower, answer_key
from mics.gc_quiet import GEN0_THRESHOLD, quiet_gc


def _slow_key(answer: str) -> str:
    return " ".join("".join(_lower(c) for c in answer).split())


def test_answer_key_fast_path_equals_the_per_character_rule() -> None:
    cases = ["HER2+", "  Left   Kidney\t", "A", "", "T2N0M0", "-5 %", "İstanbul", "ΟΔΟΣ",
             "Straße", "ﬁ ligature", "Mixed ASCII and İ"]
    for answer in cases:
        assert answer_key(answer) == _slow_key(answer), answer
    assert answer_key("İ") != answer_key("i̇")  # a length-changing mapping never merges


def test_quiet_gc_freezes_once_and_restores_everything() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with quiet_gc():
        assert gc.get_threshold()[0] == max(before[0], GEN0_THRESHOLD)
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with quiet_gc():  # nested: no second freeze, thresholds kept
            assert gc.get_freeze_count() == frozen
        assert gc.get_threshold()[0] == max(before[0], GEN0_THRESHOLD)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_quiet_gc_restores_after_an_error() -> None:
    before = gc.get_threshold()
    try:
        with quiet_gc():
            raise ValueError("boom")
    except ValueError:
        pass
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
