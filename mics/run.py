"""One run from start to end: open the store, record what the run is, build models, search.

`start_run` records a new run (or checks that a re-run matches what is stored); `search_run`
then searches every question the store does not already hold as finished. Resume is the same
call: the deterministic replay answers every stored call from the memo.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from backends.gate import CallGate, RunAborted
from backends.images import CACHE_DIR_NAME as IMAGE_CACHE_DIR
from backends.images import use_directory as use_image_directory
from backends.registry import build_chat, build_rollout
from mics import __version__, records
from mics.config import ConfigError, RunConfig, config_changes
from mics.dataset import Cursor, read_dataset
from mics.engine import FINISHED, RETRYABLE, Engine, Models
from mics.errors import RunError
from mics.gc_quiet import quiet_gc
from mics.types import Outcome, Question, RecordError
from store import RunStore, StoreError

LOG = logging.getLogger("mics")


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
    total: int | None = None  # records in the dataset (after --limit); None when unknown
    tokens: int = 0  # prompt + completion tokens of the replies this session stored
    # issue 10: questions left undecided because a call still failed; endpoint -> questions
    deferred: int = 0
    deferred_by_endpoint: dict[str, int] = field(default_factory=dict)
    breakers_opened: list[str] = field(default_factory=list)  # this session, in order
    stop_signal: int | None = None  # SIGINT / SIGTERM that stopped this session

    @property
    def exit_code(self) -> int:
        """0 only for a run with every question decided: 128 + signal after a stop, 3 when
        questions are deferred or unfinished (so `search && export` never exports partial
        data unnoticed), 4 when no record could be read (every one a bad record: nothing was
        searched, typically a wrong --image-root)."""
        if self.stop_signal is not None:
            return 128 + self.stop_signal
        if self.deferred or self.pending:
            return 3
        unreadable = self.stop_reasons.get("bad_record", 0)
        return 4 if unreadable and unreadable == self.questions else 0

    def deferred_line(self) -> str | None:
        """The one line that says what is deferred and why, or None."""
        if not self.deferred:
            return None
        names = sorted(self.deferred_by_endpoint, key=lambda n: -self.deferred_by_endpoint[n])
        down = [n for n in names if n in self.breakers_opened]
        what = (f"endpoint {', '.join(down)} unreachable" if down else
                f"calls to {', '.join(names) or 'an endpoint'} failed")
        return (f"{self.deferred} question{'s' if self.deferred != 1 else ''} deferred: {what}; "
                f"run `mics resume {self.run_dir}` when it is back")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `--json` (with the exit code and the deferred line)."""
        return {**asdict(self), "exit_code": self.exit_code, "deferred_line": self.deferred_line()}


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


def record_run(store: RunStore, config: RunConfig, dataset: dict[str, Any]) -> list[str]:
    """Record a new run's config and dataset, or check a re-run against what is stored.

    A re-run may raise the record limit (a pilot run with `--limit 20`, then all records) and
    change endpoint settings (`config.ENDPOINT_FIELDS`: a server's new URL or port, a key
    variable, limits, timeouts, retries): the new values are stored in one commit, and the
    changed keys returned (and logged on the "mics" logger). Any other change is a RunError
    naming what differs."""
    run_dir = store.run_dir
    stored = store.get_meta("config")
    was = store.get_meta("dataset")
    if stored is None or was is None:  # new (or never fully recorded)
        with store.transaction():  # one commit: a kill leaves all of it or none
            store.put_meta("config", config.to_dict())
            store.put_meta("dataset", dataset)
            store.put_meta("created", {"time": time.time(), "mics": __version__})
        return []
    raised = was != dataset and _limit_raised(was, dataset)
    if was != dataset and not raised:
        raise RunError(f"{run_dir} holds a run over {_dataset_difference(was, dataset)}; resume "
                       f"it with `mics resume {run_dir}` or choose a new --run directory")
    old = RunConfig.from_dict(stored)
    endpoint, other = ([], []) if old == config else config_changes(old, config)
    if other:
        shown = ", ".join(other[:4]) + (f" and {len(other) - 4} more" if len(other) > 4 else "")
        raise RunError(f"{run_dir} holds a run with a different config ({shown}); between "
                       "sessions only endpoint settings may change (base_url, api_key_env, "
                       "limits, timeouts, retries): resume it with `mics resume "
                       f"{run_dir}` or choose a new --run directory")
    with store.transaction():
        if endpoint:
            store.put_meta("config", config.to_dict())
        if raised:
            store.put_meta("dataset", dataset)
    if endpoint:
        LOG.warning("%s: endpoint settings changed since the last session: %s (stored calls "
                    "stay valid; a new base_url must serve the same model)", run_dir,
                    ", ".join(endpoint))
    if raised:
        LOG.warning("%s: the record limit is raised from %s to %s; finished questions are "
                    "kept", run_dir, was["limit"], dataset["limit"] or "every record")
    return endpoint


