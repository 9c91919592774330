"""Structured step parsing: fixes for B3, B4, B7 and verdict parsing (B11)."""

from __future__ import annotations

from mics.prompts import parse_verdict
from mics.steps import count_steps, extract_final_answer, normalize_answer, parse_chain

CHAIN = """### Step 1: Look at the image.

### Step 2: The lesion ### looks odd.

### Step 3: Compare.

### The final answer is: Pneumothorax"""


def test_parse_numbered_steps_and_final():
    p = parse_chain(CHAIN)
    assert sorted(p.steps) == [1, 2, 3]
    assert p.steps[2] == "### Step 2: The lesion ### looks odd."  # '###' inside a step stays
    assert p.final == "### The final answer is: Pneumothorax"


def test_run_returns_consecutive_steps_or_none():
    p = parse_chain(CHAIN)
    assert p.run(1, 2) == [
        "### Step 1: Look at the image.",
        "### Step 2: The lesion ### looks odd.",
    ]
    assert p.run(3, 1) == ["### Step 3: Compare."]
    # B3: past the last step there is no "next step": never the final-answer line, never "".
    assert p.run(4, 1) is None


def test_b4_echoed_prefix_is_ignored():
    reply = "### Step 1: Look at the image.\n### Step 2: New thing.\n### The final answer is: X"
    p = parse_chain(reply)
    assert p.run(2, 1) == ["### Step 2: New thing."]
    assert p.continuation(2) == "### Step 2: New thing.\n\n### The final answer is: X"


def test_b4_reply_without_steps_has_no_candidate():
    p = parse_chain("I believe it is pneumonia.")
    assert p.steps == {} and p.run(1, 1) is None


def test_heading_variants_are_normalised():
    p = parse_chain("## step 1 - first\n#### Step 2: second\n### the final answer is: y")
    assert p.steps[1] == "### Step 1: - first"
    assert p.steps[2] == "### Step 2: second"
    assert p.final == "### The final answer is: y"


def test_count_steps():
    assert count_steps("Let's think.\n### Step 1: a\n\n### Step 2: b") == 2
    assert count_steps("Let's think.") == 0


def test_b7_final_answer_extraction():
    assert extract_final_answer("blah ### The final answer is:  Pneumonia ") == "Pneumonia"
    assert extract_final_answer("### The final answer is: a\n### The final answer is: b") == "b"
    assert extract_final_answer("no marker here") is None
    assert extract_final_answer("### The final answer is:   ") is None
    assert extract_final_answer(None) is None


def test_b11_verdict_is_first_word_only():
    assert parse_verdict("Yes") is True
    assert parse_verdict("yes.") is True
    assert parse_verdict("**No**, it differs") is False
    assert parse_verdict("eyes") is None  # the reference counted this as yes
    assert parse_verdict("The answer is yes") is None
    assert parse_verdict("") is None


def test_normalize_answer():
    assert normalize_answer("The  Pacemaker-lead fracture.") == "pacemaker lead fracture"


def test_a_step_never_carries_the_final_answer_into_the_prefix():
    """A final answer written inside a step's line, or under a variant heading, ends the step:
    otherwise interns read the answer in the prefix, score 1 and the label is inflated (the
    answer text never reaches a step, so no leak check has to find it)."""
    cases = {
        "### Step 1: The CT shows a wedge. ### The final answer is: Pulmonary infarct":
            ({1: "### Step 1: The CT shows a wedge."},
             "### The final answer is: Pulmonary infarct"),
        "### Step 1: a\n\n### Step 2: b\n\n### Final Answer: Pulmonary infarct":
            ({1: "### Step 1: a", 2: "### Step 2: b"},
             "### The final answer is: Pulmonary infarct"),
        "### Step 1: a\n## final answer is - Pulmonary infarct":
            ({1: "### Step 1: a"}, "### The final answer is: - Pulmonary infarct"),
        "### Step 1: weigh the final answer options later\n### Step 2: b":
            ({1: "### Step 1: weigh the final answer options later", 2: "### Step 2: b"}, None),
    }
    for text, (steps, final) in cases.items():
        p = parse_chain(text)
        assert (p.steps, p.final) == (steps, final), text
        assert all("Pulmonary" not in s for s in p.steps.values())
