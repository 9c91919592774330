"""Fewer garbage-collector passes while a search runs.

A run allocates many short-lived objects per model call (requests, replies, tasks), and the
default gen-0 threshold (700) makes CPython collect hundreds of times a second, each pass of the
oldest generation walking every object the process holds (modules, tokenizers: ~250k). Inside
`quiet_gc()` what existed before the run is frozen (never scanned again) and the gen-0 threshold
is raised; both are undone on exit. Only when objects are freed changes, never what is computed.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

GEN0_THRESHOLD = 20_000
_lock = threading.Lock()
_depth = 0  # runs inside quiet_gc now, over all threads: the first freezes, the last restores
_saved: tuple[int, ...] = ()  # the thresholds before the first one


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Freeze the objects that exist now and collect young ones less often, until exit.
    Nested or concurrent uses (several searches, on several threads) share one quiet period:
    the settings from before the first are restored when the last one ends."""
    global _depth, _saved
    with _lock:
        _depth += 1
        if _depth == 1:
            _saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(_saved[0], GEN0_THRESHOLD), *_saved[1:])
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.set_threshold(*_saved)
                gc.unfreeze()