def _limit_raised(was: dict[str, Any], now: dict[str, Any]) -> bool:
    """The same dataset and image root, read further: a limit raised, or lifted (None)."""
    return ({**was, "limit": None} == {**now, "limit": None} and was.get("limit") is not None
            and (now["limit"] is None or now["limit"] > was["limit"]))


def _dataset_difference(was: dict[str, Any], now: dict[str, Any]) -> str:
    if was.get("sha256") != now.get("sha256") or was.get("path") != now.get("path"):
        return (f"another dataset ({was.get('path')}, sha256 {str(was.get('sha256'))[:12]}; "
                f"given: {now.get('path')}, sha256 {str(now.get('sha256'))[:12]})")
    if was.get("image_root") != now.get("image_root"):
        return (f"another image root ({was.get('image_root')}; given: {now.get('image_root')}; "
                "`mics resume RUN --data PATH --image-root NEW_ROOT` moves it)")
    before = "every record" if was.get("limit") is None else f"at most {was['limit']} records"
    return f"{before} (a limit can only be raised; given: --limit {now.get('limit')})"


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


def load_run(store: records.RunStore) -> tuple[RunConfig, dict[str, Any]]:
    cfg = store.get_meta("config")
    dataset = store.get_meta("dataset")
    if cfg is None or dataset is None:
        raise RunError(f"{store.run_dir} has no recorded run; start one with `mics search`")
    return RunConfig.from_dict(cfg), dataset


def dataset_items(dataset: dict[str, Any], store: RunStore | None = None,
                  on_done: Callable[[Outcome], None] | None = None, fmt: str = "chiron",
                  retry: Collection[str] = (),
                  ) -> Iterator[Question | RecordError]:
    """The run's records, read lazily (`fmt`: [dataset].format); refuses a dataset changed
    since the run started.

    With `store` (a resume): reading starts at the stored resume point (every record before it
    is finished, see mark_resume_point), finished questions after it are reported to `on_done`
    and dropped without opening their images, and the images of every other question are
    checked against the fingerprints stored when they were first validated: a question whose
    image changed is stored as failed (retried by a resume once the image is restored), never
    searched with the new image. Questions in `retry` (finished ones to search again, see
    `infra_failed`) are never skipped, and then the whole file is read again (the resume point
    is dropped and recomputed at the end of the session).
    """
    path = Path(dataset["path"])
    if not path.is_file():
        raise RunError(f"the run's dataset is gone: {path}; if it moved, resume with "
                       f"`mics resume RUN --data NEW_PATH`")
    _check_unchanged(path, dataset, store)
    point = None
    if store is not None and retry and store.writable:
        store.put_meta("resume_point", None)
    if store is not None and not retry:  # past what finished since last marked (kill -9)
        point = mark_resume_point(store, dataset, fmt) if store.writable else resume_point(
            store, dataset)
    cursor = Cursor(point["offset"], point["line"], point["index"]) if point else Cursor()
    finished: dict[str, dict[str, Any]] = {}

    def skip(qid: str) -> bool:
        rec = store.get_question(qid)  # type: ignore[union-attr]
        if is_done(rec) and qid not in retry:
            finished[qid] = rec  # type: ignore[assignment]
        return qid in finished

    items: Iterator[Question | RecordError] = read_dataset(
        path, dataset["image_root"], skip if store is not None else None, cursor, fmt)
    limit = dataset.get("limit")
    if limit is not None:
        items = itertools.islice(items, max(0, limit - cursor.index))
    if store is not None:
        items = _resumable(items, store, finished, on_done)
    return items


