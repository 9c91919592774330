"""Prompt -> chat messages: the one rendering of a prompt as a system and a user turn, and how
an image appears in it for each model family the sglang backend serves (`family_messages`; the
Jinja-free templates in backends.chat_templates render these same messages)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mics.types import Image, Prompt, Text

ImagePart = Callable[[Image], dict[str, Any] | None]


def image_slot(_: Image) -> dict[str, Any]:
    """An image as the bare `{"type": "image"}` slot that processors' chat templates fill."""
    return {"type": "image"}


def no_image(_: Image) -> None:
    """Images dropped (a model that cannot see them)."""
    return None


def chat_messages(prompt: Prompt, image: ImagePart = no_image, *, as_text: bool = False,
                  empty_system: bool = True) -> list[dict[str, Any]]:
    """The system message, then one user turn with the prompt's parts in order.

    Text parts become `{"type": "text"}` parts and each image whatever `image` makes of it
    (None drops it). `as_text` joins the text parts into one string (for templates that want a
    string); `empty_system=False` leaves out a system message with no text.
    """
    parts = [{"type": "text", "text": p.text} if isinstance(p, Text) else image(p)
             for p in prompt.parts]
    content: Any = [p for p in parts if p is not None]
    if as_text:
        content = "".join(p["text"] for p in content if p.get("type") == "text")
    messages = [{"role": "system", "content": prompt.system}]
    if not prompt.system and not empty_system:
        messages = []
    return [*messages, {"role": "user", "content": content}]


INTERNVL_IMAGE = "<image>\n"  # InternVL's image text when the server's placeholder is not given


def family_image(family: str, internvl_image: Callable[[], str] | str | None = None
                 ) -> ImagePart:
    """How an image appears in a family's chat messages: qwen2-vl's image slot, InternVL's
    placeholder as text (`internvl_image`, the server's placeholder and a newline; asked only
    when an image is there), nothing for a text model."""

    def part(img: Image) -> dict[str, Any] | None:
        if family == "qwen2-vl":
            return image_slot(img)
        if family == "internvl":
            text = internvl_image() if callable(internvl_image) else internvl_image
            return {"type": "text", "text": text or INTERNVL_IMAGE}
        return None

    return part


def family_messages(prompt: Prompt, family: str,
                    internvl_image: Callable[[], str] | str | None = None
                    ) -> list[dict[str, Any]]:
    """The chat messages of `prompt` for a model `family` ("qwen2-vl", "internvl", "text"):
    what the chat template sees. The user turn is one string except for qwen2-vl, whose
    template fills `{"type": "image"}` slots."""
    return chat_messages(prompt, family_image(family, internvl_image),
                         as_text=family != "qwen2-vl")
