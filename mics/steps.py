"""Parsing mentor chains into numbered steps and intern replies into final answers.

Steps are parsed structurally (`### Step k:` headings with their numbers), so an echoed prefix,
a `###` inside a step, or a chain that ends early cannot shift which step is taken (B3, B4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FINAL_MARKER = "### The final answer is:"

# A step heading (group 1: its number) at a line start, or where the final answer begins: a
# final-answer heading at a line start ("### The final answer is", "## Final Answer", ...), or
# the marker itself inside a line. A step never runs on into the answer: interns would see it.
_HEADING = re.compile(
    r"^[ \t]*#{2,4}[ \t]*Step[ \t]*(\d+)\b"
    r"|^[ \t]*#{1,4}[ \t]*(?:the[ \t]+)?final[ \t]+answer(?:[ \t]+is)?\b"
    r"|#{2,4}[ \t]*the[ \t]+final[ \t]+answer[ \t]+is\b", re.I | re.M)


@dataclass(frozen=True)
class ParsedChain:
    """A mentor reply split into numbered steps and an optional final-answer line."""

    steps: dict[int, str]  # step number -> full section text, starting with "### Step k"
    final: str | None  # the final-answer section text, starting with the marker

    def run(self, first: int, count: int) -> list[str] | None:
        """Steps first..first+count-1, or None if any of them is missing."""
        out = [self.steps.get(k) for k in range(first, first + count)]
        return None if any(s is None for s in out) else out  # type: ignore[misc]

    def continuation(self, first: int) -> str:
        """Steps from `first` onward plus the final answer: the mentor's completed part."""
        parts = [self.steps[k] for k in sorted(self.steps) if k >= first]
        if self.final:
            parts.append(self.final)
        return "\n\n".join(parts)


def parse_chain(text: str) -> ParsedChain:
    """Split a reply into `### Step k` sections and the final answer; later duplicates lose.
    A step ends where a final answer starts, even inside its own line, so no step carries
    the answer into the reasoning prefix that interns are scored on."""
    steps: dict[int, str] = {}
    final: str | None = None
    matches = list(_HEADING.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        section = _normalise_heading(text[m.start() : end].strip(), m)
        if m.group(1) is not None:
            steps.setdefault(int(m.group(1)), section)
        elif final is None:
            final = section
    return ParsedChain(steps=steps, final=final)


def _normalise_heading(section: str, m: re.Match[str]) -> str:
    if m.group(1) is not None:
        body = section[len(m.group(0).strip()) :].lstrip(" \t:")
        return f"### Step {int(m.group(1))}: {body}".rstrip()
    body = section[len(m.group(0).strip()) :].lstrip(" \t:")
    return f"{FINAL_MARKER} {body}".rstrip()


def before_last_step(text: str) -> str:
    """A chain up to its last `### Step k` heading (before its final answer when it has no
    step): what must not state the answer, since a chain may conclude with it in its last
    step but not reach it any earlier."""
    matches = list(_HEADING.finditer(text))
    steps = [m.start() for m in matches if m.group(1) is not None]
    if steps:
        return text[:steps[-1]]
    return text[:matches[0].start()] if matches else text


def count_steps(prefix: str) -> int:
    """Number of `### Step k` sections already in a reasoning prefix."""
    return len(parse_chain(prefix).steps)


def extract_final_answer(text: str | None) -> str | None:
    """Text after the last final-answer marker, stripped; None when absent or empty (B7)."""
    if not text:
        return None
    idx = text.lower().rfind(FINAL_MARKER.lower())
    if idx < 0:
        return None
    answer = text[idx + len(FINAL_MARKER) :].strip()
    return answer or None


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces. Loose: it merges `HER2+`
    and `HER2-`, so it never keys a verdict (see mics.answers.answer_key) and the exact judge
    does not use it; the simulator and analysis use it to compare answers roughly."""
    t = text.lower()
    t = re.sub(r"[^\w\s]", " ", t)
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())
