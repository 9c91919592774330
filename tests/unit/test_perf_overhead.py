"""Issue 15: the engine's CPU savings change when work is done, never what is computed."""

from __future__ import annotations

import gc
import pickle
from dataclasses import replace

import orjson

from backends.keys import _sampling_json
from mics.answers import answer_key
from mics.gc_quiet import GEN0_THRESHOLD, quiet_gc
from mics.types import Image, ImageRef, Prompt, Sampling, Text

IMG = ImageRef(path="x.png", sha256="ab" * 32, mime="image/png", width=4, height=4)


def _slow_key(answer: str) -> str:
    """The rule, one character at a time: lower-cased unless that changes its length."""
    def lower(c: str) -> str:
        low = c.lower()
        return low if len(low) == 1 else c

    return " ".join("".join(lower(c) for c in answer).split())


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
        fresh = [[i] for i in range(1000)]  # young objects a second freeze would take in
        with quiet_gc():  # nested: no second freeze (frozen objects may only be freed)
            assert gc.get_freeze_count() <= frozen
        del fresh
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


def test_quiet_gc_on_two_threads_restores_the_settings_from_before_both() -> None:
    """Two searches on two threads, ending in the other order than they began."""
    import threading

    before = gc.get_threshold()
    first_in, second_in, first_may_leave = (threading.Event() for _ in range(3))

    def first() -> None:
        with quiet_gc():
            first_in.set()
            second_in.wait(5)
            first_may_leave.wait(5)

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with quiet_gc():  # enters while the first is inside, leaves after it
        second_in.set()
        first_may_leave.set()
        t.join(5)
        assert gc.get_threshold()[0] == max(before[0], GEN0_THRESHOLD)  # still quiet
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_prompt_keeps_its_hash_and_is_otherwise_the_dataclass_it_was() -> None:
    """Issue 15: a prompt's hash is worked out once (call keys hash it for every call)."""
    parts = (Text("Look: "), Image(IMG), Text("what is it?"))
    p = Prompt("sys", parts)
    assert p._hash is None
    assert hash(p) == hash(("sys", parts))  # the generated dataclass hash
    assert p._hash == hash(p)  # kept
    fresh = Prompt("sys", parts)
    assert fresh == p and fresh._hash is None and {p: 1}[fresh] == 1  # not part of equality
    assert repr(fresh) == repr(p) == f"Prompt(system='sys', parts={parts!r})"
    assert Prompt("sys", parts[:2]) != p and Prompt("other", parts) != p
    moved = replace(p, system="other")
    assert moved._hash is None and hash(moved) == hash(("other", parts))
    back = pickle.loads(pickle.dumps(p))  # another process hashes strings differently
    assert back == p and back._hash is None and hash(back) == hash(p)


def test_a_sampling_is_serialized_once_per_object_never_shared_by_value() -> None:
    s = Sampling(temperature=0.7, max_tokens=32, stop=("\n\n",))
    raw = _sampling_json(s)
    assert raw == orjson.dumps(s.to_dict(), option=orjson.OPT_SORT_KEYS)
    assert _sampling_json(s) is raw  # kept
    for a, b in ((0.0, -0.0), (1, 1.0)):  # equal values, equal hashes, JSON apart
        first, second = Sampling(temperature=a), Sampling(temperature=b)
        assert first == second
        assert _sampling_json(first) != _sampling_json(second)
        assert _sampling_json(second) == orjson.dumps(second.to_dict(), option=orjson.OPT_SORT_KEYS)



def test_question_and_outcome_to_dict_equal_dataclasses_asdict() -> None:
    """The hand-written `to_dict`s give exactly what `dataclasses.asdict` gives, every field
    included (a field added later and missed here fails this test), and share no container
    with the object."""
    from dataclasses import asdict

    from mics.types import Outcome, Question

    q = Question(qid="q1", index=3, question="Which lobe?", gt_answer="left", images=(IMG, IMG),
                 image_paths=("a.png", "b.png"), case_info="CT", captions=("c1", "c2"))
    assert q.to_dict() == asdict(q)
    assert Question.from_dict(q.to_dict()) == q
    o = Outcome(qid="q1", status="succeeded", stop_reason="full_score", reasoning="r",
                scores={"1": [0.5, None]}, final_depth=2, generated_by=["m1"], search_id="s",
                stage="done", error="", details={"leaks": [{"node": "n1", "n": 2}]})
    d = o.to_dict()
    assert d == asdict(o)
    assert orjson.dumps(d) == orjson.dumps(asdict(o))
    d["scores"]["1"].append(1.0)
    d["generated_by"].append("m2")
    d["details"]["leaks"][0]["n"] = 9
    assert o.scores == {"1": [0.5, None]} and o.generated_by == ["m1"]
    assert o.details == {"leaks": [{"node": "n1", "n": 2}]}
