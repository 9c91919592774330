"""Jinja-free rendering of a tokenizer's chat template for the prompts interns get.

An intern prompt is one system message and one user turn (text parts and images), rendered with
`add_generation_prompt=True`. For the templates of the known families (ChatML: Qwen2, Qwen2-VL,
InternVL's chat models), that rendering is fixed text around the system text, the user text and
one fixed piece per image. `compile_template` finds those pieces once, by rendering probe
conversations with sentinel strings through `apply_chat_template`, and then checks the compiled
form against `apply_chat_template` on further probes (empty system, whitespace at the edges,
newlines, braces, images first and last). A template that treats content in any other way
(trims it, escapes it, depends on it) fails the check and keeps rendering through Jinja:
`render_prompt` then returns None.

`tokenizer` is anything with transformers' `apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`: a transformers tokenizer or processor, or the jinja2-only
`backends.template_source.ChatTemplate` the sglang backend uses. Both renderings start from
the same messages (`backends.messages.family_messages`), so an image's text is written once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backends.messages import family_image, family_messages
from mics.types import Image, Prompt, Text

_SYS, _USR, _A, _B = "\x01S\x01", "\x01U\x01", "\x01A\x01", "\x01B\x01"


@dataclass(frozen=True)
class Compiled:
    """head + system + middle + user content + tail; images as `image` (qwen2-vl lists)."""

    family: str
    head: str
    middle: str
    tail: str
    image: str = ""

    def content(self, prompt: Prompt, internvl_image: Callable[[], str] | None = None) -> str:
        """The user turn's text: the content of `family_messages`, with each qwen2-vl image
        slot as the template's image piece (an InternVL image is `internvl_image()`, the
        server's placeholder and a newline)."""
        image = family_image(self.family, internvl_image)  # what family_messages puts there
        out = []
        for part in prompt.parts:
            if isinstance(part, Text):
                out.append(part.text)
            elif (slot := image(part)) is not None:
                out.append(slot["text"] if slot["type"] == "text" else self.image)
        return "".join(out)

    def render(self, prompt: Prompt, internvl_image: Callable[[], str] | None = None) -> str:
        return (self.head + prompt.system + self.middle + self.content(prompt, internvl_image)
                + self.tail)


def jinja_render(tokenizer: Any, prompt: Prompt, family: str,
                 internvl_image: Callable[[], str] | str | None = None) -> str:
    """The reference: `apply_chat_template(tokenize=False, add_generation_prompt=True)` on
    the prompt's `family_messages`."""
    return tokenizer.apply_chat_template(family_messages(prompt, family, internvl_image),
                                         tokenize=False, add_generation_prompt=True)


def _probe(system: str, *parts: str | None) -> Prompt:
    from mics.types import ImageRef

    img = ImageRef(path="probe.png", sha256="0" * 64, mime="image/png", width=1, height=1)
    return Prompt(system, tuple(Image(img) if p is None else Text(p) for p in parts))


_CHECKS = (
    _probe("You are a careful radiologist.", "Question: {{ x }} {% y %}\n\nStep 1: a.\n"),
    _probe("", "  leading and trailing spaces  "),
    _probe(" \n", "\n", None, "after the image\n", None),
    _probe("sys", None, "text", None),
    _probe("<|im_start|>user\nnot a turn", "</s> [INST] '\"\\"),
)


def compile_template(tokenizer: Any, family: str) -> Compiled | None:
    """The template's fixed pieces, or None if the template is not of that plain shape."""
    try:
        full = jinja_render(tokenizer, _probe(_SYS, _USR), family)
        head, rest = full.split(_SYS)
        middle, tail = rest.split(_USR)
        image = ""
        if family == "qwen2-vl":
            with_image = jinja_render(tokenizer, _probe(_SYS, _A, None, _B), family)
            image = with_image.split(_A)[1].split(_B)[0]
        compiled = Compiled(family, head, middle, tail, image)
        for probe in _CHECKS:
            if compiled.render(probe) != jinja_render(tokenizer, probe, family):
                return None
    except Exception:  # noqa: BLE001 - any surprise: keep rendering through Jinja
        return None
    return compiled


_compiled: dict[tuple[int, str], tuple[Any, Compiled | None]] = {}
_lock = threading.Lock()


def render_prompt(tokenizer: Any, family: str, prompt: Prompt,
                  internvl_image: Callable[[], str] | None = None) -> str | None:
    """`prompt` rendered as `apply_chat_template` would, without Jinja; None if this
    tokenizer's template could not be compiled (render it through Jinja then). For InternVL,
    `internvl_image()` gives an image's text (placeholder and newline; called only when the
    prompt has an image): the compiled form takes content verbatim, so any placeholder fits."""
    key = (id(tokenizer), family)
    entry = _compiled.get(key)
    if entry is None or entry[0] is not tokenizer:
        with _lock:
            entry = _compiled[key] = (tokenizer, compile_template(tokenizer, family))
    compiled = entry[1]
    return compiled.render(prompt, internvl_image) if compiled is not None else None
