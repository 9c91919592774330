"""The MICS rules as pure functions: no event loop, no I/O."""

from __future__ import annotations

import random

import pytest

from mics import policy
from mics.policy import Scored, decide, mics_score, question_rng, select_full_score, select_next


def _decide(cands, depth=0, max_depth=3, previous=(), past=None, seed=0):
    past = past or {c.mentor: [c.score] for c in cands}
    return decide(cands, depth=depth, max_depth=max_depth, previous=list(previous),
                  past_scores=past, rng=random.Random(seed))


def test_score_is_fraction_of_all_samples():
    assert mics_score(3, 6) == 0.5
    assert mics_score(0, 6) == 0.0
    assert mics_score(6, 6) == 1.0
    assert mics_score(0, 0) == 0.0


def test_full_score_stops_with_that_mentor():
    d = _decide([Scored("a", 3, 6), Scored("b", 6, 6), Scored("c", 0, 6)])
    assert (d.kind, d.chosen) == ("full_score", "b")


def test_all_zero_fails():
    d = _decide([Scored("a", 0, 6), Scored("b", 0, 6)])
    assert (d.kind, d.chosen) == ("all_zero", None)


def test_argmax_continues():
    d = _decide([Scored("a", 2, 6), Scored("b", 5, 6), Scored("c", 1, 6)])
    assert (d.kind, d.chosen) == ("continue", "b")


def test_max_depth_still_selects_the_best():
    d = _decide([Scored("a", 2, 6), Scored("b", 1, 6)], depth=2, max_depth=3)
    assert (d.kind, d.chosen) == ("max_depth", "a")


def test_no_candidates():
    assert _decide([]).kind == "no_candidates"


def test_ties_prefer_mentors_not_chosen_before():
    cands = [Scored("a", 3, 6), Scored("b", 3, 6), Scored("c", 1, 6)]
    for seed in range(30):
        assert select_next(cands, ["a"], random.Random(seed)) == "b"


def test_ties_among_previous_mentors_are_random_but_seeded():
    cands = [Scored("a", 3, 6), Scored("b", 3, 6)]
    picks = {select_next(cands, ["a", "b"], random.Random(s)) for s in range(40)}
    assert picks == {"a", "b"}
    assert select_next(cands, ["a", "b"], random.Random(7)) == select_next(
        cands, ["a", "b"], random.Random(7))


def test_b1_full_score_tie_at_root_never_picks_a_non_full_mentor():
    cands = [Scored("a", 6, 6), Scored("b", 5, 6), Scored("c", 6, 6)]
    chosen = {_decide(cands, seed=s).chosen for s in range(60)}
    assert chosen == {"a", "c"}  # the reference chose among all three (B1)


def test_b2_full_score_tie_uses_cumulative_score_of_full_mentors_only():
    # "b" has the highest past total but did not reach 1.0 now: it must not win (B2).
    full = [Scored("a", 6, 6), Scored("c", 6, 6)]
    past = {"a": [0.5, 1.0], "b": [1.0, 0.9], "c": [0.3, 1.0]}
    assert select_full_score(full, past, random.Random(0)) == "a"
    cands = [Scored("a", 6, 6), Scored("b", 5, 6), Scored("c", 6, 6)]
    for seed in range(20):
        assert _decide(cands, depth=1, past=past, seed=seed).chosen == "a"


def test_b14_rng_is_seeded_per_question_and_independent_of_order():
    r1 = question_rng(0, "q1").random()
    assert question_rng(0, "q1").random() == r1
    assert question_rng(0, "q2").random() != r1
    assert question_rng(1, "q1").random() != r1
    assert question_rng(0, "q1", attempt=1).random() != r1


@pytest.mark.parametrize(("depth", "root_steps", "want"), [(0, 2, 2), (0, 1, 1), (1, 2, 1)])
def test_root_steps(depth, root_steps, want):
    assert policy.root_step_count(depth, root_steps) == want
