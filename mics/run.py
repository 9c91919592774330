"""One run from start to end: open the store, record what the run is, build models, search.

`start_run` records a new run (or checks that a re-run matches what is stored); `search_run`
then searches every question the store does not already hold as finished. Resume is the same
call: the deterministic replay answers every stored call from the memo.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from backends.gate import CallGate, RunAborted
from backends.images import CACHE_DIR_NAME as IMAGE_CACHE_DIR
from backends.images import use_directory as use_image_directory
from backends.registry import build_chat, build_rollout
from mics import __version__
from mics.config import ConfigError, RunConfig
from mics.dataset import read_dataset
from mics.engine import Engine, Models
from mics.types import Outcome, Question, RecordError
from store import RunStore, StoreError


class RunError(RuntimeError):
    """A run cannot start or resume; the message says why and what to do."""


@dataclass
class RunSummary:
    run_dir: str
    questions: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    stop_reasons: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # this session: sent, memo_hits, ...
    seconds: float = 0.0
    interrupted: bool = False


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def count_records(path: Path) -> int | None:
    """Number of non-blank lines of a JSONL file (for progress); None for a JSON list."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
        if head.startswith(b"["):
            return None
        f.seek(0)
        return sum(1 for line in f if line.strip())


def describe_dataset(data: Path, image_root: Path | None, limit: int | None) -> dict[str, Any]:
    """What a run reads: checked paths and the dataset's content hash."""
    data = data.resolve()
    if not data.is_file():
        raise RunError(f"dataset not found: {data}")
    if image_root is not None and not image_root.is_dir():
        raise RunError(f"--image-root is not a directory: {image_root}")
    return {"path": str(data), "sha256": file_sha256(data),
            "image_root": str(image_root.resolve()) if image_root else None, "limit": limit}


def record_run(store: RunStore, config: RunConfig, dataset: dict[str, Any]) -> None:
    """Record a new run's config and dataset, or check a re-run against what is stored."""
    run_dir = store.run_dir
    stored = store.get_meta("config")
    if stored is None or store.get_meta("dataset") is None:  # new (or never fully recorded)
        with store.transaction():  # one commit: a kill leaves all of it or none
            store.put_meta("config", config.to_dict())
            store.put_meta("dataset", dataset)
            store.put_meta("created", {"time": time.time(), "mics": __version__})
        return
    if RunConfig.from_dict(stored) != config:
        raise RunError(f"{run_dir} holds a run with a different config; resume it with "
                       f"`mics resume {run_dir}` or choose a new --run directory")
    if store.get_meta("dataset") != dataset:
        raise RunError(f"{run_dir} holds a run over a different dataset, image root or "
                       f"limit; resume it with `mics resume {run_dir}` or choose a new --run")


def start_run(run_dir: Path, config: RunConfig, data: Path, image_root: Path | None,
              limit: int | None) -> None:
    """describe_dataset + record_run in a store opened (and closed) here."""
    dataset = describe_dataset(data, image_root, limit)
    with RunStore.open(run_dir, write=True, create=True) as store:
        record_run(store, config, dataset)


def build_models(config: RunConfig) -> Models:
    """Backends from config; any ConfigError surfaces before a call is made."""
    return Models(
        mentors=[build_chat(m, "mentor") for m in config.mentors],
        interns=[build_rollout(i) for i in config.interns],
        judge=build_chat(config.judge, "judge"),
    )


def load_run(store: RunStore) -> tuple[RunConfig, dict[str, Any]]:
    cfg = store.get_meta("config")
    dataset = store.get_meta("dataset")
    if cfg is None or dataset is None:
        raise RunError(f"{store.run_dir} has no recorded run; start one with `mics search`")
    return RunConfig.from_dict(cfg), dataset


def dataset_items(dataset: dict[str, Any]) -> Iterator[Question | RecordError]:
    """The run's records, read lazily; refuses a dataset changed since the run started."""
    path = Path(dataset["path"])
    if not path.is_file():
        raise RunError(f"the run's dataset is gone: {path}")
    if file_sha256(path) != dataset["sha256"]:
        raise RunError(f"the run's dataset changed since it started: {path}; "
                       "start a new run for the new data")
    items = read_dataset(path, dataset["image_root"])
    limit = dataset.get("limit")
    return itertools.islice(items, limit) if limit is not None else items


