"""Reference-code quirks that docs/algorithm.md says mics handles and no other test shows."""

from __future__ import annotations

from mics.config import SearchConfig, parse_config
from mics.prompts import intern_prompt, mentor_prompt
from mics.types import ImageRef, Question

CASE = Question(
    qid="q1", index=0, question="Which vessel is occluded?", gt_answer="Left anterior descending",
    images=(ImageRef("/x/a.png", "ab" * 32, "image/png", 4, 4),), image_paths=("a.png",),
    case_info="Chief complaint: chest pain\nAge: 61 years\nGender: Male\nImage analysis:\n"
              "Modality 1: ST elevation in V1-V4",
)
PATH = "Let's think step by step.\n\n### Step 1: The ECG shows anterior ST elevation."


def test_b10_interns_see_neither_case_notes_nor_the_answer() -> None:
    intern = intern_prompt(CASE, PATH).user_text()
    assert CASE.question in intern and PATH in intern
    assert "Chief complaint" not in intern and "ST elevation in V1-V4" not in intern
    assert CASE.gt_answer not in intern
    assert intern_prompt(CASE, PATH).images() == CASE.images
    mentor = mentor_prompt(CASE, PATH).user_text()  # the asymmetry is deliberate (D11)
    assert CASE.case_info in mentor and CASE.gt_answer in mentor


def test_b19_mentor_temperature_default_is_below_the_reference() -> None:
    assert SearchConfig().mentor_temperature <= 1.0 < 1.2
    minimal = {"mentors": [{"name": "m", "backend": "simulated", "model": "m"}],
               "interns": [{"name": "i", "backend": "simulated", "model": "i"}],
               "judge": {"name": "j", "backend": "simulated", "model": "j"}}
    assert parse_config(minimal).search.mentor_temperature == SearchConfig().mentor_temperature
