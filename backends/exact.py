"""The offline `exact` judge: Yes/No from string matching, no model call.

Reads the "Model answer:" and "Correct answer:" fields of a judge prompt (mics.prompts) and says
Yes when both name the same multiple-choice letter (gold "B" or "B. Pneumonia" vs "(B)", "B.",
"B) ...", "Option B", "Answer: B"), or when the canonical tokens (mics.answers.answer_tokens)
are equal or the correct answer's tokens occur as a run in the model answer's, provided the
model answer adds no negation and names the same side (left/right/bilateral) as the correct
answer when that names one, and names one answer: an answer that hedges ("pneumonia or
tuberculosis", "(A) or (B)") or lists numbers ("5, 10, 15, 20" for 10) is not the correct one.
Numbers compare as numbers with their sign (`-5` is not `5`,
`1.5` is not `1-5`, `2/3` is not `2.3`, `0.50` is `0.5`); receptor and staging strings
compare exactly (`HER2+` is not `HER2-`, `T2N0M0` is not `T2N1M0`).
"""

from __future__ import annotations

import re
from typing import Any

from backends.base import Call
from mics.answers import LATERALITY, NEGATIONS, answer_tokens
from mics.config import ModelConfig
from mics.types import Reply, Usage

_FIELDS = re.compile(r"Model answer:(.*?)\n\s*Correct answer:(.*?)(?:\n\s*\n|\Z)", re.S)
# "(B)", "B", "B." / "B)" / "B:" before text; or "Option B", "the answer is (B)".
_LETTER = re.compile(r"^\s*[(\[]?([A-J])(?:[)\].:]|\s*$)", re.I)
_KEYWORD_LETTER = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+)?(?:option|choice|answer)(?:\s+is)?\s*[:\-]?\s*"
    r"[(\[]?([A-J])\b", re.I)


def fields(text: str) -> tuple[str, str]:
    """(model answer, correct answer) from a judge prompt's text; empty strings if absent."""
    m = _FIELDS.search(text)
    return (m.group(1).strip(), m.group(2).strip()) if m else ("", "")


def choice_letter(answer: str, *, gold: bool = False) -> str | None:
    """The multiple-choice letter an answer names, upper-cased, or None.

    In a model answer a lower-case letter followed by "." does not count ("e.g.", "i.e.").
    """
    m = _KEYWORD_LETTER.match(answer)
    if m:
        return m.group(1).upper()
    m = _LETTER.match(answer)
    if not m:
        return None
    letter = m.group(1)
    if letter.islower() and not gold and m.group(0).endswith("."):
        return None  # "e.g.", "i.e."
    return letter.upper()


# A second option letter in the model answer: bracketed ("(A) or (B)") or after "or", "and",
# "vs" or a separator ("A, B", "A/B", "either A or B"); a capital "A" opening a sentence is an
# article, not an option.
_OTHER_LETTER = re.compile(r"[(\[]([A-J])[)\]]|(?:\bor|\band|\bvs\.?|\bversus|[,/;&])\s*"
                           r"([A-J])(?![\w'\-])")
_ALTERNATIVES = frozenset({"or", "either", "nor", "versus", "vs"})
_NUMERIC_TOKEN = ("num:", "frac:", "range:")


def _letters(answer: str, first: str) -> set[str]:
    """Every option letter the model answer names: the leading one and any later one."""
    found = {first}
    for m in _OTHER_LETTER.finditer(answer):
        found.add((m.group(1) or m.group(2)).upper())
    return found


def _without_letter(answer: str) -> str:
    return re.sub(r"^\s*[(\[]?[A-J](?:[)\].:]\s*|\s*$)", "", answer, flags=re.I)


def matches(model_answer: str, correct: str) -> bool:
    """Same choice letter, or equal canonical tokens / the correct answer's tokens as a run."""
    gold_letter = choice_letter(correct, gold=True)
    if gold_letter:
        letter = choice_letter(model_answer)
        if letter:  # both name a letter: the letters decide, and it must be one letter
            return _letters(model_answer, letter) == {gold_letter}
        correct = _without_letter(correct)  # "B. Pneumonia" -> "Pneumonia"
    got, want = answer_tokens(model_answer), answer_tokens(correct)
    if not got or not want:
        return False
    if got == want:
        return True
    sides = set(want) & LATERALITY
    if sides and set(got) & LATERALITY != sides:
        return False  # a side the correct answer names is never ignored
    if (set(got) & NEGATIONS) - set(want):
        return False  # "no pneumonia" does not contain "pneumonia"
    if (set(got) & _ALTERNATIVES) - set(want):
        return False  # "pneumonia or tuberculosis" hedges; it does not answer "pneumonia"
    if any(t.startswith(_NUMERIC_TOKEN) for t in want) and {
            t for t in got if t.startswith(_NUMERIC_TOKEN)} - set(want):
        return False  # "5, 10, 15, 20" lists numbers; it does not answer "10"
    n = len(want)
    return any(got[i:i + n] == want for i in range(len(got) - n + 1))


class ExactJudge:
    """A ChatModel that grades by string matching (offline, deterministic, free)."""

    def __init__(self, config: ModelConfig, role: str = "judge") -> None:
        if config.options:
            raise ValueError(f"model {config.name!r}: the exact judge takes no options "
                             f"(got {', '.join(sorted(config.options))})")
        self.config = config
        self.role = role

    def identity(self) -> dict[str, Any]:
        # rules 2: issue 10 (signs, numbers, sides); 3: hedged and listed answers never match
        return {"backend": "exact", "rules": 3}

    async def complete(self, call: Call) -> Reply:
        got, want = fields(call.prompt.user_text())
        return Reply(text="Yes" if matches(got, want) else "No", usage=Usage())

    async def aclose(self) -> None:
        return None