def is_done(rec: dict[str, Any] | None) -> bool:
    """A stored question a resume will not search again (finished, not waiting for a retry)."""
    return (rec is not None and rec.get("status") in FINISHED and not rec.get("retryable")
            and rec.get("stop_reason") not in RETRYABLE)


def _check_unchanged(path: Path, dataset: dict[str, Any], store: RunStore | None) -> None:
    """The dataset's content hash must match; skipped when its size and mtime are those stored
    the last time the hash was checked."""
    st = path.stat()
    stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": dataset["sha256"]}
    if store is not None and store.get_meta("dataset_stat") == stat:
        return
    if file_sha256(path) != dataset["sha256"]:
        raise RunError(f"the run's dataset changed since it started: {path}; "
                       "start a new run for the new data")
    if store is not None and store.writable:
        store.put_meta("dataset_stat", stat)


def resume_point(store: RunStore | None, dataset: dict[str, Any]) -> dict[str, Any] | None:
    """Where a resume starts reading: every record before it is finished (None: the start)."""
    point = store.get_meta("resume_point") if store is not None else None
    return point if point and point.get("sha256") == dataset["sha256"] else None


def mark_resume_point(store: RunStore, dataset: dict[str, Any], fmt: str = "chiron"
                      ) -> dict[str, Any] | None:
    """Move the resume point past every finished record that follows it, counting them; run
    at the end of a session, so the next one starts reading where work is left (a JSON-list
    dataset has no resume point: it is read from its start)."""
    point = resume_point(store, dataset)
    cursor = Cursor(point["offset"], point["line"], point["index"]) if point else Cursor()
    ok, failed = (point["ok"], point["failed"]) if point else (0, 0)
    best = point
    limit = dataset.get("limit")
    for item in read_dataset(dataset["path"], dataset["image_root"], lambda _q: True, cursor,
                             fmt):
        if not cursor.tracked or (limit is not None and item.index >= limit):
            break
        line = item.line if isinstance(item, RecordError) else cursor.line - 1
        rec = store.get_question(f"{item.qid}@line{line}")  # a bad record of this line
        if rec is None and isinstance(item, Question):
            rec = store.get_question(item.qid)
        if not is_done(rec):
            break
        ok += rec["status"] == "succeeded"  # type: ignore[index]
        failed += rec["status"] != "succeeded"  # type: ignore[index]
        best = {"offset": cursor.offset, "line": cursor.line, "index": cursor.index, "ok": ok,
                "failed": failed, "sha256": dataset["sha256"]}
    if best is not None and best != point:
        store.put_meta("resume_point", best)
    return best


def _fingerprint_key(qid: str, i: int) -> str:
    return f"image/{qid}/{i}"


def _resumable(items: Iterator[Question | RecordError], store: RunStore,
               finished: dict[str, dict[str, Any]], on_done: Callable[[Outcome], None] | None
               ) -> Iterator[Question | RecordError]:
    for item in items:
        if isinstance(item, Question) and item.qid in finished:
            rec = finished.pop(item.qid)  # finished: counted, never searched again
            if on_done:
                on_done(Outcome(qid=item.qid, status=rec["status"],
                                stop_reason=rec.get("stop_reason") or "",
                                details={"skipped": True}))
            continue
        if isinstance(item, Question) and item.images:
            changed = check_fingerprints(store, item)
            if changed is not None:
                outcome = _store_changed(store, item, *changed)
                if on_done:
                    on_done(outcome)
                continue
        yield item


