"""Answer text as the judge's cache and the `exact` judge see it.

`answer_key` is the verdict-cache key: case folded and whitespace collapsed, nothing else
removed, so two answers a judge could tell apart (`HER2+` / `HER2-`, `-5` / `5`, `A` / ``)
never share a verdict. `answer_tokens` is the canonical form the `exact` judge compares:
numbers as numbers with their sign (percentages, fractions and ranges kept distinct), receptor
and staging strings verbatim (`her2+`, `er-`, `t2n0m0`), laterality and negation kept.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

LATERALITY = frozenset({"left", "right", "bilateral", "unilateral", "sinistral", "dextral"})
NEGATIONS = frozenset({"no", "not", "without", "absent", "absence", "negative", "non", "never",
                       "unlikely", "excluded", "ruled"})
_DROPPED = frozenset({"the", "an"})  # "a" is kept: "Hepatitis A" is not "Hepatitis"

_NUM = r"[+\-\u2212]?\d+(?:[.,]\d+)?"
_NUMERIC = re.compile(
    rf"(?<![\w.])(?P<a>{_NUM})\s*(?:(?P<frac>/)\s*(?P<den>\d+)"
    rf"|(?P<range>-|\u2013|\u2014|\bto\b)\s*(?P<b>{_NUM}))?\s*(?P<pct>%|\bpercent\b)?"
    r"(?![\w])")
_WORD = re.compile(r"[^\W_]+(?:[+\-\u2212](?![\w]))*")
# a marker (upper-case short name or letters+digits) followed by positive/negative
_SIGN_WORD = re.compile(r"\b([A-Z][A-Za-z]{0,4}\d?|[A-Za-z]+\d+)[\s\-]+((?i:positive|negative))\b")


def answer_key(answer: str) -> str:
    """Verdict-cache key: lower-cased (one character for one) and whitespace collapsed."""
    if answer.isascii():  # ASCII lower-casing is always one character for one
        return " ".join(answer.lower().split())
    return " ".join("".join(_lower(c) for c in answer).split())


def _lower(c: str) -> str:
    low = c.lower()
    return low if len(low) == 1 else c  # never merge by a length-changing case mapping


def _number(text: str) -> str:
    t = text.replace("\u2212", "-").replace(",", ".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return t
    return format(d.normalize(), "f") if d != 0 else "0"


def _numeric_token(m: re.Match[str]) -> str:
    a = _number(m.group("a"))
    pct = "%" if m.group("pct") else ""
    if m.group("frac"):
        den = int(m.group("den"))
        value = Fraction(int(Decimal(a)), den) if den and "." not in a else None
        return f"frac:{value}{pct}" if value is not None else f"frac:{a}/{den}{pct}"
    if m.group("range"):
        return f"range:{a}:{_number(m.group('b'))}{pct}"
    return f"num:{a}{pct}"


def answer_tokens(answer: str) -> tuple[str, ...]:
    """Canonical tokens: numbers as values with sign, words lower-cased with `+`/`-` suffixes
    kept, `HER2 positive` read as `her2+`; punctuation between words dropped."""
    text = _SIGN_WORD.sub(lambda m: m.group(1) + ("+" if m.group(2).lower() == "positive"
                                                  else "-"), answer).casefold()
    tokens: list[str] = []
    pos = 0
    for m in _NUMERIC.finditer(text):
        tokens += _words(text[pos:m.start()])
        tokens.append(_numeric_token(m))
        pos = m.end()
    tokens += _words(text[pos:])
    while tokens and tokens[0] == "a" and len(tokens) > 1 and not tokens[1].startswith(
            ("num:", "frac:", "range:")):
        tokens.pop(0)  # a leading article ("a pneumothorax"), never "vitamin a"
    return tuple(tokens)


def _words(text: str) -> list[str]:
    return [w.replace("\u2212", "-") for w in _WORD.findall(text) if w not in _DROPPED]
