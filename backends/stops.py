"""Stop strings: where a reply is cut, the same way for every backend and simulator."""

from __future__ import annotations

from collections.abc import Sequence


def clip_at_stop(text: str, stop: Sequence[str] | str | None) -> tuple[str, str | None]:
    """`text` cut before the earliest stop string it contains, and that stop string (the
    smallest one when several start at the same place); `(text, None)` when none occurs.
    Empty stop strings never match."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    pos, matched = min(hits)
    return text[:pos], matched