def check_fingerprints(store: RunStore, q: Question) -> tuple[str, str] | None:
    """Compare q's images with what validation stored (content hash, size, mtime) when they
    were first seen, and store the fingerprints of new ones; (field, message) if one changed."""
    for i, img in enumerate(q.images):
        st = os.stat(img.path)
        now = {"path": img.path, "sha256": img.sha256, "size": st.st_size,
               "mtime_ns": st.st_mtime_ns}
        key = _fingerprint_key(q.qid, i)
        was = store.get_meta(key)
        if was is not None and was["sha256"] != img.sha256:
            return f"images[{i}]", (
                f"image {q.image_paths[i]!r} ({img.path}) changed since the run started: "
                f"sha256 {was['sha256'][:12]}, {was['size']} bytes, then; sha256 "
                f"{img.sha256[:12]}, {st.st_size} bytes, now. Restore the original and "
                "`mics resume` (the question is retried), or start a new run")
        if was != now:
            store.put_meta(key, now)
    return None


def _store_changed(store: RunStore, q: Question, field_name: str, message: str) -> Outcome:
    outcome = Outcome(qid=q.qid, status="failed", stop_reason="bad_record", stage="input",
                      error=message, details={"field": field_name})
    old = store.get_question(q.qid) or {}
    store.put_question(q.qid, {"status": "failed", "index": q.index,
                               "question": old.get("question") or q.to_dict(),
                               "stop_reason": "bad_record", "retryable": True,
                               "outcome": outcome.to_dict()})
    return outcome


def relocate_dataset(store: RunStore, data: Path, image_root: Path | None) -> None:
    """Point a run at its moved dataset (and image root); only the same content is accepted."""
    _config, dataset = load_run(store)
    moved = describe_dataset(data, image_root, dataset.get("limit"))
    if moved["sha256"] != dataset["sha256"]:
        raise RunError(f"{moved['path']} is not the run's dataset (its content differs: sha256 "
                       f"{moved['sha256'][:12]}, the run's is {dataset['sha256'][:12]}); "
                       "start a new run for new data")
    if image_root is None:
        moved["image_root"] = dataset["image_root"]
    if moved != dataset:
        store.put_meta("dataset", moved)


def dataset_total(dataset: dict[str, Any], store: RunStore | None = None) -> int | None:
    """Records the run reads (for progress and ETA); None when not countable cheaply.

    With `store` (only once the dataset was checked unchanged, see dataset_items) the count is
    read from the store when it was counted before for the same content, else counted and
    stored: a resume does not read the whole file again for it."""
    path = Path(dataset["path"])
    if not path.is_file():
        return None
    cached = store.get_meta("dataset_records") if store is not None else None
    if cached is not None and cached.get("sha256") == dataset["sha256"]:
        total = cached["records"]
    else:
        total = count_records(path)
        if store is not None and store.writable:
            store.put_meta("dataset_records", {"sha256": dataset["sha256"], "records": total})
    limit = dataset.get("limit")
    return min(total, limit) if total is not None and limit is not None else total