async def search_run(
    run_dir: Path,
    *,
    on_start: Callable[[int | None], None] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
    on_interrupt: Callable[[], None] | None = None,
    store: RunStore | None = None,
) -> RunSummary:
    """Search (or resume) the run recorded in `run_dir`.

    The first SIGINT/SIGTERM stops sending new calls; calls in flight finish and are stored,
    and unfinished questions stay resumable. A second one exits at once (commits are atomic).
    Pass `store` to keep the writer lock held since the run was recorded.
    """
    started = time.perf_counter()
    with contextlib.nullcontext(store) if store else RunStore.open(run_dir, write=True) as store:
        config, dataset = load_run(store)
        items = dataset_items(dataset)
        if on_start:
            total = count_records(Path(dataset["path"]))
            limit = dataset.get("limit")
            on_start(min(total, limit) if total is not None and limit is not None else total)
        models = build_models(config)
        use_image_directory(Path(run_dir) / IMAGE_CACHE_DIR)  # encode each image once per run
        gate = CallGate(store, session=uuid.uuid4().hex[:12])
        engine = Engine(config, store, models, gate, on_done=on_done)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_interrupts, gate, on_interrupt)
                await engine.run(items, collect=False)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            fatal = _first(group, (RunAborted, StoreError))
            if fatal is None:
                raise
            raise RunError(f"run stopped: {fatal}. Everything finished so far is stored; fix the "
                           f"cause, then `mics resume {run_dir}`") from None
        finally:
            await models.aclose()
        summary = summarize(store)
        summary.calls = dict(gate.counts)
        summary.interrupted = gate.stopping
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


async def _watch_interrupts(gate: CallGate, on_interrupt: Callable[[], None] | None) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _signum in signals:
            if gate.stopping:
                os._exit(130)
            gate.stop()
            if on_interrupt:
                on_interrupt()


def _first(group: BaseExceptionGroup, kind: type[BaseException] | tuple[type[BaseException], ...]
           ) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first(exc, kind)) is not None:
            return found
    return None


def summarize(store: RunStore) -> RunSummary:
    """Counts by status and stop reason, computed from the store."""
    summary = RunSummary(run_dir=str(store.run_dir))
    reasons: Counter[str] = Counter()
    for _qid, status, stop_reason in store.question_statuses():
        summary.questions += 1
        if status == "succeeded":
            summary.succeeded += 1
        elif status == "failed":
            summary.failed += 1
        else:
            summary.pending += 1
        if stop_reason:
            reasons[stop_reason] += 1
    summary.stop_reasons = dict(sorted(reasons.items()))
    return summary


def cache_hit_rates(store: RunStore) -> tuple[float | None, dict[str, tuple[int, int]]]:
    """Intern prefix-cache reuse from the stored calls: run-level sum(cached)/sum(prompt) and
    per question (prompt tokens, cached tokens)."""
    per_q: dict[str, list[int]] = {}
    for entry in store.iter_calls():
        if entry.get("role") != "intern":
            continue
        reply = store.memo_get(entry["key"])
        if reply is None:
            continue
        usage = reply.get("usage", {})
        tot = per_q.setdefault(entry.get("qid", ""), [0, 0])
        tot[0] += int(usage.get("prompt_tokens", 0))
        tot[1] += int(usage.get("cached_tokens", 0))
    prompt = sum(t[0] for t in per_q.values())
    cached = sum(t[1] for t in per_q.values())
    return (cached / prompt if prompt else None), {q: (t[0], t[1]) for q, t in per_q.items()}


def with_seed(config: RunConfig, seed: int | None) -> RunConfig:
    if seed is None:
        return config
    return replace(config, search=replace(config.search, seed=seed))


__all__ = [
    "ConfigError", "RunError", "RunSummary", "StoreError", "build_models", "dataset_items",
    "describe_dataset", "load_run", "record_run", "search_run", "start_run", "summarize",
    "with_seed",
]
