"""End to end: the engine, the call gate, the policy and a real LMDB store on scripted models,
each expected tree worked out by hand from the scripts and the MICS rules (docs/algorithm.md,
mics/policy.py), never by running the code.

The scripts (all three questions' worth of reasoning is fixed text, nothing is random):

- mentor `m0`, `m1`, `m2` owns a script of step texts. Asked with a reasoning prefix that
  already holds `d` steps, it writes its own steps d+1, d+2, ... to the end of its script, each
  as `### Step k: <text> (seen d)`, then `### The final answer is: Pneumothorax`. The
  `(seen d)` tells a re-asked step (written after the new path) from a reused one (written
  earlier, when the mentor saw fewer steps).
- intern `i0` / `i1` / `i2` answers `Pneumothorax` (right) when the prefix it is shown (path
  plus candidate) holds at least 1 / 2 / 3 `KEY` marks, else `Unknown` (wrong); it answers
  the same at both temperatures (1.2 and 0.2).
- the judge is the real simulated judge: Yes exactly when the answers match.

So with 3 interns x 2 temperatures = 6 samples, a candidate whose prefix holds c marks scores
2 * min(c, 3) / 6. The rules applied below: one full candidate stops the search with its
mentor's chain (`full_score`); several full ones: highest cumulative score, then seeded random;
all zero fails (`all_zero`) or, with `restart:N`, starts a fresh tree; otherwise the argmax
continues (ties: mentors not chosen before first), and at `max_depth` the argmax's chain is
the output. The root candidate holds two steps, later ones one; the mentor chosen at the last
depth is not asked again: its next step comes from the chain it wrote (reused). A fresh chain
is `path + "\\n" + continuation`; a reused candidate keeps its old chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import make_questions, sim_config

from backends.base import Call
from backends.gate import CallGate
from backends.simulated import SimulatedModel
from mics.config import ModelConfig, parse_config
from mics.engine import Engine, Models
from mics.steps import FINAL_MARKER, count_steps
from mics.types import ROOT_TEXT, Outcome, Reply, Text, Usage
from store import RunStore

ANSWER = "Pneumothorax"  # make_questions(1)[0].gt_answer
MARK = "KEY"
FINAL = f"{FINAL_MARKER} {ANSWER}"


def _prefix(call: Call) -> str:
    """The reasoning prefix of a mentor or intern prompt (its last part)."""
    text = "".join(p.text for p in call.prompt.parts if isinstance(p, Text))
    return text.rsplit("Reasoning prefix:", 1)[1].strip()


class ScriptedMentor:
    """Writes its script's steps after the ones already in the prefix (see module doc)."""

    def __init__(self, config: ModelConfig, script: Sequence[str],
                 restart: Sequence[str] | None = None) -> None:
        self.config, self.script, self.calls = config, tuple(script), 0
        self.restart = tuple(restart) if restart is not None else self.script

    def identity(self) -> dict[str, Any]:
        return {"backend": "scripted", "model": self.config.model, "script": self.script,
                "restart": self.restart}

    async def complete(self, call: Call) -> Reply:
        """The script; after a restart (a later attempt asks with a higher sample index: 2
        tries per attempt) the `restart` script."""
        self.calls += 1
        script = self.script if call.sample_index < 2 else self.restart
        seen = count_steps(_prefix(call))
        steps = [f"### Step {k}: {script[k - 1]} (seen {seen})"
                 for k in range(seen + 1, len(script) + 1)]
        return Reply(text="\n\n".join([*steps, FINAL]), usage=Usage())

    async def aclose(self) -> None:
        return None


class ScriptedIntern:
    """Right when the prefix holds at least `need` marks (see module doc)."""

    def __init__(self, config: ModelConfig, need: int) -> None:
        self.config, self.need = config, need

    def identity(self) -> dict[str, Any]:
        return {"backend": "scripted", "model": self.config.model, "need": self.need}

    async def rollout(self, calls: Sequence[Call]) -> list[Reply]:
        return [Reply(text=f"{FINAL_MARKER} "
                      + (ANSWER if _prefix(c).count(MARK) >= self.need else "Unknown"),
                      usage=Usage()) for c in calls]

    async def aclose(self) -> None:
        return None