async def search_run(
    run_dir: Path,
    *,
    on_start: Callable[[int | None, int, int], None] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
    on_interrupt: Callable[[], None] | None = None,
    on_gate: Callable[[CallGate], None] | None = None,
    store: RunStore | None = None,
    models: Models | None = None,
    retry_failed: bool = False,
    stop: anyio.Event | None = None,
) -> RunSummary:
    """Search (or resume) the run recorded in `run_dir`.

    Setting `stop` stops sending new calls; calls in flight finish and are stored, and
    unfinished questions stay resumable (cancelling the caller's scope also stops it). No
    signal handler is installed here: the CLI maps Ctrl-C to `stop` (cli/signals.py).
    Pass `store` to keep the writer lock held since the run was recorded, and `models` when
    they were built already (to check a config before anything was created).
    `on_start(total, ok, failed)` gets the record count and what was finished before the
    resume point; finished questions after it go to `on_done` (details "skipped") as read;
    `on_gate` the session's call gate (its counts and tokens, for progress lines).
    `retry_failed` also re-searches questions stored as failed for an infrastructure cause
    (see `infra_failed`), runs made before deferral included, and reads again the records that
    could not be read (see `unreadable_records`).
    """
    started = time.perf_counter()
    with contextlib.nullcontext(store) if store else RunStore.open(run_dir, write=True) as store:
        config, dataset = load_run(store)
        retry = infra_failed(store) if retry_failed else set()
        if retry_failed and store.writable:
            unreadable = unreadable_records(store)
            with store.transaction():  # read again: stored again if the record still fails
                for key in unreadable:
                    store.delete_question(key)
            retry |= unreadable  # not empty: the whole dataset is read again
        items = dataset_items(dataset, store, on_done, config.dataset.format, retry)
        point = resume_point(store, dataset)
        total = dataset_total(dataset, store)
        if on_start:
            on_start(total, *((point["ok"], point["failed"]) if point else (0, 0)))
        models = models or build_models(config)
        use_image_directory(Path(run_dir) / IMAGE_CACHE_DIR)  # encode each image once per run
        gate = CallGate(store, session=uuid.uuid4().hex[:12])
        if on_gate:
            on_gate(gate)
        engine = Engine(config, store, models, gate, on_done=on_done)
        engine.retry_qids = retry
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_when_set, stop or anyio.Event(), gate, on_interrupt)
                tg.start_soon(_mark_every, store, dataset, MARK_EVERY_S,
                              config.dataset.format)
                with quiet_gc():  # hundreds of collections a second otherwise (issue 15)
                    await engine.run(items, collect=False)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            fatal = _first(group, (RunAborted, StoreError))
            if fatal is None:
                raise
            raise RunError.from_error(fatal, f"run stopped: {fatal}. Everything finished so far "
                                      f"is stored; fix the cause, then `mics resume {run_dir}`"
                                      ) from None
        finally:
            with anyio.CancelScope(shield=True):  # close clients even when the owner cancels
                await models.aclose()
        mark_resume_point(store, dataset, config.dataset.format)
        summary = summarize(store, from_records=False)  # kept counts: no record read
        summary.total = total
        summary.calls = dict(gate.counts)
        summary.tokens = gate.tokens
        summary.interrupted = gate.stopping
        summary.breakers_opened = list(gate.breakers_opened)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


MARK_EVERY_S = 60.0  # the resume point also advances during a session (a kill -9 keeps it)


async def _mark_every(store: RunStore, dataset: dict[str, Any], seconds: float,
                      fmt: str = "chiron") -> None:
    while True:
        await anyio.sleep(seconds)
        mark_resume_point(store, dataset, fmt)


async def _stop_when_set(stop: anyio.Event, gate: CallGate,
                         on_interrupt: Callable[[], None] | None) -> None:
    await stop.wait()
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


def summarize(store: records.RunStore, *, from_records: bool = True) -> RunSummary:
    """Counts by status and stop reason, computed from the store.

    `from_records`: count from every question record (each one is read, so a damaged record is
    a StoreError), as `mics status` and `Run.summary()` do. Otherwise from the counts the store
    keeps beside the records (the closing summary of search_run: no record is read unless some
    question is deferred, so it does not grow with the finished questions)."""
    summary = RunSummary(run_dir=str(store.run_dir))
    reasons: Counter[str] = Counter()
    by_endpoint: Counter[str] = Counter()
    deferred_qids: list[str] | None = None
    if from_records:
        statuses = store.question_statuses()
        counts: dict[tuple[str, str | None], int] = Counter((s, r) for _q, s, r in statuses)
        deferred_qids = [q for q, s, _r in statuses if s == "deferred"]
    else:
        counts = store.question_counts()
    for (status, stop_reason), n in counts.items():
        summary.questions += n
        if status == "succeeded":
            summary.succeeded += n
        elif status == "failed":
            summary.failed += n
        elif status == "deferred":
            summary.deferred += n
        else:
            summary.pending += n
        if stop_reason:
            reasons[stop_reason] += n
    if summary.deferred:  # which endpoints they wait for: from their records
        if deferred_qids is None:
            deferred_qids = [q for q, s, _r in store.question_statuses() if s == "deferred"]
        for qid in deferred_qids:
            rec = store.get_question(qid) or {}
            for name in ((rec.get("outcome") or {}).get("details") or {}).get("endpoints", []):
                by_endpoint[name] += 1
    summary.stop_reasons = dict(sorted(reasons.items()))
    summary.deferred_by_endpoint = dict(sorted(by_endpoint.items()))
    return summary


