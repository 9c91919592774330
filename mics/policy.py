"""The MICS rules as pure functions: score, stop, select. No I/O, no asyncio.

Randomness comes only from the `random.Random` passed in, seeded per question (B14).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Scored:
    """A candidate step's result: how many intern samples reached the right answer."""

    mentor: str
    correct: int
    total: int

    @property
    def score(self) -> float:
        return mics_score(self.correct, self.total)

    @property
    def full(self) -> bool:
        return self.total > 0 and self.correct == self.total


DecisionKind = Literal["full_score", "all_zero", "continue", "max_depth", "no_candidates"]


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    chosen: str | None = None


def question_rng(run_seed: int, qid: str, attempt: int = 0) -> random.Random:
    """An RNG seeded by (run seed, question id, attempt), independent of run order."""
    digest = hashlib.sha256(f"{run_seed}\x00{qid}\x00{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def mics_score(correct: int, total: int) -> float:
    """MICS-Score: correct samples / (samples per intern x interns). A sample without a final
    answer counts as wrong; one whose call failed is never scored under the default
    `on_call_failure = "defer"` (the depth waits for resume) and counts as wrong only under
    `"count_wrong"`, the reference's rule."""
    if total <= 0:
        return 0.0
    return correct / total


def select_full_score(
    full: Sequence[Scored], past_scores: Mapping[str, Sequence[float | None]],
    rng: random.Random
) -> str:
    """Among full-score candidates only (B1, B2): highest cumulative score (a depth where the
    mentor had no candidate adds nothing), then seeded random."""
    if len(full) == 1:
        return full[0].mentor
    totals = {c.mentor: sum(s for s in past_scores.get(c.mentor, ()) if s is not None)
              for c in full}
    best = max(totals.values())
    tied = [c.mentor for c in full if totals[c.mentor] == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def select_next(
    candidates: Sequence[Scored], previous: Sequence[str], rng: random.Random
) -> str:
    """Argmax score; ties prefer mentors not chosen before, then a seeded random choice."""
    best = max(c.correct / c.total if c.total else 0.0 for c in candidates)
    tied = [c.mentor for c in candidates if (c.correct / c.total if c.total else 0.0) == best]
    if len(tied) == 1:
        return tied[0]
    fresh = [m for m in tied if m not in previous]
    return rng.choice(fresh or tied)


def decide(
    candidates: Sequence[Scored],
    *,
    depth: int,
    max_depth: int,
    previous: Sequence[str],
    past_scores: Mapping[str, Sequence[float | None]],
    rng: random.Random,
) -> Decision:
    """Apply the MICS decision for one depth (0-based) to its scored candidates."""
    if not candidates:
        return Decision("no_candidates")
    full = [c for c in candidates if c.full]
    if full:
        return Decision("full_score", select_full_score(full, past_scores, rng))
    if all(c.correct == 0 for c in candidates):
        return Decision("all_zero")
    chosen = select_next(candidates, previous, rng)
    if depth + 1 >= max_depth:
        return Decision("max_depth", chosen)
    return Decision("continue", chosen)


def root_step_count(depth: int, root_steps: int) -> int:
    """How many steps a candidate holds: `root_steps` at the root, one afterwards."""
    return root_steps if depth == 0 else 1
