"""The run store: one LMDB environment per run directory, orjson values, short transactions.

Layout: ``run_dir/store/`` holds the LMDB environment, ``run_dir/lock`` the writer's flock and pid.
One writer per run (an exclusive ``flock``, released by the OS even on SIGKILL); any number of
read-only openers, also while the writer runs. Every method runs one short transaction, so the
map can grow (``set_mapsize`` needs no transaction open in the process) whenever a write is full.

Durability: every commit reaches the OS at once (it survives SIGKILL of the process); the fsync
that makes it survive a machine crash or power loss is grouped: the first commit at least
``sync_interval_s`` (default 0.25 s) after the last fsync flushes everything so far, and close
flushes the rest. A per-commit fsync costs ~0.3 ms, which capped a run at ~770 model calls/s
(bench/overhead.py); ``sync_interval_s=0`` restores it.

Memory: LMDB reads through a shared read-only map of ``data.mdb``, and every page a write or a
lookup touches stays mapped, so the resident set grew with the store (744 MB after 10,000
questions) though the process's own heap stayed flat. A writer unmaps them 4 times a second
(``madvise(MADV_DONTNEED)``, Linux): the page cache keeps them and the next read maps them again.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import orjson

from mics.errors import StoreError

__all__ = ["SCHEMA_VERSION", "RunStore", "SchemaError", "StoreError", "StoreLocked"]

SCHEMA_VERSION = 1
DATABASES = ("meta", "questions", "nodes", "memo", "calls", "failures")
_SEQ_DBS = ("calls", "failures")
_MAX_GROWTHS = 40
SYNC_INTERVAL_S = 0.25  # grouped fsync: at most this much committed work awaits the disk
TRIM_INTERVAL_S = 0.25  # a writer unmaps the store pages it touched at most this often
_MADV_DONTNEED = 4
_T = TypeVar("_T")
_Op = Callable[["lmdb.Transaction"], None]


class StoreLocked(StoreError):
    """Another process holds the run directory for writing."""


class SchemaError(StoreError):
    """The run was written with a schema this version of mics cannot read."""


class _Env:
    """One open LMDB environment, shared by every RunStore of this process on the same path."""

    def __init__(self, key: str, env: lmdb.Environment, dbs: dict[str, Any], writable: bool,
                 sync_interval_s: float | None = None):
        self.key, self.env, self.dbs, self.writable = key, env, dbs, writable
        self.lock = threading.RLock()  # every transaction of this env runs under it
        self.refs = 1
        self.sync_interval_s = sync_interval_s  # None: LMDB decides (sync or not) per commit
        self.synced_at = self.trimmed_at = time.monotonic()
        self.unsynced = False
        self.commits = 0
        self.data_path = os.path.join(key, "data.mdb")
        self.spans: list[tuple[int, int]] | None = None  # the map's address ranges, once read
        self.spans_for = 0  # the map size they were read at

    def committed(self) -> None:
        """After a commit: fsync and unmap pages when due (caller holds the lock)."""
        global _COMMITS
        self.commits += 1
        _COMMITS += 1
        now = time.monotonic()
        if now - self.trimmed_at >= TRIM_INTERVAL_S:
            self._trim()
            self.trimmed_at = now
        if self.sync_interval_s is None:
            return
        self.unsynced = True
        if now - self.synced_at >= self.sync_interval_s:
            self.flush(now)

    def _trim(self) -> None:
        """Unmap this process's pages of the store's read-only map; the map's address is
        looked up in /proc/self/maps once, and again only after the map was resized."""
        size = self.env.info()["map_size"]
        if self.spans is None or size != self.spans_for:
            self.spans, self.spans_for = _map_spans(self.data_path), size
        if not _unmap_spans(self.spans):
            self.spans = None  # the map moved: look it up again next time

    def flush(self, now: float | None = None) -> None:
        """fsync every commit so far (caller holds the lock)."""
        if self.unsynced:
            self.env.sync(True)
            self.unsynced = False
        self.synced_at = time.monotonic() if now is None else now


def _load_madvise() -> Callable[..., int] | None:
    if not os.path.exists("/proc/self/maps"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _load_madvise()


def _map_spans(data_path: str) -> list[tuple[int, int]]:
    """The address ranges of this process's read-only shared map of ``data_path``."""
    if _MADVISE is None:
        return []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            rows = [line.split(None, 5) for line in f if line.rstrip("\n").endswith(data_path)]
    except OSError:
        return []
    spans = []
    for fields in rows:
        # only LMDB's read-only shared file map: its pages come back from the page cache
        if len(fields) == 6 and fields[1] == "r--s" and fields[5].rstrip("\n") == data_path:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    return spans


