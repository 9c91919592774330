"""Prompt templates: the mentor, intern and judge texts as validated `str.format` templates.

A template names its inputs with placeholders such as ``{question}``; ``{{`` and ``}}`` are
literal braces. Each role has a fixed set of placeholders it may use and a set it must use,
checked when a config is loaded, so a typo fails before the first model call:

- mentor: ``{question}``, ``{answer}``, ``{prefix}`` required; ``{context}`` (alias
  ``{case_info}``) optional;
- intern: ``{question}`` required and ``{prefix}`` required as the very end of the template (the
  prefix goes last so every sample and every deeper step shares the prompt before it); the
  answer and the context are never shown to interns (B10);
- judge: ``{model_answer}`` and ``{answer}`` required, ``{question}`` optional;
- the three system messages take no placeholders.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

# role key -> (allowed placeholders, required placeholders)
PLACEHOLDERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "mentor_system": (frozenset(), frozenset()),
    "mentor": (frozenset({"question", "answer", "prefix", "context", "case_info"}),
               frozenset({"question", "answer", "prefix"})),
    "intern_system": (frozenset(), frozenset()),
    "intern": (frozenset({"question", "prefix"}), frozenset({"question", "prefix"})),
    "judge_system": (frozenset(), frozenset()),
    "judge": (frozenset({"question", "model_answer", "answer"}),
              frozenset({"model_answer", "answer"})),
}

_WHY_NOT = {  # placeholders a role may not use, and why
    "intern": "interns see only the images, the question and the prefix (B10)",
    "judge": "the judge sees the clean question and the two answers only (B9)",
}

PREFIX_FIELD = "{prefix}"


class TemplateError(ValueError):
    """A template that cannot be used; `key` names the template (e.g. "mentor")."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class PromptTemplates:
    """One complete set of templates; `pack` names the pack they started from."""

    pack: str
    mentor_system: str
    mentor: str
    intern_system: str
    intern: str
    judge_system: str
    judge: str

    @cached_property
    def intern_head(self) -> str:
        """The intern template without its final ``{prefix}`` (validated to end with it)."""
        return self.intern[: -len(PREFIX_FIELD)]

    @cached_property
    def _systems(self) -> dict[str, str]:
        return {role: getattr(self, f"{role}_system").format()
                for role in ("mentor", "intern", "judge")}

    def system(self, role: str) -> str:
        """The rendered system message of "mentor", "intern" or "judge"."""
        return self._systems[role]


TEMPLATE_KEYS = tuple(f.name for f in fields(PromptTemplates) if f.name != "pack")


def placeholders(key: str, template: str) -> list[str]:
    """The placeholder names of a template, in order; TemplateError if it is malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(key, f"malformed template ({e}); write literal braces as {{{{ }}}}"
                            ) from None
    names = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise TemplateError(key, f"placeholder {{{name}}} is not a plain name; "
                                     "use e.g. {question}")
        if spec or conversion:
            raise TemplateError(key, f"placeholder {{{name}}} takes no conversion or format "
                                     "spec")
        names.append(name)
    return names


def check_template(key: str, template: Any) -> str:
    """Validate one template for its role; returns it unchanged."""
    if key not in PLACEHOLDERS:
        raise TemplateError(key, f"unknown template; known: {', '.join(TEMPLATE_KEYS)}")
    if not isinstance(template, str):
        raise TemplateError(key, f"expected a string, got {type(template).__name__}")
    allowed, required = PLACEHOLDERS[key]
    names = placeholders(key, template)
    unknown = sorted(set(names) - allowed)
    if unknown:
        why = f" ({_WHY_NOT[key]})" if key in _WHY_NOT else ""
        listed = ", ".join("{" + n + "}" for n in sorted(allowed)) or "none"
        raise TemplateError(key, f"unknown placeholder(s) {_braced(unknown)}{why}; "
                                 f"allowed: {listed}")
    missing = sorted(required - set(names))
    if missing:
        raise TemplateError(key, f"missing placeholder(s) {_braced(missing)}")
    if key == "intern" and (names.count("prefix") != 1 or not template.endswith(PREFIX_FIELD)
                            or list(string.Formatter().parse(template))[-1][1] != "prefix"):
        raise TemplateError(key, "{prefix} must appear once, as the very end of the template "
                                 "(it goes last so samples share the prompt before it)")
    return template


# What the engine parses out of replies (mics.steps), so each role's prompt must ask for it.
FINAL_LINE = "### The final answer is:"


def check_templates(templates: PromptTemplates) -> PromptTemplates:
    """Validate every template of a set, and `check_final_line`; returns it unchanged."""
    for key in TEMPLATE_KEYS:
        check_template(key, getattr(templates, key))
    check_final_line(templates)
    return templates


def check_final_line(templates: PromptTemplates) -> None:
    """Mentors and interns must be asked for the final-answer line somewhere in their template
    or system message: without it no intern sample has an answer and no mentor chain an end,
    and every question fails all-zero as if the interns were wrong."""
    for role in ("mentor", "intern"):
        texts = (getattr(templates, role), getattr(templates, f"{role}_system"))
        if not any(FINAL_LINE.lower() in t.lower() for t in texts):
            raise TemplateError(role, f"neither {role} nor {role}_system asks for the line "
                                      f"\"{FINAL_LINE} ...\", which mics reads the answer from")


def _braced(names: list[str]) -> str:
    return ", ".join("{" + n + "}" for n in names)
