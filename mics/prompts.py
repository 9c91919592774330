"""Building mentor, intern and judge prompts.

Intern prompts are laid out prefix-stable: system, images, question, fixed instruction, and the
reasoning prefix last, so every sample of a question shares everything before the prefix.
Each prompt is built from its inputs alone; nothing shared is mutated (B9).
"""

from __future__ import annotations

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


def mentor_prompt(q: Question, prefix: str) -> Prompt:
    """The mentor sees case info, the question, the correct answer, the prefix and the images."""
    text = MENTOR_TEMPLATE.format(
        case_info=q.case_info, question=q.question, answer=q.gt_answer, prefix=prefix
    )
    return Prompt(system=MENTOR_SYSTEM, parts=(*(Image(i) for i in q.images), Text(text)))


def intern_prompt(q: Question, prefix: str) -> Prompt:
    """Interns see only images, question and prefix (no case info, no answer: B10)."""
    head = f"Question: {q.question}{INTERN_INSTRUCTION}"
    return Prompt(
        system=INTERN_SYSTEM,
        parts=(*(Image(i) for i in q.images), Text(head), Text(prefix)),
    )


def judge_prompt(q: Question, model_answer: str) -> Prompt:
    """The judge gets the clean question, never an intern's rendered prompt (B9)."""
    text = JUDGE_TEMPLATE.format(question=q.question, model_answer=model_answer, answer=q.gt_answer)
    return Prompt(system=JUDGE_SYSTEM, parts=(Text(text),))


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