def _unmap_spans(spans: list[tuple[int, int]]) -> bool:
    """Drop the pages of ``spans`` (best effort); False if one is no longer mapped."""
    if _MADVISE is None:
        return True
    return all(_MADVISE(lo, hi - lo, _MADV_DONTNEED) == 0 for lo, hi in spans)


_COMMITS = 0  # write transactions committed by this process, all stores together


def commits_in_process() -> int:
    """Write transactions this process has committed so far, over every run store."""
    return _COMMITS


_OPEN: dict[str, _Env] = {}  # py-lmdb refuses to open one environment twice in a process
_OPEN_LOCK = threading.Lock()


def _enc(value: Any) -> bytes:
    return orjson.dumps(value)


def _key(key: str) -> bytes:
    raw = key.encode()
    if not raw or len(raw) > 511:
        raise StoreError(f"store keys must be 1 to 511 bytes; got {len(raw)}: {key[:60]!r}")
    return raw


def _seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _node_prefix(qid: str) -> bytes:
    if "\x00" in qid:
        raise StoreError(f"question id {qid[:60]!r} contains a NUL character")
    return _key(qid + "\x00")


def _open_env(store_dir: Path, write: bool, sync: bool, map_size: int,
              sync_interval_s: float = 0.0) -> _Env:
    """Open (or create, for a writer) the environment and its named databases.

    With ``sync`` and ``sync_interval_s > 0`` commits are not fsynced one by one (MDB_NOSYNC);
    the store fsyncs them as a group (see the module docstring).
    """
    grouped = write and sync and sync_interval_s > 0
    data = store_dir / "data.mdb"
    # A read-only opener must create nothing; lock.mdb only goes missing when no writer ran here.
    lock = write or (store_dir / "lock.mdb").exists()
    try:
        env = lmdb.open(str(store_dir), map_size=map_size, max_dbs=len(DATABASES) + 2,
                        subdir=True, readonly=not write, create=write,
                        sync=sync and not grouped, lock=lock)
    except lmdb.Error as e:
        raise StoreError(f"cannot open the run store {data}: {e}; the file may be corrupt") from e
    try:
        # A truncated file would make LMDB read past its end (SIGBUS); check before any read.
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = data.stat().st_size
        if size < need:
            raise StoreError(f"the run store {data} is truncated ({size} bytes, needs {need}); "
                             "restore it from a backup or start a new run")
        if write:
            env.reader_check()
            with env.begin(write=True) as txn:
                dbs = {n: env.open_db(n.encode(), txn=txn, create=True) for n in DATABASES}
                if txn.get(b"schema_version", db=dbs["meta"]) is None:
                    txn.put(b"schema_version", _enc(SCHEMA_VERSION), db=dbs["meta"])
        else:
            dbs = {n: env.open_db(n.encode(), create=False) for n in DATABASES}
    except lmdb.NotFoundError as e:
        env.close()
        raise StoreError(f"{store_dir} is not a mics run store (a database is missing)") from e
    except lmdb.Error as e:
        env.close()
        raise StoreError(f"cannot read the run store {data}: {e}; the file may be corrupt") from e
    except BaseException:
        env.close()
        raise
    return _Env(os.path.realpath(store_dir), env, dbs, write,
                sync_interval_s if grouped else None)