def writer_pid(run_dir: Path) -> int | None:
    """The pid of the process searching the run now, or None (the lock file keeps the pid of
    a writer killed with -9, so the pid is checked to be alive)."""
    try:
        pid = int((Path(run_dir) / "lock").read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid


def run_activity(store: RunStore, summary: RunSummary) -> dict[str, Any]:
    """Total, rate and ETA from the call and failure logs (time spent searching, across
    sessions) and whether a process runs the search now."""
    spans: dict[str, list[float]] = {}
    for entry in [*store.iter_calls(), *store.iter_failures()]:  # a session may only fail
        t = entry.get("t")
        if t is None:
            continue
        span = spans.setdefault(entry.get("session", ""), [t, t])
        span[0], span[1] = min(span[0], t), max(span[1], t)
    active_s = sum(b - a for a, b in spans.values())
    _config, dataset = load_run(store)
    total = dataset_total(dataset)
    done = summary.succeeded + summary.failed
    rate = done / active_s if active_s > 0 and done else None
    left = None if total is None else max(0, total - done)
    pid = writer_pid(store.run_dir)
    return {"total": total, "finished": done, "left": left, "searching_s": round(active_s, 1),
            "questions_per_hour": None if rate is None else round(rate * 3600, 1),
            "eta_s": None if rate is None or left is None else round(left / rate),
            "sessions": len(spans), "running_pid": pid}


INFRA_STOPS = (*RETRYABLE, "deferred")


def unreadable_records(store: RunStore) -> set[str]:
    """Keys of the records stored as failed because they could not be read (a missing image, a
    bad field: `rid@lineN`, see Engine._record_failed). `--retry-failed` reads them again, so a
    restored image or a corrected `--image-root` gets its question searched."""
    return {qid for qid, rec in store.iter_questions()
            if rec.get("status") == "failed" and rec.get("stop_reason") == "bad_record"
            and not rec.get("retryable")}  # retryable ones (an image changed) retry anyway


def infra_failed(store: RunStore) -> set[str]:
    """Questions stored as failed for an infrastructure cause: a retryable stop reason, or a
    failure (e.g. an old run's "All mentor scores are zero.") of a question whose calls are in
    the failure log, or whose tree holds a sample or mentor whose call failed."""
    failed_calls = {f.get("qid") for f in store.iter_failures() if f.get("kind") == "call"}
    out = set()
    for qid, rec in store.iter_questions():
        if rec.get("status") != "failed" or rec.get("stop_reason") == "bad_record":
            continue
        details = (rec.get("outcome") or {}).get("details") or {}
        text = str(details.get("mentor_errors_by_depth", "")) + str(details.get("mentor_errors",
                                                                                 ""))
        if (rec.get("stop_reason") in INFRA_STOPS or qid in failed_calls
                or "call failed" in text or _tree_has_failed_call(store, qid)):
            out.add(qid)
    return out


def _tree_has_failed_call(store: RunStore, qid: str) -> bool:
    return any(s.get("verdict") in ("call-failed", "judge-failed")
               for n in store.get_nodes(qid) for s in n.get("samples", []))


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
    "describe_dataset", "load_run", "record_run", "relocate_dataset", "run_activity",
    "search_run", "start_run", "summarize", "with_seed", "writer_pid",
]