def search(tmp_path: Path, scripts: Sequence[Sequence[str]],
           restarts: Sequence[Sequence[str]] | None = None, **settings: Any
           ) -> tuple[Outcome, list[dict[str, Any]], list[ScriptedMentor]]:
    """One question searched with mentors m0..m2 on `scripts` (`restarts` after a restart);
    its outcome, stored nodes (root left out) and the mentors."""
    cfg = parse_config(sim_config(**settings))
    mentors = [ScriptedMentor(m, s, r) for m, s, r in zip(
        cfg.mentors, scripts, restarts or [None] * len(scripts), strict=True)]
    models = Models(mentors=mentors,
                    interns=[ScriptedIntern(i, need) for i, need in zip(cfg.interns, (1, 2, 3),
                                                                         strict=True)],
                    judge=SimulatedModel(cfg.judge, "judge"))
    [q] = make_questions(1)
    with RunStore.open(tmp_path / "run", create=True) as store:
        gate = CallGate(store, session="test")
        [outcome] = anyio.run(lambda: Engine(cfg, store, models, gate).run([q]))
        assert store.get_question(q.qid)["outcome"] == outcome.to_dict()
        nodes = [n for n in store.get_nodes(q.qid) if n["depth"] >= 0]
    return outcome, nodes, mentors


def tree(nodes: list[dict[str, Any]]) -> list[tuple[int, str, int, bool, bool]]:
    """(depth, mentor, correct samples of 6, reused, chosen) per candidate."""
    return sorted((n["depth"], n["mentor"], n["correct"], n["reused"], n["chosen"])
                  for n in nodes if n["total"] == 6)


def test_full_score_at_depth_1(tmp_path: Path) -> None:
    """Depth 1 (two root steps): m0 holds 3 marks -> 6/6; m1 none -> 0/6; m2 one -> 2/6.
    Only m0 is full: stop, its whole chain, generated by m0."""
    outcome, nodes, _ = search(tmp_path, [
        ["KEY KEY lung edge", "KEY absent markings", "collapsed lobe"],
        ["normal heart", "clear angles", "no effusion"],
        ["KEY apex", "ribs intact", "no mass"],
    ])
    assert (outcome.status, outcome.stop_reason, outcome.final_depth) == (
        "succeeded", "full_score", 1)
    assert outcome.generated_by == ["m0"] and outcome.search_id == "1"
    assert outcome.scores == {"m0": [6 / 6], "m1": [0 / 6], "m2": [2 / 6]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY KEY lung edge (seen 0)\n\n"
        "### Step 2: KEY absent markings (seen 0)\n\n"
        "### Step 3: collapsed lobe (seen 0)\n\n"
        f"{FINAL}")
    assert tree(nodes) == [(0, "m0", 6, False, True), (0, "m1", 0, False, False),
                           (0, "m2", 2, False, False)]


def test_full_score_at_depth_2_with_a_reused_and_a_reasked_step(tmp_path: Path) -> None:
    """Depth 1: m0 2 marks -> 4/6, m1 1 -> 2/6, m2 0 -> 0/6: continue with m0 (argmax).
    Depth 2 (path: m0's steps 1-2, 2 marks): m0 is not asked again; its step 3 comes from its
    first chain, "(seen 0)", no mark -> 4/6. m1 and m2 are asked again with the 2-step path,
    "(seen 2)": m1's step 3 has a mark -> 3 marks -> 6/6; m2's none -> 4/6. Only m1 is full:
    its chain is the path, "\\n", then its continuation from step 3."""
    outcome, nodes, mentors = search(tmp_path, [
        ["KEY air", "KEY edge", "lobe", "shift"],
        ["KEY apex", "heart", "KEY pleural line", "no markings"],
        ["ribs", "angles", "effusion", "mass"],
    ])
    assert (outcome.status, outcome.stop_reason, outcome.final_depth) == (
        "succeeded", "full_score", 2)
    assert outcome.generated_by == ["m0", "m1"]
    assert outcome.scores == {"m0": [4 / 6, 4 / 6], "m1": [2 / 6, 6 / 6], "m2": [0 / 6, 4 / 6]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY air (seen 0)\n\n"
        "### Step 2: KEY edge (seen 0)\n"
        "### Step 3: KEY pleural line (seen 2)\n\n"
        "### Step 4: no markings (seen 2)\n\n"
        f"{FINAL}")
    assert tree(nodes) == [
        (0, "m0", 4, False, True), (0, "m1", 2, False, False), (0, "m2", 0, False, False),
        (1, "m0", 4, True, False), (1, "m1", 6, False, True), (1, "m2", 4, False, False)]
    steps = {(n["depth"], n["mentor"]): n["step"] for n in nodes}
    assert steps[1, "m0"] == "### Step 3: lobe (seen 0)"  # reused: written at depth 1
    assert steps[1, "m2"] == "### Step 3: effusion (seen 2)"  # re-asked after the new path
    assert [m.calls for m in mentors] == [1, 2, 2]  # the reused step cost no call


