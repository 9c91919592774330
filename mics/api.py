"""mics as a library: start, resume and stop searches from your own code.

    summary = await mics.search("config.toml", records, "runs/r1", image_root="images/")
    summary = await mics.resume("runs/r1")
    with mics.open_run("runs/r1") as run: ...

The owner of a search stops it: set the `stop` event (calls in flight finish and are stored)
or cancel the enclosing scope. The library installs no signal handler and never exits the
interpreter. `search_sync` / `resume_sync` are for scripts without an event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import orjson

from mics.config import RunConfig, load_config, parse_config
from mics.errors import DataError, RunError
from mics.run import (
    RunSummary,
    build_models,
    describe_dataset,
    record_run,
    search_run,
    with_seed,
)
from mics.types import Outcome
from store import RunStore

QUESTIONS_FILE = "questions.jsonl"  # records given as an iterable are kept here, for resume

ConfigLike = RunConfig | str | os.PathLike[str] | Mapping[str, Any]
QuestionsLike = str | os.PathLike[str] | Iterable[Any]


async def search(
    config: ConfigLike,
    questions: QuestionsLike,
    run_dir: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int | None = None,
    stop: anyio.Event | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> RunSummary:
    """Search every question and return the run's summary; calling it again resumes.

    `config`: a RunConfig, a TOML path or a mapping shaped like the TOML. `questions`: a
    JSONL / JSON-list path, or any iterable of records in the config's `[dataset].format`
    (Chiron by default, or generic); records are written to ``run_dir/questions.jsonl`` so
    that `resume` can read them again. Image paths resolve against `image_root` (default:
    the dataset file's folder for a path, the current directory for records). A bad record is
    stored as failed, naming its field. Raises ConfigError, DataError, RunError or StoreError
    (all MicsError).
    """
    cfg = with_seed(_config(config), seed)
    run = Path(run_dir)
    if isinstance(questions, str | os.PathLike):
        data, root = Path(questions), image_root
    else:
        data, root = (_write_records(questions, run, cfg.dataset.id_field()),
                      image_root or Path.cwd())
    dataset = describe_dataset(data, Path(root) if root is not None else None, limit)
    models = build_models(cfg)
    searching = False  # from then on search_run owns the models and closes them
    try:
        models.preflight()  # e.g. each SGLang intern's chat template, before the run is stored
        with RunStore.open(run, write=True, create=True) as store:
            record_run(store, cfg, dataset)
            searching = True
            return await search_run(run, store=store, stop=stop, on_done=on_done, models=models)
    except BaseException:
        if not searching:
            with anyio.CancelScope(shield=True):
                await models.aclose()
        raise


async def resume(
    run_dir: str | os.PathLike[str],
    *,
    stop: anyio.Event | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> RunSummary:
    """Finish a stopped or crashed run; stored calls are answered from the memo, not sent."""
    return await search_run(Path(run_dir), stop=stop, on_done=on_done)


def search_sync(
    config: ConfigLike,
    questions: QuestionsLike,
    run_dir: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> RunSummary:
    """`search` for scripts with no event loop (in a notebook, ``await mics.search``).

    Ctrl-C cancels it (KeyboardInterrupt); what finished is stored and `resume_sync` goes on.
    """
    _require_no_loop("search")
    return anyio.run(partial(search, config, questions, run_dir, image_root=image_root,
                             limit=limit, seed=seed, on_done=on_done))


def resume_sync(run_dir: str | os.PathLike[str], *,
                on_done: Callable[[Outcome], None] | None = None) -> RunSummary:
    """`resume` for scripts with no event loop (in a notebook, ``await mics.resume``)."""
    _require_no_loop("resume")
    return anyio.run(partial(resume, run_dir, on_done=on_done))


def _config(config: ConfigLike) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config))
    return load_config(config)


def _write_records(records: Iterable[Any], run_dir: Path, id_field: str = "rid") -> Path:
    """Records as JSONL in the run directory; refuses to replace different stored ones.
    `id_field` names a record's id in errors ("rid" in the Chiron schema, "id" in generic)."""
    path = run_dir / QUESTIONS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, rec in enumerate(records):
        try:
            lines.append(orjson.dumps(rec))
        except TypeError as e:
            rid = rec.get(id_field) if isinstance(rec, Mapping) else None
            raise DataError(f"question record {i} ({id_field} {rid!r}): cannot be stored as "
                            f"JSON: {e}") from None
    content = b"".join(line + b"\n" for line in lines)
    if path.is_file():
        if path.read_bytes() != content:
            raise RunError(f"{run_dir} holds a run over other questions ({path}); resume it "
                           "with mics.resume or choose a new run directory")
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    return path


def _require_no_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RunError(f"an event loop is already running (a notebook?): use `await mics.{what}(...)`"
                   f" instead of mics.{what}_sync")


__all__ = ["QUESTIONS_FILE", "resume", "resume_sync", "search", "search_sync"]