def _take_lock(run_dir: Path) -> int:
    fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(f"run directory {run_dir} is in use by another mics process "
                          f"(pid {holder}); wait for it or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


_COUNTS_KEY = b"question_counts"  # meta: {"n": questions, "by": [[status, stop, n], ...]}
_Counts = dict[tuple[str, str | None], int]


def _status_of(rec: dict) -> tuple[str, str | None]:
    return rec.get("status", ""), rec.get("stop_reason")


def _enc_counts(counts: _Counts, n: int) -> bytes:
    return _enc({"n": n, "by": [[s, r, c] for (s, r), c in sorted(
        counts.items(), key=lambda kv: str(kv[0]))]})


def _valid_counts(txn: lmdb.Transaction, dbs: dict[str, Any], stored: dict) -> _Counts | None:
    """The stored counts, or None when they do not add up to the stored questions (a run
    written before they were kept, or by a writer that did not keep them)."""
    if not isinstance(stored, dict) or stored.get("n") != txn.stat(dbs["questions"])["entries"]:
        return None
    return {(s, r): c for s, r, c in stored.get("by", [])}


def _scan_counts(txn: lmdb.Transaction, dbs: dict[str, Any]) -> _Counts:
    counts: _Counts = {}
    for v in txn.cursor(db=dbs["questions"]).iternext(keys=False):
        key = _status_of(orjson.loads(v))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _counts_in(txn: lmdb.Transaction, dbs: dict[str, Any]) -> _Counts:
    """The counts as of this (write) transaction, counted from the records when missing."""
    raw = txn.get(_COUNTS_KEY, db=dbs["meta"])
    counts = None if raw is None else _valid_counts(txn, dbs, orjson.loads(raw))
    return _scan_counts(txn, dbs) if counts is None else counts


class RunStore:
    """The persistent state of one run: config, questions, trees, call memo and log, failures."""

    def __init__(self, run_dir: Path, shared: _Env, writable: bool, lock_fd: int | None):
        self.run_dir, self.writable = run_dir, writable
        self._sh: _Env | None = shared
        self._lock_fd = lock_fd
        self._batch: list[_Op] | None = None
        self._seq: dict[str, int] = {}

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, run_dir: str | Path, *, write: bool = True, create: bool = False,
             sync: bool = True, sync_interval_s: float = SYNC_INTERVAL_S,
             map_size: int = 64 << 20) -> RunStore:
        """Open a run; a writer takes the run's lock, ``create`` makes a missing run.

        ``sync``: fsync commits (grouped every ``sync_interval_s``; 0: every commit); without
        it the OS writes them back when it likes. Either way a commit survives SIGKILL.
        """
        run_dir = Path(run_dir)
        store_dir = run_dir / "store"
        if not (store_dir / "data.mdb").is_file() and not (write and create):
            raise StoreError(f"no run at {run_dir}")
        lock_fd = None
        if write:
            store_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = _take_lock(run_dir)
        try:
            shared = cls._acquire(store_dir, write, sync, map_size, sync_interval_s)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        store = cls(run_dir, shared, write, lock_fd)
        try:
            version = store.get_meta("schema_version")
            if not isinstance(version, int):
                raise StoreError(f"{run_dir} is not a mics run (no schema version)")
            if version > SCHEMA_VERSION:
                raise SchemaError(f"this run was written by a newer mics (schema {version}); "
                                  "upgrade mics to read it")
            if write:
                store._load_seqs()
        except BaseException:
            store.close()
            raise
        return store

    @staticmethod
    def _acquire(store_dir: Path, write: bool, sync: bool, map_size: int,
                 sync_interval_s: float) -> _Env:
        with _OPEN_LOCK:
            shared = _OPEN.get(os.path.realpath(store_dir))
            if shared is None:
                shared = _open_env(store_dir, write, sync, map_size, sync_interval_s)
                _OPEN[shared.key] = shared
            elif write and not shared.writable:
                raise StoreError(f"run store {store_dir} is open read-only in this process; "
                                 "close it before opening it for writing")
            else:
                shared.refs += 1
            return shared

    def close(self) -> None:
        """Close the store and release the run's lock; safe to call twice."""
        shared, self._sh = self._sh, None
        if shared is not None:
            with _OPEN_LOCK:
                shared.refs -= 1
                if shared.refs == 0:
                    del _OPEN[shared.key]
                    with shared.lock:
                        try:
                            shared.flush()
                        finally:
                            shared.env.close()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- transactions

    def _shared(self) -> _Env:
        if self._sh is None:
            raise StoreError(f"the run store {self.run_dir} is closed")
        return self._sh

    def _read(self, fn: Callable[[lmdb.Transaction, dict[str, Any]], _T]) -> _T:
        shared = self._shared()
        with shared.lock:
            for _ in range(3):
                try:
                    with shared.env.begin() as txn:
                        return fn(txn, shared.dbs)
                except lmdb.MapResizedError:
                    shared.env.set_mapsize(0)  # a writer elsewhere grew the map: adopt its size
                except lmdb.Error as e:
                    raise StoreError(f"cannot read the run store in {self.run_dir}: {e}") from e
                except orjson.JSONDecodeError as e:
                    raise StoreError(f"corrupt record in the run store {self.run_dir}: {e}") from e
        raise StoreError(f"the run store in {self.run_dir} keeps being resized; try again")

    def _check_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"the run store {self.run_dir} was opened read-only")

    def _write(self, op: _Op) -> None:
        self._check_writable()
        if self._batch is not None:
            self._batch.append(op)
            return
        try:
            self._apply([op])
        except BaseException:
            self._load_seqs()
            raise

    def _apply(self, ops: list[_Op]) -> None:
        shared = self._shared()
        with shared.lock:
            for _ in range(_MAX_GROWTHS):
                try:
                    with shared.env.begin(write=True) as txn:
                        for op in ops:
                            op(txn)
                    shared.committed()
                    return
                except lmdb.MapFullError:
                    # The failed transaction is already aborted and no other one is open here.
                    shared.env.set_mapsize(shared.env.info()["map_size"] * 2)
                except lmdb.Error as e:
                    raise StoreError(f"cannot write the run store in {self.run_dir}: {e}") from e
        raise StoreError(f"the run store in {self.run_dir} could not grow its map")

    @contextmanager
    def transaction(self) -> Iterator[RunStore]:
        """Group the writes made inside the block into one commit, applied at exit.

        Reads inside the block see only what was committed before it. Nested blocks join the
        outer one. If the block raises, none of its writes happen.
        """
        self._check_writable()
        if self._batch is not None:
            yield self
            return
        self._batch = []
        try:
            yield self
            ops = self._batch
            self._batch = None
            self._apply(ops)
        except BaseException:
            self._batch = None
            self._load_seqs()
            raise

    def _load_seqs(self) -> None:
        def last(txn: lmdb.Transaction, dbs: dict[str, Any]) -> dict[str, int]:
            out = {}
            for name in _SEQ_DBS:
                cur = txn.cursor(db=dbs[name])
                out[name] = int.from_bytes(cur.key(), "big") if cur.last() else 0
            return out

        self._seq = self._read(last)

    def _append(self, name: str, entry: dict) -> tuple[int, dict]:
        self._check_writable()
        seq = self._seq[name] + 1
        self._seq[name] = seq
        return seq, {**entry, "seq": seq}

    def _count(self, name: str) -> int:
        return self._read(lambda txn, dbs: txn.stat(dbs[name])["entries"])

    def _get(self, name: str, key: bytes) -> Any | None:
        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> Any | None:
            raw = txn.get(key, db=dbs[name])
            return None if raw is None else orjson.loads(raw)

        return self._read(fn)

    def _put(self, name: str, key: bytes, value: bytes) -> None:
        db = self._shared().dbs[name]
        self._write(lambda txn: txn.put(key, value, db=db))

    def _values(self, name: str) -> list[Any]:
        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[Any]:
            return [orjson.loads(v) for v in txn.cursor(db=dbs[name]).iternext(keys=False)]

        return self._read(fn)

    # ---------------------------------------------------------------- meta

    def get_meta(self, key: str) -> Any | None:
        """The value stored under a meta key, or None."""
        return self._get("meta", _key(key))

    def put_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under a meta key."""
        self._put("meta", _key(key), _enc(value))

    # ---------------------------------------------------------------- call memo and log

    def memo_get(self, key: str) -> dict | None:
        """The memoised reply for a call key, or None."""
        return self._get("memo", _key(key))

    def memo_get_many(self, keys: Sequence[str]) -> list[dict | None]:
        """The memoised replies for several call keys (None where missing), in one read."""
        raw_keys = [_key(k) for k in keys]

        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[dict | None]:
            db = dbs["memo"]
            return [None if (raw := txn.get(k, db=db)) is None else orjson.loads(raw)
                    for k in raw_keys]

        return self._read(fn)

    def memo_put(self, key: str, reply: dict, log: dict) -> int:
        """Store a reply and append ``log`` to the call log in one commit; return its seq.

        Every call appends a log entry (with ``key`` and ``seq`` added), even for a key already
        in the memo, so the log counts calls actually sent. Sequence numbers start at 1.
        """
        [seq] = self.memo_put_many([(key, reply, log)])
        return seq

    def memo_put_many(self, entries: Sequence[tuple[str, dict, dict]]) -> list[int]:
        """`memo_put` for several ``(key, reply, log)`` entries, all in one commit (or in the
        enclosing `transaction()`); their seqs, in order."""
        dbs = self._shared().dbs
        memo, calls = dbs["memo"], dbs["calls"]
        rows: list[tuple[bytes, bytes, bytes, bytes]] = []
        seqs: list[int] = []
        self._check_writable()
        seq = self._seq["calls"]
        for key, reply, log in entries:
            seq += 1
            rows.append((_key(key), _enc(reply), _seq_key(seq),
                         _enc({**log, "key": key, "seq": seq})))
            seqs.append(seq)
        self._seq["calls"] = seq

        def op(txn: lmdb.Transaction) -> None:
            for k, value, seq_raw, entry_raw in rows:
                txn.put(k, value, db=memo)
                txn.put(seq_raw, entry_raw, db=calls)

        if rows:
            self._write(op)
        return seqs

    def memo_count(self) -> int:
        """Number of memoised replies."""
        return self._count("memo")

    def iter_calls(self) -> list[dict]:
        """The call log in sequence order."""
        return self._values("calls")

    def call_count(self) -> int:
        """Number of entries in the call log."""
        return self._count("calls")

    # ---------------------------------------------------------------- questions

    def put_question(self, qid: str, rec: dict) -> None:
        """Store (replace) a question's record; the run's status counts follow in the same
        commit (see question_counts)."""
        k, value, dbs = _key(qid), _enc(rec), self._shared().dbs
        new = _status_of(rec)

        def op(txn: lmdb.Transaction) -> None:
            counts = _counts_in(txn, dbs)
            old = txn.get(k, db=dbs["questions"])
            try:
                was = _status_of(orjson.loads(old)) if old is not None else None
            except orjson.JSONDecodeError:  # a damaged record being replaced: the counts'
                was = None  # total no longer matches, so the next reader recounts
            if was is not None:
                left = counts.pop(was, 0) - 1
                if left > 0:
                    counts[was] = left
            counts[new] = counts.get(new, 0) + 1
            txn.put(k, value, db=dbs["questions"])
            txn.put(_COUNTS_KEY, _enc_counts(counts, sum(counts.values())), db=dbs["meta"])

        self._write(op)

    def delete_question(self, qid: str) -> None:
        """Remove a question's record (nothing when there is none); the status counts follow in
        the same commit."""
        k, dbs = _key(qid), self._shared().dbs

        def op(txn: lmdb.Transaction) -> None:
            old = txn.get(k, db=dbs["questions"])
            if old is None:
                return
            counts = _counts_in(txn, dbs)
            try:
                was = _status_of(orjson.loads(old))
            except orjson.JSONDecodeError:  # a damaged record: the total no longer matches,
                was = None  # so the next reader recounts
            if was is not None:
                left = counts.pop(was, 0) - 1
                if left > 0:
                    counts[was] = left
            txn.delete(k, db=dbs["questions"])
            txn.put(_COUNTS_KEY, _enc_counts(counts, sum(counts.values())), db=dbs["meta"])

        self._write(op)

    def get_question(self, qid: str) -> dict | None:
        """A question's record, or None."""
        return self._get("questions", _key(qid))

    def iter_questions(self) -> list[tuple[str, dict]]:
        """All ``(qid, record)`` pairs sorted by ``record["index"]`` (default 0), then qid."""
        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[tuple[str, dict]]:
            return [(k.decode(), orjson.loads(v)) for k, v in txn.cursor(db=dbs["questions"])]

        return sorted(self._read(fn), key=lambda kv: (kv[1].get("index", 0), kv[0]))

    def question_statuses(self) -> list[tuple[str, str, str | None]]:
        """``(qid, status, stop_reason)`` of every question, without keeping whole records."""
        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[tuple[str, str, str | None]]:
            out = []
            for k, v in txn.cursor(db=dbs["questions"]):
                rec = orjson.loads(v)
                out.append((k.decode(), rec.get("status", ""), rec.get("stop_reason")))
            return out

        return self._read(fn)

    def question_counts(self) -> dict[tuple[str, str | None], int]:
        """``(status, stop_reason) -> questions`` over every stored question, as
        question_statuses would count them, without reading the records: put_question keeps
        the counts in ``meta`` in the same commit as the record. A run written before they
        were kept (or whose question count no longer matches them) is counted from its records
        once; a writer stores the result."""
        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]
               ) -> dict[tuple[str, str | None], int] | None:
            raw = txn.get(_COUNTS_KEY, db=dbs["meta"])
            return None if raw is None else _valid_counts(txn, dbs, orjson.loads(raw))

        counts = self._read(fn)
        if counts is not None:
            return counts
        if not self.writable or self._batch is not None:
            return self._read(_scan_counts)
        out: list[dict[tuple[str, str | None], int]] = []
        dbs = self._shared().dbs

        def op(txn: lmdb.Transaction) -> None:
            out.clear()
            out.append(_counts_in(txn, dbs))
            txn.put(_COUNTS_KEY, _enc_counts(out[0], sum(out[0].values())), db=dbs["meta"])

        self._write(op)
        return dict(out[0])

    def question_count(self) -> int:
        """Number of stored questions."""
        return self._count("questions")

    # ---------------------------------------------------------------- nodes

    def put_nodes(self, qid: str, nodes: list[tuple[str, dict]]) -> None:
        """Store (insert or replace) ``(node_id, record)`` pairs of one question in one commit."""
        prefix = _node_prefix(qid)
        items = [(_key(prefix.decode() + nid), _enc(rec)) for nid, rec in nodes]
        if not items:
            return
        db = self._shared().dbs["nodes"]

        def op(txn: lmdb.Transaction) -> None:
            for k, v in items:
                txn.put(k, v, db=db)

        self._write(op)

    def get_nodes(self, qid: str) -> list[dict]:
        """A question's node records in node-id byte order."""
        prefix = _node_prefix(qid)

        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> list[dict]:
            cur, out = txn.cursor(db=dbs["nodes"]), []
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out.append(orjson.loads(v))
            return out

        return self._read(fn)

    def delete_nodes(self, qid: str) -> None:
        """Delete every node of a question."""
        prefix, db = _node_prefix(qid), self._shared().dbs["nodes"]

        def op(txn: lmdb.Transaction) -> None:
            cur = txn.cursor(db=db)
            if cur.set_range(prefix):
                while cur.key().startswith(prefix) and cur.delete():
                    pass

        self._write(op)

    def node_count(self) -> int:
        """Number of stored nodes over all questions."""
        return self._count("nodes")

    # ---------------------------------------------------------------- failures

    def add_failure(self, entry: dict) -> int:
        """Append an entry (``seq`` added) to the failure log; return its seq (from 1)."""
        seq, rec = self._append("failures", entry)
        key, value, db = _seq_key(seq), _enc(rec), self._shared().dbs["failures"]
        self._write(lambda txn: txn.put(key, value, db=db))
        return seq

    def iter_failures(self) -> list[dict]:
        """The failure log in sequence order."""
        return self._values("failures")

    # ---------------------------------------------------------------- stats

    def commit_count(self) -> int:
        """Write transactions committed through this process's handle of the environment."""
        return self._shared().commits

    def stats(self) -> dict[str, int]:
        """Entry counts per database, plus ``map_size`` and ``used_bytes`` of the environment."""
        def fn(txn: lmdb.Transaction, dbs: dict[str, Any]) -> dict[str, int]:
            out = {name: txn.stat(db)["entries"] for name, db in dbs.items()}
            env = self._shared().env
            out["map_size"] = env.info()["map_size"]
            out["used_bytes"] = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
            return out

        return self._read(fn)