def test_full_score_at_depth_3(tmp_path: Path) -> None:
    """Depth 1: m0 1 mark -> 2/6, m1 and m2 none -> 0/6: continue with m0.
    Depth 2 (path 1 mark): m0 reused step 3, no mark -> 2/6; m1 asked, step 3 has a mark ->
    4/6; m2 asked, none -> 2/6: continue with m1.
    Depth 3 (path: m0's 1-2, m1's 3; 2 marks): m0 asked again (it is no longer the author),
    step 4 no mark -> 4/6; m1 reused step 4 from its depth-2 chain, no mark -> 4/6; m2 asked,
    step 4 has a mark -> 6/6: stop with m2's chain."""
    outcome, nodes, mentors = search(tmp_path, [
        ["KEY opacity", "air", "lobe", "shift", "edge"],
        ["apex", "heart", "KEY pleural line", "markings", "volume"],
        ["ribs", "angles", "effusion", "KEY collapse", "mass"],
    ])
    assert (outcome.stop_reason, outcome.final_depth) == ("full_score", 3)
    assert outcome.generated_by == ["m0", "m1", "m2"]
    assert outcome.scores == {"m0": [2 / 6, 2 / 6, 4 / 6], "m1": [0 / 6, 4 / 6, 4 / 6],
                              "m2": [0 / 6, 2 / 6, 6 / 6]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY opacity (seen 0)\n\n"
        "### Step 2: air (seen 0)\n"
        "### Step 3: KEY pleural line (seen 2)\n"
        "### Step 4: KEY collapse (seen 3)\n\n"
        "### Step 5: mass (seen 3)\n\n"
        f"{FINAL}")
    assert tree(nodes) == [
        (0, "m0", 2, False, True), (0, "m1", 0, False, False), (0, "m2", 0, False, False),
        (1, "m0", 2, True, False), (1, "m1", 4, False, True), (1, "m2", 2, False, False),
        (2, "m0", 4, False, False), (2, "m1", 4, True, False), (2, "m2", 6, False, True)]
    steps = {(n["depth"], n["mentor"]): n["step"] for n in nodes}
    assert steps[2, "m1"] == "### Step 4: markings (seen 2)"  # reused from its depth-2 reply
    assert steps[2, "m0"] == "### Step 4: shift (seen 3)"  # asked again after m1's step
    assert [m.calls for m in mentors] == [2, 2, 3]


def test_max_depth_takes_the_best_chain(tmp_path: Path) -> None:
    """max_depth = 2. Depth 1: m0 1 mark -> 2/6, others 0/6: continue with m0. Depth 2 (path
    1 mark): m0 reused, no mark -> 2/6; m1 asked, a mark -> 4/6; m2 asked, none -> 2/6. None
    is full and this is the last depth: m1's chain is the output (succeeded, `max_depth`)."""
    outcome, nodes, _ = search(tmp_path, [
        ["KEY opacity", "air", "lobe"],
        ["apex", "heart", "KEY pleural line", "markings"],
        ["ribs", "angles", "effusion"],
    ], max_depth=2)
    assert (outcome.status, outcome.stop_reason, outcome.final_depth) == (
        "succeeded", "max_depth", 2)
    assert outcome.generated_by == ["m0", "m1"] and outcome.search_id == "0"
    assert outcome.scores == {"m0": [2 / 6, 2 / 6], "m1": [0 / 6, 4 / 6],
                              "m2": [0 / 6, 2 / 6]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY opacity (seen 0)\n\n"
        "### Step 2: air (seen 0)\n"
        "### Step 3: KEY pleural line (seen 2)\n\n"
        "### Step 4: markings (seen 2)\n\n"
        f"{FINAL}")
    assert [d for d, *_ in tree(nodes)] == [0, 0, 0, 1, 1, 1]  # no third depth


def test_all_zero_fails_the_question(tmp_path: Path) -> None:
    """No mark anywhere: every root candidate scores 0/6, so the question fails at depth 1
    (`all_zero`, the default `on_all_zero = "fail"`) with no chain and no author."""
    outcome, nodes, mentors = search(tmp_path, [["a", "b", "c"], ["d", "e", "f"],
                                                ["g", "h", "i"]])
    assert (outcome.status, outcome.stop_reason, outcome.final_depth) == (
        "failed", "all_zero", 1)
    assert outcome.error == "All mentor scores are zero."
    assert outcome.reasoning == "" and outcome.generated_by == []
    assert outcome.scores == {"m0": [0.0], "m1": [0.0], "m2": [0.0]}
    assert tree(nodes) == [(0, "m0", 0, False, False), (0, "m1", 0, False, False),
                           (0, "m2", 0, False, False)]
    assert [m.calls for m in mentors] == [1, 1, 1]


