"""Building mentor, intern and judge prompts.

Intern prompts are laid out prefix-stable: system, images, question, fixed instruction, and the
reasoning prefix last, so every sample of a question shares everything before the prefix.
Each prompt is built from its inputs alone; nothing shared is mutated (B9).

The texts are templates (mics.templates): the constants below are the default "medical" pack,
and a run's `[prompts]` config table picks another pack or overrides single templates.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources

from mics.templates import PromptTemplates, check_templates
from mics.types import Image, Prompt, Question, Text

MENTOR_SYSTEM = (
    "You are a highly professional clinician with extensive experience in medical imaging and "
    "clinical reasoning."
)

MENTOR_TEMPLATE = """You are given a clinical case with medical images, a question, and its \
correct answer.
Your task is to write the reasoning that leads from the case to the answer, one step at a time.

Case information:
{case_info}

Question: {question}

Correct answer: {answer}

Requirements:
- Use only the information given. Reason as if the answer were unknown to you; never state it \
before the final step.
- Present image observations as if read directly from the images; do not cite "image analysis".
- Scale the number of steps to the difficulty of the case.
- Format every step as "### Step k: ..." and end with "### The final answer is: ...".
- Continue from the reasoning prefix below without altering it, and output only the completed \
part, starting with the next step.

Reasoning prefix:
{prefix}"""

INTERN_SYSTEM = "You are a helpful medical assistant."

INTERN_INSTRUCTION = """

Use the images and the partial thought process below to deduce the answer to the question. Be \
concise and use standard medical terminology. Provide only the final answer, in the form \
"### The final answer is: ...".

Reasoning prefix:
"""

JUDGE_SYSTEM = "You are a strict grader of medical answers."

JUDGE_TEMPLATE = """Question: {question}

Model answer: {model_answer}

Correct answer: {answer}

Does the model answer semantically match the correct answer? Reply "Yes" only if it does. Reply \
"No" if it does not, or if its correctness is unclear. Reply with one word: Yes or No."""


MEDICAL = PromptTemplates(
    pack="medical",
    mentor_system=MENTOR_SYSTEM,
    mentor=MENTOR_TEMPLATE,
    intern_system=INTERN_SYSTEM,
    intern="Question: {question}" + INTERN_INSTRUCTION + "{prefix}",
    judge_system=JUDGE_SYSTEM,
    judge=JUDGE_TEMPLATE,
)
"""The default pack: the Chiron-o1 medical prompts, rendered byte for byte as before packs."""

DEFAULT_PACK = "medical"
PACKS = ("medical", "math")  # "math": resources/prompts-math.toml (math and chart reading)


@cache
def pack_templates(name: str) -> PromptTemplates:
    """The templates of a bundled pack; KeyError naming the packs when there is none."""
    if name == "medical":
        return MEDICAL
    if name not in PACKS:
        raise KeyError(f"unknown prompt pack {name!r}; bundled packs: {', '.join(PACKS)}")
    text = resources.files("mics").joinpath(f"resources/prompts-{name}.toml").read_text("utf-8")
    table = dict(tomllib.loads(text)["prompts"])
    table.pop("pack", None)
    return check_templates(PromptTemplates(pack=name, **table))


def mentor_prompt(q: Question, prefix: str, templates: PromptTemplates = MEDICAL) -> Prompt:
    """The mentor sees case info, the question, the correct answer, the prefix and the images."""
    text = templates.mentor.format(
        case_info=q.case_info, context=q.case_info, question=q.question, answer=q.gt_answer,
        prefix=prefix,
    )
    return Prompt(system=templates.system("mentor"),
                  parts=(*(Image(i) for i in q.images), Text(text)))


def intern_prompt(q: Question, prefix: str, templates: PromptTemplates = MEDICAL) -> Prompt:
    """Interns see only images, question and prefix (no case info, no answer: B10)."""
    head = templates.intern_head.format(question=q.question)
    return Prompt(
        system=templates.system("intern"),
        parts=(*(Image(i) for i in q.images), Text(head), Text(prefix)),
    )


def judge_prompt(q: Question, model_answer: str, templates: PromptTemplates = MEDICAL) -> Prompt:
    """The judge gets the clean question, never an intern's rendered prompt (B9)."""
    text = templates.judge.format(question=q.question, model_answer=model_answer,
                                  answer=q.gt_answer)
    return Prompt(system=templates.system("judge"), parts=(Text(text),))


def parse_verdict(text: str | None) -> bool | None:
    """The verdict is the first word, yes or no; anything else is unparsable (B11)."""
    if not text:
        return None
    words = text.strip().split()
    if not words:
        return None
    first = words[0].strip(".,;:!?\"'*()[]").lower()
    if first == "yes":
        return True
    if first == "no":
        return False
    return None
