"""SIMULATOR: deterministic stand-in models for demos, tests and benchmarks. Not a real model.

Every reply is a pure function of (seed, model, prompt text, sampling, sample index), computed
from the prompt text alone, so the in-process backend and the loopback HTTP test server give
the same replies:

- a simulated **mentor** writes well-formed `### Step k:` chains that continue the reasoning
  prefix; each step carries a clue with probability `quality`, and the chain ends with
  `### The final answer is: <answer>`. By default a clue states the answer ("points toward:
  <answer>"), so every clue step leaks it (mics.leaks). With `leak_rate` set, a clue states it
  only with that probability; otherwise it is an "evidence code" (the answer hex-encoded) that
  a simulated intern decodes but that names nothing, so the demo shows leaks being caught;
- a simulated **intern** answers correctly with a probability that rises with the number of
  clues in the prefix (times its `skill`, lowered at high temperature);
- a simulated **judge** says Yes when the normalised answers match.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from mics.steps import FINAL_MARKER, count_steps, normalize_answer

CLUE = "points toward:"
CODE = "evidence code:"
_PREFIX_MARK = "Reasoning prefix:"

_OBSERVATIONS = (
    "Review the clinical presentation and the patient's age and sex",
    "Inspect the images systematically for the dominant abnormality",
    "Characterise the lesion's location, margins and density",
    "Compare the findings with the expected normal anatomy",
    "Weigh the differential diagnoses against the imaging pattern",
    "Relate the imaging pattern to the presenting symptoms",
    "Exclude the main mimics using the distribution of findings",
)

_DISTRACTORS = (
    "Normal study without acute abnormality",
    "Benign incidental finding requiring no follow-up",
    "Inflammatory process, likely infectious",
    "Degenerative change",
    "Metastatic disease",
    "Post-operative change",
)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _after(text: str, marker: str) -> str:
    idx = text.rfind(marker)
    return text[idx + len(marker) :] if idx >= 0 else ""


def _field(text: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else ""


def mentor_reply(
    text: str,
    *,
    seed: int,
    model: str,
    temperature: float,
    sample_index: int = 0,
    quality: float = 0.5,
    malformed_rate: float = 0.0,
    leak_rate: float | None = None,
) -> str:
    """Continue the reasoning prefix in a mentor prompt with 1-4 new steps and the answer."""
    answer = _field(text, "Correct answer:").rstrip(".") or "unknown"
    prefix = _after(text, _PREFIX_MARK)
    done = count_steps(prefix)
    rng = _rng("mentor", seed, model, text, temperature, sample_index)
    if rng.random() < malformed_rate:
        return "I think the answer is probably related to the imaging findings."
    new = rng.randint(2, 4) if done == 0 else rng.randint(1, 3)
    steps = []
    for k in range(done + 1, done + new + 1):
        sentence = rng.choice(_OBSERVATIONS)
        clue = f" This {CLUE} {answer}." if rng.random() < quality else ""
        if clue and leak_rate is not None and rng.random() >= leak_rate:
            clue = f" The {CODE} {answer.encode().hex()}."
        steps.append(f"### Step {k}: {sentence}.{clue}")
    steps.append(f"{FINAL_MARKER} {answer}")
    return "\n\n".join(steps)


def intern_reply(
    text: str,
    *,
    seed: int,
    model: str,
    temperature: float,
    sample_index: int = 0,
    skill: float = 0.8,
) -> str:
    """Answer from the clues in the prefix; more clues, higher skill -> more often right."""
    prefix = _after(text, _PREFIX_MARK)
    clues = [_decode(kind, c.strip().rstrip(".")) for kind, c in re.findall(
        rf"({CLUE}|{CODE})\s*([^\n]+?)(?:\.\s|\.$|\n|$)", prefix)]
    rng = _rng("intern", seed, model, text, temperature, sample_index)
    p = skill * (1 - 0.35 ** len(clues)) * (1 - 0.1 * max(0.0, temperature - 0.5))
    if clues and rng.random() < p:
        return f"{FINAL_MARKER} {clues[-1]}"
    if rng.random() < 0.05:
        return "The findings are difficult to interpret."  # no marker: counted wrong
    return f"{FINAL_MARKER} {rng.choice(_DISTRACTORS)}"


def _decode(kind: str, clue: str) -> str:
    if kind != CODE:
        return clue
    try:
        return bytes.fromhex(clue).decode()
    except ValueError:
        return clue


def judge_reply(text: str, *, seed: int = 0, model: str = "", temperature: float = 0.0,
                sample_index: int = 0, unparsable_rate: float | None = None) -> str:
    """Yes when the normalised model answer equals or contains the correct answer."""
    if unparsable_rate and _rng("judge", seed, model, text, temperature,
                                sample_index).random() < unparsable_rate:
        return "<think>\nLet me compare the two answers.\n</think>\nThey match."
    got = normalize_answer(_field(text, "Model answer:"))
    want = normalize_answer(_field(text, "Correct answer:"))
    return "Yes" if got and want and (got == want or want in got) else "No"


ROLES = ("mentor", "intern", "judge")


@dataclass(frozen=True)
class SimulatedOptions:
    """Options of every simulated role: the seed of its replies and a fixed latency per call
    (reported in usage, never part of the memo key)."""

    seed: int = 0
    latency_s: float = 0.0


@dataclass(frozen=True)
class MentorOptions(SimulatedOptions):
    """quality: chance that a step carries a clue; malformed_rate: chance of a reply without
    steps; leak_rate: chance that a clue states the answer (None: every clue does)."""

    quality: float = 0.5
    malformed_rate: float = 0.0
    leak_rate: float | None = None


@dataclass(frozen=True)
class InternOptions(SimulatedOptions):
    """skill: how often the intern turns the clues of a prefix into the right answer."""

    skill: float = 0.8


@dataclass(frozen=True)
class JudgeOptions(SimulatedOptions):
    """The judge compares normalised answers. unparsable_rate: chance that a reply opens with
    neither Yes nor No (as a thinking model's `<think>` does; None: never)."""

    unparsable_rate: float | None = None


# The one role table: each role's options class. `ROLE_OPTIONS` (each role's own options and
# their defaults, `seed` and `latency_s` left out: every role accepts them) is read by the
# in-process backend (backends.simulated) and the loopback server (bench.loopback) alike.
OPTION_TYPES: dict[str, type[SimulatedOptions]] = {
    "mentor": MentorOptions, "intern": InternOptions, "judge": JudgeOptions,
}
_COMMON = tuple(f.name for f in fields(SimulatedOptions))
ROLE_OPTIONS: dict[str, dict[str, float | None]] = {
    role: {f.name: f.default for f in fields(cls) if f.name not in _COMMON}  # type: ignore[misc]
    for role, cls in OPTION_TYPES.items()
}


def reply(role: str, text: str, options: Mapping[str, Any], *, seed: int, model: str,
          temperature: float, sample_index: int = 0) -> str:
    """The reply of a simulated `role` model with `options` (see ROLE_OPTIONS) to `text`."""
    common = {"seed": seed, "model": model, "temperature": temperature,
              "sample_index": sample_index}
    if role == "mentor":
        return mentor_reply(text, quality=options["quality"],
                            malformed_rate=options["malformed_rate"],
                            leak_rate=options["leak_rate"], **common)
    if role == "intern":
        return intern_reply(text, skill=options["skill"], **common)
    return judge_reply(text, unparsable_rate=options.get("unparsable_rate"), **common)


def token_count(text: str) -> int:
    """A rough, deterministic token count for simulated usage."""
    return max(1, len(text) // 4)
