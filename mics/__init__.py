"""mics: Mentor-Intern Collaborative Search as an asyncio engine over an LMDB tree store.

Mentors propose reasoning steps, interns answer from the path so far, a judge checks their
answers; a step's MICS-Score is the fraction of intern samples judged correct. Every search is
a tree stored as it grows, and every model call is memoised, so a stopped run resumes for free.

Use it from code (a notebook, a pipeline)::

    import mics

    config = mics.load_config("examples/simulated.toml")
    summary = await mics.search(config, records, "runs/r1", image_root="images/")
    # no event loop (a plain script)? mics.search_sync(config, records, "runs/r1", ...)
    with mics.open_run("runs/r1") as run:
        for outcome in run.outcomes("full_score"):
            print(outcome.qid, run.question(outcome.qid).question, outcome.reasoning)
        run.export("out/", ["sft"], only_full_score=True)

`records` is any iterable of records in the config's dataset format (Chiron/MMRP by default,
or generic), or a JSONL / JSON path.
Stop a search by setting the `stop=anyio.Event()` you passed, or by cancelling its scope;
`mics.resume(run_dir)` finishes it later. Every error mics raises is a `MicsError`.
See README.md, docs/algorithm.md and docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Loaded on first use, so that importing a core
# module (mics.types, mics.config) does not pull in the engine, the backends and the store.
_EXPORTS = {
    # running and reading searches
    "search": "mics.api", "resume": "mics.api", "search_sync": "mics.api",
    "resume_sync": "mics.api", "open_run": "mics.runview", "Run": "mics.runview",
    "RunSummary": "mics.run",
    # configuration
    "load_config": "mics.config", "parse_config": "mics.config", "RunConfig": "mics.config",
    "SearchConfig": "mics.config", "ModelConfig": "mics.config",
    # data
    "Question": "mics.types", "ImageRef": "mics.types", "RecordError": "mics.types",
    "Node": "mics.types", "Sample": "mics.types", "Outcome": "mics.types",
    "QuestionStatus": "mics.types", "StopReason": "mics.types", "Verdict": "mics.types",
    "QuestionRecord": "mics.records", "StoredQuestion": "mics.records", "RunStore": "mics.records",
    # errors
    "MicsError": "mics.errors", "ConfigError": "mics.errors", "DataError": "mics.errors",
    "StoreError": "mics.errors", "RunError": "mics.errors", "Stopped": "mics.errors",
    "BackendError": "mics.errors", "TransientError": "mics.errors",
    "OutOfMemoryError": "mics.errors", "PermanentError": "mics.errors",
    "FatalError": "mics.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
