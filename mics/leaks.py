"""The answer-leak rule: does a reasoning step state the ground truth before the final line?

Mentors are shown the correct answer (spec B20); a step that states it lets interns copy it, so
its MICS-Score says nothing about the reasoning. A step leaks when, in its text before any
`### The final answer is:` line,
- the whole ground truth appears as a run of canonical tokens (mics.answers.answer_tokens:
  case, punctuation and articles aside; numbers, signs and sides kept), or
- enough of the ground truth's distinctive content words appear: all of them when it has up to
  three, at least 60 % (and at least three) otherwise. Content words are the words of the ground
  truth outside parentheses, minus function words, laterality and generic clinical words
  ("disease", "finding", ...); a step word matches a content word when equal, or when both
  are at least five letters long and share their first five letters (`enlarged`/`enlargement`).
A multiple-choice ground truth ("B", "B. Pneumonia") leaks when a step names the letter as the
answer ("answer is B", "option (B)") or states the option's text as above.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from mics.answers import LATERALITY, answer_tokens
from mics.steps import FINAL_MARKER

_FUNCTION_TEXT = """
a an the of with and or to due in on at by for from through between into within without as is
are was were be been being this that these those its it their there which who whose than then
also both either neither not no nor but if so such any all some other one two associated
potential possible probable likely suspected consistent compatible secondary primary type
"""
_GENERIC_TEXT = """
disease diseases disorder syndrome lesion lesions mass masses finding findings condition patient
abnormality abnormalities process change changes pathology diagnosis case sign signs evidence
benign acute chronic confirmed biopsy related normal study
"""
FUNCTION_WORDS = frozenset(_FUNCTION_TEXT.split())
GENERIC_WORDS = frozenset(_GENERIC_TEXT.split())
_LETTER_GOLD = re.compile(r"^\s*[(\[]?([A-J])(?:[)\].:]\s*|\s*$)", re.I)
_PREFIX = 5


def content_words(answer: str) -> list[str]:
    """The distinctive words of a ground truth (outside parentheses), in order, no repeats."""
    main = re.sub(r"\([^)]*\)", " ", answer)
    out: list[str] = []
    for tok in answer_tokens(main):
        word = tok.rstrip("+-")
        if (tok.startswith(("num:", "frac:", "range:")) or len(word) < 3 or word.isdigit()
                or word in FUNCTION_WORDS or word in GENERIC_WORDS or word in LATERALITY):
            continue
        if tok not in out:
            out.append(tok)
    return out


def _word_in(word: str, tokens: set[str], stems: set[str]) -> bool:
    if word in tokens:
        return True
    return len(word) >= _PREFIX and word[:_PREFIX] in stems


def before_final(text: str) -> str:
    """A step's text before its final-answer line (all of it when there is none)."""
    idx = text.lower().find(FINAL_MARKER.lower())
    return text if idx < 0 else text[:idx]


@lru_cache(maxsize=4096)
def _gold(ground_truth: str) -> tuple[str | None, tuple[str, ...], bool, tuple[str, ...]]:
    """What the rule needs of a ground truth, worked out once per ground truth: its choice
    letter (if any), its canonical tokens, whether they are distinctive, its content words."""
    gold = ground_truth.strip()
    letter = None
    if (m := _LETTER_GOLD.match(gold)) is not None:
        letter = m.group(1)
        gold = gold[m.end():].strip()
        if not gold:
            return letter, (), False, ()
    gold_tokens = answer_tokens(re.sub(r"\([^)]*\)", " ", gold)) or answer_tokens(gold)
    words = tuple(content_words(gold))
    n = len(gold_tokens)
    distinctive = n > 1 or (n == 1 and (gold_tokens[0] in words
                                         or not gold_tokens[0].isalpha()))
    return letter, gold_tokens, distinctive, words


@lru_cache(maxsize=8192)
def leaks_answer(step: str, ground_truth: str) -> bool:
    """Whether `step` states `ground_truth` before the final-answer line (see module doc).

    A pure function of the two strings, kept for recent pairs: a step is checked when it is
    proposed and again whenever its chain is reused (in the fast loop, 1,800 checks of 620
    distinct pairs)."""
    text = before_final(step)
    if not ground_truth.strip() or not text.strip():
        return False
    letter, gold_tokens, distinctive, words = _gold(ground_truth)
    if letter is not None:
        named = re.search(rf"\b(?:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*[(\[]?"
                          rf"{letter}\b(?![.\w]\w)", text, re.I)
        if named:
            return True
        if not gold_tokens and not words:
            return False
    step_tokens = answer_tokens(text)
    n = len(gold_tokens)
    if distinctive and any(step_tokens[i:i + n] == gold_tokens
                           for i in range(len(step_tokens) - n + 1)):
        return True
    if not words:
        return False
    have = set(step_tokens)
    stems = {t[:_PREFIX] for t in have if len(t) >= _PREFIX}
    hits = sum(_word_in(w, have, stems) for w in words)
    need = len(words) if len(words) <= 3 else max(3, math.ceil(0.6 * len(words)))
    return hits >= need
