"""RunStore against a real LMDB environment in tmp_path."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from store import SCHEMA_VERSION, RunStore, SchemaError, StoreError, StoreLocked


def run_py(code: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60, **kw)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def test_round_trips(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True) as s:
        assert s.get_meta("schema_version") == SCHEMA_VERSION
        assert s.get_meta("config") is None
        s.put_meta("config", {"seed": 7, "models": ["a", "b"]})
        assert s.get_meta("config") == {"seed": 7, "models": ["a", "b"]}

        s.put_question("q2", {"index": 1, "status": "done"})
        s.put_question("q1", {"index": 1, "status": "pending"})
        s.put_question("q0", {"index": 0})
        s.put_question("q9", {"status": "new"})  # no index: sorts as 0
        assert s.get_question("q2") == {"index": 1, "status": "done"}
        assert s.get_question("missing") is None
        assert [q for q, _ in s.iter_questions()] == ["q0", "q9", "q1", "q2"]
        assert s.question_count() == 4

        s.put_nodes("q1", [("n1", {"id": "n1"}), ("n0", {"id": "n0", "score": 0.5})])
        s.put_nodes("q10", [("n0", {"id": "other"})])  # shares a prefix with q1 as a string
        assert s.get_nodes("q1") == [{"id": "n0", "score": 0.5}, {"id": "n1"}]
        s.put_nodes("q1", [("n1", {"id": "n1", "v": 2})])
        assert s.get_nodes("q1")[1] == {"id": "n1", "v": 2}
        assert s.node_count() == 3
        s.delete_nodes("q1")
        assert s.get_nodes("q1") == []
        assert s.get_nodes("q10") == [{"id": "other"}]
        assert s.node_count() == 1

        assert s.add_failure({"qid": "q1", "error": "boom"}) == 1
        assert s.add_failure({"qid": "q2", "error": "bang"}) == 2
        assert s.iter_failures() == [{"qid": "q1", "error": "boom", "seq": 1},
                                     {"qid": "q2", "error": "bang", "seq": 2}]

        stats = s.stats()
        assert stats["questions"] == 4 and stats["nodes"] == 1 and stats["failures"] == 2
        assert stats["map_size"] >= stats["used_bytes"] > 0

    with RunStore.open(run_dir, write=False) as r:  # everything survives a reopen
        assert r.get_meta("config") == {"seed": 7, "models": ["a", "b"]}
        assert r.get_nodes("q10") == [{"id": "other"}]
        assert len(r.iter_failures()) == 2
        with pytest.raises(StoreError, match="opened read-only"):
            r.put_meta("x", 1)
        with pytest.raises(StoreError, match="opened read-only"):
            r.memo_put("k", {}, {})


def test_memo_and_call_log(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True) as s:
        assert s.memo_get("k1") is None
        assert s.memo_put("k1", {"text": "a"}, {"model": "m", "tokens": 3}) == 1
        assert s.memo_put("k2", {"text": "b"}, {"model": "m"}) == 2
        assert s.memo_put("k1", {"text": "a2"}, {"model": "m"}) == 3  # re-sent: logged again
        assert s.memo_get("k1") == {"text": "a2"}
        assert s.memo_count() == 2 and s.call_count() == 3
        assert s.iter_calls() == [
            {"model": "m", "tokens": 3, "key": "k1", "seq": 1},
            {"model": "m", "key": "k2", "seq": 2},
            {"model": "m", "key": "k1", "seq": 3},
        ]
    with RunStore.open(run_dir) as s:  # sequence numbers continue after a reopen
        assert s.memo_put("k3", {}, {}) == 4
        assert [c["seq"] for c in s.iter_calls()] == [1, 2, 3, 4]


def test_transaction_groups_and_discards(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True) as s:
        with s.transaction():
            s.put_question("q", {"status": "done"})
            s.put_nodes("q", [("a", {"id": "a"})])
            assert s.memo_put("k", {"r": 1}, {}) == 1
            assert s.get_question("q") is None  # not committed until the block ends
        assert s.get_question("q") == {"status": "done"} and s.get_nodes("q") == [{"id": "a"}]

        with pytest.raises(RuntimeError), s.transaction():
            s.put_question("q", {"status": "lost"})
            s.memo_put("k2", {}, {})
            raise RuntimeError
        assert s.get_question("q") == {"status": "done"} and s.memo_get("k2") is None
        assert s.memo_put("k3", {}, {}) == 2  # the discarded seq is reused


def test_map_growth(run_dir: Path) -> None:
    blob = "x" * 5000
    with RunStore.open(run_dir, create=True, map_size=64 << 10) as s:
        for i in range(600):
            s.memo_put(f"key{i}", {"i": i, "blob": blob}, {"i": i})
        with s.transaction():  # a large group that has to grow the map mid-commit
            for i in range(600, 1000):
                s.memo_put(f"key{i}", {"i": i, "blob": blob}, {"i": i})
        assert s.stats()["map_size"] > 5_000_000
        assert all(s.memo_get(f"key{i}")["i"] == i for i in range(1000))
    with RunStore.open(run_dir, map_size=64 << 10) as s:
        assert s.memo_count() == 1000 and s.call_count() == 1000
        assert s.memo_get("key999")["blob"] == blob
        s.memo_put("more", {"blob": blob * 10}, {})  # grows again from the reopened size
        assert s.memo_get("more")["blob"] == blob * 10


def test_second_writer_is_refused(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True) as s:
        s.put_meta("x", 1)
        with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
            RunStore.open(run_dir)  # also within one process
        code = (f"from store import RunStore\nRunStore.open({str(run_dir)!r})")
        proc = run_py(code)
        assert proc.returncode != 0
        assert "StoreLocked" in proc.stderr
        assert f"run directory {run_dir} is in use by another mics process" in proc.stderr
        assert f"(pid {os.getpid()})" in proc.stderr
    RunStore.open(run_dir).close()  # free again once closed


def test_read_only_while_writer_runs(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True) as s:
        s.put_question("q", {"index": 3})
        s.memo_put("k", {"r": 1}, {})
        code = (
            "from store import RunStore\n"
            f"with RunStore.open({str(run_dir)!r}, write=False) as r:\n"
            "    print(r.get_question('q'), r.memo_count(), r.call_count())\n"
        )
        proc = run_py(code)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["{'index':", "3}", "1", "1"]
        with RunStore.open(run_dir, write=False) as r:  # in the same process too
            assert r.get_question("q") == {"index": 3}
            s.put_question("q2", {})
            assert r.question_count() == 2


def test_read_only_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run at"):
        RunStore.open(tmp_path / "nope", write=False)
    with pytest.raises(StoreError, match="no run at"):
        RunStore.open(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_newer_schema_is_refused(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True) as s:
        s.put_meta("schema_version", SCHEMA_VERSION + 1)
    for write in (True, False):
        with pytest.raises(SchemaError, match=f"newer mics \\(schema {SCHEMA_VERSION + 1}\\)"):
            RunStore.open(run_dir, write=write)
    with open(run_dir / "lock", "rb") as f:  # the failed writer open released the lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_file_is_a_store_error(run_dir: Path, damage: str) -> None:
    with RunStore.open(run_dir, create=True) as s:
        for i in range(500):
            s.memo_put(f"k{i}", {"blob": "y" * 300}, {})
    data = run_dir / "store" / "data.mdb"
    size = data.stat().st_size
    if damage == "garbage":
        data.write_bytes(os.urandom(size))
    else:
        os.truncate(data, size // 2)
    for write in (True, False):
        with pytest.raises(StoreError, match=str(data)) as info:
            RunStore.open(run_dir, write=write)
        assert type(info.value) is StoreError


def test_lock_released_after_sigkill(run_dir: Path) -> None:
    code = (
        "import time\nfrom store import RunStore\n"
        f"s = RunStore.open({str(run_dir)!r}, create=True)\n"
        "s.put_question('q', {'status': 'done'})\n"
        "s.memo_put('k', {'r': 1}, {'m': 'x'})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}"):
            RunStore.open(run_dir)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with RunStore.open(run_dir) as s:
        assert s.get_question("q") == {"status": "done"}
        assert s.memo_get("k") == {"r": 1} and s.call_count() == 1
        s.put_meta("after", True)


def test_closed_store(run_dir: Path) -> None:
    s = RunStore.open(run_dir, create=True)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_meta("x")


def test_reader_follows_map_growth_of_writer(run_dir: Path) -> None:
    with RunStore.open(run_dir, create=True, map_size=64 << 10) as s:
        s.put_meta("x", 1)
        code = (
            "import sys\nfrom store import RunStore\n"
            f"r = RunStore.open({str(run_dir)!r}, write=False, map_size=64 << 10)\n"
            "print(r.memo_count(), flush=True)\n"
            "sys.stdin.readline()\n"
            "print(r.memo_count(), r.memo_get('k299')['i'], flush=True)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "0"
        for i in range(300):
            s.memo_put(f"k{i}", {"i": i, "blob": "z" * 4000}, {})
        assert s.stats()["map_size"] > 1 << 20
        out, err = proc.communicate("\n", timeout=60)
        assert proc.returncode == 0, err
        assert out.split() == ["300", "299"]


def _scanned(s: RunStore) -> dict[tuple[str, str | None], int]:
    """The counts as question_statuses gives them, record by record."""
    out: dict[tuple[str, str | None], int] = {}
    for _qid, status, stop in s.question_statuses():
        out[(status, stop)] = out.get((status, stop), 0) + 1
    return out


def _kept(s: RunStore) -> dict[tuple[str, str | None], int]:
    """The counts as stored beside the records (not recounted from them)."""
    stored = s.get_meta("question_counts")
    assert stored["n"] == s.question_count()
    return {(st, stop): n for st, stop, n in stored["by"]}


def test_question_counts_follow_every_write(run_dir: Path) -> None:
    import random

    rng = random.Random(7)
    statuses = [{"status": "running"}, {"status": "succeeded", "stop_reason": "full_score"},
                {"status": "failed", "stop_reason": "max_depth"}, {"status": "deferred",
                "stop_reason": "deferred"}, {"index": 3}, {"status": "failed"}]
    with RunStore.open(run_dir, create=True, map_size=64 << 10) as s:
        assert s.question_counts() == {}
        for step in range(400):
            qid = f"q{rng.randrange(60)}"
            rec = {**rng.choice(statuses), "pad": "x" * rng.randrange(3000)}
            if step % 50 == 0:  # a group, with replacements of records put in it
                with s.transaction():
                    for k in range(30):
                        s.put_question(f"q{rng.randrange(80)}", {**rng.choice(statuses), "k": k})
            elif step % 77 == 0:  # a discarded group changes nothing
                with pytest.raises(RuntimeError), s.transaction():
                    s.put_question(qid, rec)
                    s.put_question("never", rec)
                    raise RuntimeError
            else:
                s.put_question(qid, rec)
            if step % 20 == 0:
                assert _kept(s) == _scanned(s) == s.question_counts()
        assert _kept(s) == _scanned(s) == s.question_counts()
        assert sum(s.question_counts().values()) == s.question_count()
    with RunStore.open(run_dir, write=False) as r:
        assert r.question_counts() == _scanned(r)


def _raw_write(run_dir: Path, db: bytes, key: bytes, value: bytes | None) -> None:
    """Write (or delete) one entry with lmdb itself, bypassing RunStore."""
    import lmdb

    env = lmdb.open(str(run_dir / "store"), max_dbs=10)
    try:
        with env.begin(write=True) as txn:
            handle = env.open_db(db, txn=txn)
            if value is None:
                txn.delete(key, db=handle)
            else:
                txn.put(key, value, db=handle)
    finally:
        env.close()


def test_question_counts_of_a_run_that_did_not_keep_them(run_dir: Path) -> None:
    import orjson

    with RunStore.open(run_dir, create=True) as s:
        for i in range(5):
            s.put_question(f"q{i}", {"status": "succeeded", "stop_reason": "full_score"})
    # a writer that kept no counts stores one more record
    _raw_write(run_dir, b"questions", b"q9", orjson.dumps({"status": "failed"}))
    want = {("succeeded", "full_score"): 5, ("failed", None): 1}
    with RunStore.open(run_dir, write=False) as r:
        assert r.question_counts() == want  # counted from the records: they no longer add up
    _raw_write(run_dir, b"meta", b"question_counts", None)  # a run from before they were kept
    with RunStore.open(run_dir, write=False) as r:
        assert r.question_counts() == want and r.get_meta("question_counts") is None
    with RunStore.open(run_dir) as s:
        assert s.question_counts() == want  # a writer counts once and keeps them
        assert s.get_meta("question_counts")["n"] == 6
        s.put_question("q0", {"status": "running"})
        assert s.question_counts() == {("succeeded", "full_score"): 4, ("failed", None): 1,
                                       ("running", None): 1}


def test_lmdb_store_satisfies_the_run_store_protocol(run_dir: Path) -> None:
    """The engine, the call gate and the readers are typed against `mics.records.RunStore`:
    the LMDB store has every member, with the same parameters (mypy checks the types)."""
    import inspect

    from mics.records import RunStore as RunStoreProtocol

    members = [n for n, v in vars(RunStoreProtocol).items()
               if callable(v) and not n.startswith("_")]
    assert {"memo_get", "memo_put", "get_nodes", "iter_questions", "transaction"} <= set(members)
    with RunStore.open(run_dir, create=True) as s:
        typed: RunStoreProtocol = s
        assert isinstance(typed, RunStoreProtocol)
        assert isinstance(typed.run_dir, Path)
    for name in members:
        want = inspect.signature(getattr(RunStoreProtocol, name)).parameters
        got = inspect.signature(getattr(RunStore, name)).parameters
        assert [(p.name, p.kind) for p in got.values()] == \
            [(p.name, p.kind) for p in want.values()], name

    class Partial:  # a store without the read methods is not one
        run_dir = run_dir

        def memo_get(self, key: str) -> dict | None:
            return None

    assert not isinstance(Partial(), RunStoreProtocol)
