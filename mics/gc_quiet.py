"""Fewer garbage-collector passes while a search runs.

A run allocates many short-lived objects per model call (requests, replies, tasks), and the
default gen-0 threshold (700) makes CPython collect hundreds of times a second, each pass of the
oldest generation walking every object the process holds (modules, tokenizers: ~250k). Inside
`quiet_gc()` what existed before the run is frozen (never scanned again) and the gen-0 threshold
is raised; both are undone on exit. Only when objects are freed changes, never what is computed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

GEN0_THRESHOLD = 20_000
_depth = 0  # nested runs (a bench running the engine inside another run) freeze once


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Freeze the objects that exist now and collect young ones less often, until exit."""
    global _depth
    _depth += 1
    saved = gc.get_threshold()
    if _depth == 1:
        gc.freeze()
        gc.set_threshold(max(saved[0], GEN0_THRESHOLD), *saved[1:])
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.set_threshold(*saved)
            gc.unfreeze()