def test_all_zero_restarts_from_the_root_when_asked(tmp_path: Path) -> None:
    """on_all_zero = "restart:1" (the paper's variant). Attempt 1: no mark, all 0/6: restart.
    Attempt 2 (a fresh tree; the mentors write their restart scripts): m1 holds 3 marks ->
    6/6, m0 and m2 none -> 0/6: stop with m1's chain. The scores are the second tree's."""
    outcome, nodes, mentors = search(
        tmp_path, [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]],
        restarts=[["a", "b", "c"], ["KEY d", "KEY KEY e", "f"], ["g", "h", "i"]],
        on_all_zero="restart:1")
    assert (outcome.status, outcome.stop_reason, outcome.final_depth) == (
        "succeeded", "full_score", 1)
    assert outcome.generated_by == ["m1"] and outcome.details["attempts"] == 2
    assert outcome.scores == {"m0": [0.0], "m1": [1.0], "m2": [0.0]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY d (seen 0)\n\n"
        "### Step 2: KEY KEY e (seen 0)\n\n"
        "### Step 3: f (seen 0)\n\n"
        f"{FINAL}")
    by_attempt = sorted((n["attempt"], n["mentor"], n["correct"], n["chosen"]) for n in nodes)
    assert by_attempt == [(0, "m0", 0, False), (0, "m1", 0, False), (0, "m2", 0, False),
                          (1, "m0", 0, False), (1, "m1", 6, True), (1, "m2", 0, False)]
    assert [m.calls for m in mentors] == [2, 2, 2]


def test_tie_prefers_a_mentor_not_chosen_before(tmp_path: Path) -> None:
    """max_depth = 2. Depth 1: m0 1 mark -> 2/6, others 0/6: m0. Depth 2 (path 1 mark): m0's
    reused step 3 has a mark -> 4/6, m1's asked step 3 has a mark -> 4/6, m2's none -> 2/6.
    m0 and m1 tie at the top; m0 was chosen before, so m1 (the only fresh one) is chosen."""
    outcome, nodes, _ = search(tmp_path, [
        ["KEY opacity", "air", "KEY lobe"],
        ["apex", "heart", "KEY pleural line"],
        ["ribs", "angles", "effusion"],
    ], max_depth=2)
    assert (outcome.stop_reason, outcome.generated_by) == ("max_depth", ["m0", "m1"])
    assert outcome.scores == {"m0": [2 / 6, 4 / 6], "m1": [0 / 6, 4 / 6],
                              "m2": [0 / 6, 2 / 6]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY opacity (seen 0)\n\n"
        "### Step 2: air (seen 0)\n"
        "### Step 3: KEY pleural line (seen 2)\n\n"
        f"{FINAL}")


def test_full_score_tie_goes_to_the_higher_cumulative_score(tmp_path: Path) -> None:
    """Depth 1: m0 2 marks -> 4/6, m1 1 -> 2/6, m2 0 -> 0/6: m0. Depth 2 (path 2 marks): m0's
    reused step 3 and m1's asked step 3 both have a mark -> 6/6 each; m2 none -> 4/6. Both
    full: cumulative scores m0 4/6 + 1 > m1 2/6 + 1 (B2), so m0, whose output is the chain
    it wrote at depth 1 (its own blank-line joins throughout)."""
    outcome, nodes, _ = search(tmp_path, [
        ["KEY opacity", "KEY air", "KEY lobe", "shift"],
        ["KEY apex", "heart", "KEY pleural line"],
        ["ribs", "angles", "effusion"],
    ])
    assert (outcome.stop_reason, outcome.final_depth) == ("full_score", 2)
    assert outcome.generated_by == ["m0", "m0"]
    assert outcome.scores == {"m0": [4 / 6, 6 / 6], "m1": [2 / 6, 6 / 6],
                              "m2": [0 / 6, 4 / 6]}
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        "### Step 1: KEY opacity (seen 0)\n\n"
        "### Step 2: KEY air (seen 0)\n\n"
        "### Step 3: KEY lobe (seen 0)\n\n"
        "### Step 4: shift (seen 0)\n\n"
        f"{FINAL}")
    assert tree(nodes)[3:] == [(1, "m0", 6, True, True), (1, "m1", 6, False, False),
                               (1, "m2", 4, False, False)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_full_score_tie_at_the_root_never_picks_a_non_full_mentor(tmp_path: Path,
                                                                  seed: int) -> None:
    """Depth 1: m0 and m1 hold 3 marks -> 6/6 each, m2 2 marks -> 4/6. No past scores break
    the tie, so a seeded draw picks m0 or m1 (B1: never m2, whatever the seed); the output is
    the picked mentor's whole chain."""
    scripts = [["KEY KEY a", "KEY b", "c"], ["KEY d", "KEY KEY e", "f"], ["KEY g", "KEY h", "i"]]
    outcome, _, _ = search(tmp_path, scripts, seed=seed)
    assert outcome.stop_reason == "full_score" and outcome.final_depth == 1
    [chosen] = outcome.generated_by
    assert chosen in ("m0", "m1")
    steps = scripts[int(chosen[1])]
    assert outcome.reasoning == (
        f"{ROOT_TEXT}\n"
        + "\n\n".join(f"### Step {k}: {s} (seen 0)" for k, s in enumerate(steps, 1))
        + f"\n\n{FINAL}")
