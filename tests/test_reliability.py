"""Reliability under every fault one machine can produce (issue 7, see RELIABILITY.md).

SIGKILL at random moments (bench/chaos.py at reduced size), SIGINT once and twice over HTTP,
fault storms and models that always fail, a hypothesis fuzz of the dataset loader, a hostile
dataset searched end to end, and sentinel API keys grepped from every file and output.
Bugs these tests found are fixed; their minimal reproductions stay as regression tests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.chaos import (
    MODELS,
    QuietLoopbackServer,
    Session,
    account,
    config_text,
    run_chaos,
    run_mics,
    run_storm,
    same_exports,
    stored_calls,
)
from bench.loopback import Faults
from mics.config import load_config
from mics.dataset import read_dataset
from mics.demo_data import write_demo_dataset
from mics.export import export_reference
from mics.run import search_run, start_run
from mics.types import Question, RecordError
from store import RunStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "simulated.toml"


def ok(session: Session) -> Session:
    assert session.rc == 0, f"mics {session.args} exited {session.rc}:\n{session.stderr[-3000:]}"
    return session


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# ---------------------------------------------------------------- 1. kill anywhere


def test_chaos_kills_resume_to_identical_exports(tmp_path: Path) -> None:
    """bench/chaos.py at reduced size: every kill lands and resumes; nothing paid twice."""
    report = run_chaos(questions=10, kills=5, seed=3, workdir=tmp_path)
    a = report.accounting
    assert report.kills_landed == 5, report.to_dict()["kill_points"]
    assert report.kills_resumed == 5
    assert {p.kind for p in report.kill_points} == {"time", "calls", "export"}
    assert report.exports_identical, report.export_diff
    assert report.trees_identical and report.same_calls_as_reference
    assert a["stored_twice"] == 0
    assert a["completed_calls_repeated"] == 0, a
    assert a["lost_in_unkilled_sessions"] == 0 and a["negative_lost_sessions"] == 0
    assert a["server_distinct_completed"] == report.reference["calls"] == a["stored_calls"]
    assert a["server_repeats"] == a["in_flight_lost"]  # every repeat re-buys a lost reply
    assert report.passed


@dataclass
class HttpRun:
    srv: QuietLoopbackServer
    work: Path
    search: list[str | Path]
    ref_out: Path


@pytest.fixture(scope="module")
def http_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRun]:
    """A loopback server (OpenAI endpoints for every model) and an uninterrupted export."""
    work = tmp_path_factory.mktemp("http")
    data, images = write_demo_dataset(work / "data", n=4)
    with QuietLoopbackServer(MODELS) as srv:
        cfg = work / "run.toml"
        cfg.write_text(config_text(srv.url))
        search: list[str | Path] = ["search", data, "--image-root", images, "--config", cfg]
        ok(run_mics([*search, "--run", work / "ref"]))
        ok(run_mics(["export", work / "ref", "--out", work / "ref-out", "--format", "all"]))
        yield HttpRun(srv, work, search, work / "ref-out")


def _start(args: list[str | Path]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _wait_for_calls(run: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> int:
    deadline = time.time() + timeout
    stored = 0
    while time.time() < deadline and stored < n and proc.poll() is None:
        time.sleep(0.05)
        stored = len(stored_calls(run))
    assert proc.poll() is None and stored >= n, f"stored {stored} calls, rc {proc.poll()}"
    return stored


def _resume_and_compare(h: HttpRun, run: Path, sessions: list[Session]) -> dict[str, Any]:
    h.srv.latency = {}
    sessions.append(ok(run_mics(["resume", run])))
    out = h.work / f"{run.name}-out"
    ok(run_mics(["export", run, "--out", out, "--format", "all"]))
    same, diff = same_exports(h.ref_out, out)
    assert same, diff
    acc = account(h.srv.log, sessions, stored_calls(run))
    assert acc["stored_twice"] == 0 and acc["completed_calls_repeated"] == 0, acc
    return acc


def test_first_sigint_stores_every_reply_in_flight(http_run: HttpRun) -> None:
    """One SIGINT: no call is started after it, every reply the server sent is stored, exit 130
    with a resume hint; resuming gives the uninterrupted exports."""
    h, run = http_run, http_run.work / "graceful"
    h.srv.clear_log()
    h.srv.latency = {"mentor": (0.3, 1.5)}
    start = time.time()
    proc = _start([*h.search, "--run", run])
    _wait_for_calls(run, 10, proc)
    t_sig = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # issue 10: stored what was in flight, then 128 + SIGINT
    assert f"resume with mics resume {run}" in " ".join(out.split())
    late = [e for e in h.srv.log if e.t > t_sig + 0.5]
    assert late == [], f"{len(late)} requests started after the SIGINT"
    session = Session("graceful", ["search"], start, time.time(), 130)
    acc = account(h.srv.log, [session], stored_calls(run))
    assert acc["server_completions"] == acc["stored_calls"], acc  # nothing in flight was lost
    with RunStore.open(run, write=False) as store:
        assert any(rec["status"] == "running" for _, rec in store.iter_questions()) or \
            store.question_count() < 4
    acc = _resume_and_compare(h, run, [session])
    assert acc["server_repeats"] == 0


def test_second_sigint_exits_at_once_and_loses_nothing_stored(http_run: HttpRun) -> None:
    """A second SIGINT exits 130 at once (slow replies still in flight); every stored call
    survives; resuming re-buys only the replies that were in flight."""
    h, run = http_run, http_run.work / "twice"
    h.srv.clear_log()
    h.srv.latency = {"mentor": (1.0, 3.0)}
    start = time.time()
    proc = _start([*h.search, "--run", run])
    _wait_for_calls(run, 5, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # the first SIGINT waits for the slow mentor replies
    before = len(stored_calls(run))
    t2 = time.time()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    took = time.time() - t2
    assert proc.returncode == 130
    assert took < 1.0, f"took {took:.2f}s to exit after the second SIGINT"
    session = Session("twice", ["search"], start, time.time(), 130, killed=True)
    assert len(stored_calls(run)) >= before
    acc = _resume_and_compare(h, run, [session])
    assert acc["in_flight_lost"] >= 1  # it really left replies behind
    assert acc["server_repeats"] == acc["in_flight_lost"]


def test_kill_between_the_run_records_leaves_a_resumable_run(tmp_path: Path) -> None:
    data, images = write_demo_dataset(tmp_path / "data", n=1)
    cfg, run = load_config(EXAMPLE), tmp_path / "R"
    with RunStore.open(run, create=True) as store:  # what a kill after the first commit leaves
        store.put_meta("config", cfg.to_dict())
    start_run(run, cfg, data, images, None)
    assert anyio.run(lambda: search_run(run)).questions == 1


# ---------------------------------------------------------------- 2. fault storms


def test_fault_storm_every_question_completes(tmp_path: Path) -> None:
    """20% of requests fail (429 + Retry-After, 500, 503, timeouts, drops, truncated JSON)."""
    r = run_storm(questions=4, rate=0.2, seed=2, workdir=tmp_path, max_retries=6)
    assert r["exit_code"] == 0
    assert set(r["faults_by_kind"]) == {"429", "500", "503", "slow", "drop", "malformed"}
    assert r["faults_injected"] > 30
    assert r["questions_finished"] == 4 and r["questions_no_mentor"] == 0
    assert r["retried_calls"] > 0 and r["retries_recorded_on_call"]
    assert r["max_attempts"] <= r["attempt_bound"]
    assert r["failed_call_attempts_max"] <= r["attempt_bound"]


def test_fault_storm_never_rebuys_a_delivered_reply(tmp_path: Path) -> None:
    r = run_storm(questions=1, rate=0.2, seed=2, workdir=tmp_path, kinds=("500",))
    assert r["questions_finished"] == 1
    assert r["delivered_replies_resent"] == 0, r["delivered_replies_resent_by_role"]


def _forced_run(tmp_path: Path, forced: dict[str, str]) -> tuple[Session, Path, Path]:
    data, images = write_demo_dataset(tmp_path / "data", n=2)
    with QuietLoopbackServer(MODELS, faults=Faults(forced=forced)) as srv:
        cfg = tmp_path / "run.toml"
        cfg.write_text(config_text(srv.url, max_retries=2))
        run, out = tmp_path / "R", tmp_path / "O"
        s = run_mics(["search", data, "--image-root", images, "--config", cfg, "--run", run])
    with RunStore.open(run, write=False) as store:
        export_reference(store, out)
    return s, run, out


ALL_MENTORS = {"m0": "500", "m1": "500", "m2": "500"}
ALL_INTERNS = {"i0": "503", "i1": "503", "i2": "503"}


@pytest.mark.parametrize("forced", [
    pytest.param({"m1": "500"}, id="one-mentor"),
    pytest.param({"i2": "503"}, id="one-intern"),
    pytest.param(ALL_MENTORS, id="all-mentors"),
    pytest.param({"judge": "500"}, id="judge"),
    pytest.param(ALL_INTERNS, id="all-interns"),
])
def test_a_model_that_always_fails(tmp_path: Path, forced: dict[str, str]) -> None:
    """Issue 10: every question that met the failing model is deferred, never scored (exit 3
    and one line naming the model); each failed call is recorded with every attempt's error
    and the bound on attempts (or, once the endpoint's circuit breaker is open, fails at once
    saying so). Before issue 10 such runs exited 0 with the failures scored as wrong."""
    s, run, out = _forced_run(tmp_path, forced)
    assert s.rc == 3, s.stderr
    line = " ".join(s.stderr.split())
    assert "2 questions deferred:" in line and any(m in line for m in forced), line
    with RunStore.open(run, write=False) as store:
        recs = {qid: rec for qid, rec in store.iter_questions()}
        failures = store.iter_failures()
    assert len(recs) == 2 and all(r["status"] == "deferred" and r["retryable"]
                                  for r in recs.values())
    assert {f["model"] for f in failures} == set(forced)
    for f in failures:
        if f["error"].startswith("circuit open"):
            assert f["attempts"] <= 3 and f"endpoint {f['model']}" in f["error"]
        else:
            assert f["attempts"] == 3 and len(f["errors"]) == 3  # max_retries = 2: bounded
            assert f"HTTP {forced[f['model']]}" in f["error"]
    assert {f["qid"] for f in failures} == set(recs)  # every question met the failing model
    for rec in recs.values():
        assert set(rec["outcome"]["details"]["endpoints"]) <= set(forced)
        assert "HTTP 5" in rec["outcome"]["error"] or "circuit open" in rec["outcome"]["error"]
    assert read_jsonl(out / "failed.jsonl") == [] and read_jsonl(out / "results.jsonl") == []


# ---------------------------------------------------------------- 3. hostile input: fuzz


def _png(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (CRC fixed) claims width x height."""
    data = bytearray(_png((1, 1)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


GOOD_IMAGES = ("ok.png", "ok.jpg", "sub/ok2.png", "./ok.png", "sub/../ok.png", "link_in.png",
               "{root}/ok.png", "sub//ok2.png")
BAD_IMAGES = ("zero.png", "trunc.png", "trunc.jpg", "text.png", "huge.png", "dir.png",
              "missing.png", "sub/", "../outside/secret.png", "../../etc/passwd",
              "../../../../../../../../etc/passwd", "/etc/passwd", "link_out.png",
              "link_dir/secret.png", "{outside}/secret.png", "sub/../../outside/secret.png",
              "file:///etc/passwd", "~/.ssh/id_rsa", "/", "..", ".",
              "root/../../outside/secret.png")


@dataclass(frozen=True)
class ImageTree:
    root: Path  # resolved
    outside: Path

    def fill(self, raw: bytes) -> bytes:
        """Put the real directories in for the {root} and {outside} placeholders."""
        return raw.replace(b"{root}", str(self.root).encode()).replace(
            b"{outside}", str(self.outside).encode())


def build_image_tree(base: Path) -> ImageTree:
    """Valid, broken and escaping image references (GOOD_IMAGES, BAD_IMAGES) around a root."""
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    root, outside = root.resolve(), outside.resolve()
    (root / "ok.png").write_bytes(_png())
    (root / "ok.jpg").write_bytes(_jpeg())
    (root / "sub" / "ok2.png").write_bytes(_png((5, 3)))
    (root / "zero.png").write_bytes(b"")
    (root / "trunc.png").write_bytes(_png((64, 64))[:60])
    (root / "trunc.jpg").write_bytes(_jpeg()[:200])
    (root / "text.png").write_bytes(b"this is not an image\n")
    (root / "huge.png").write_bytes(_png_claiming(20_000, 20_000))
    (root / "dir.png").mkdir()
    (outside / "secret.png").write_bytes(_png())
    (root / "link_in.png").symlink_to(root / "ok.png")
    (root / "link_out.png").symlink_to(outside / "secret.png")
    (root / "link_dir").symlink_to(outside, target_is_directory=True)
    return ImageTree(root, outside)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageTree:
    return build_image_tree(tmp_path_factory.mktemp("fuzz-images"))


# letters, whitespace of every kind, JSON-special, HTML-ish, non-Latin, astral, RTL, combining
ALPHABET = "aZ9 \t\n\r\x0b\x0c\x1c\u2028\u00a0\x00\"\\/<>&;:*#é中😀\u202e\u0301\ufeff"
TEXT = st.text(alphabet=ALPHABET, max_size=16)
CAPTION_BITS = ("<image>", "<IMAGE>", "<br/>", "<p>", "</p>", "<b>", "</b>", "&amp;", "&lt;",
                "\n", ", ", "<image> <image>", "According to the ", "\u00a0", "<div class=x>")
MARKERS = ("", "**Question:** ", "**Correct Answer:** ")


@dataclass
class Planned:
    """One line of the generated file and what the loader must make of it."""

    raw: bytes
    field: str | None  # None: a valid record; else the field its RecordError must name
    rid: str | None = None  # the str(rid) a valid record (or a rid-bearing error) has
    question: str = ""
    answer: str = ""
    n_images: int = 0


# Strategies are built once: making them inside the composite costs more than the loader.
INDEX = st.integers(0, 255)
BOOL = st.booleans()
SCALAR = st.one_of(TEXT, st.integers(0, 120), st.none())
CAPTIONS = st.lists(st.lists(st.sampled_from(CAPTION_BITS) | TEXT, max_size=5).map("".join),
                    max_size=3)
ENTRIES = st.lists(st.sampled_from(GOOD_IMAGES), max_size=3)
DEFECTS = (None, None, None, "drop", "junk", "image", "image_entry", "dup", "not_object",
           "bad_json", "bad_utf8", "short_messages", "empty_content")
BAD_JSON = (b'{"rid": "x",', b"{'rid': 1}", b"{1, 2", b'{"rid": "a"} trailing', b"{,}", b"nul",
            b'{"rid": "x" "messages": []}', b"\x00\x01")
BAD_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80")


def pick(draw: st.DrawFn, seq: Sequence[Any]) -> Any:
    return seq[draw(INDEX) % len(seq)]


def _content(draw: st.DrawFn, marker: str, replacement: str) -> tuple[str, str]:
    """Raw message content and the text the loader must make of it."""
    raw = pick(draw, MARKERS) + pick(draw, ("Why?", "Dx", "é 中文 ✓", " x ")) + draw(TEXT)
    return raw, raw.replace(marker, replacement).strip()


@st.composite
def planned_lines(draw: st.DrawFn) -> list[Planned]:
    """1 to 6 records, most with exactly one defect whose field is known."""
    out: list[Planned] = []
    seen: list[Any] = []  # rids the loader has registered (objects with a readable rid)
    for i in range(1 + draw(INDEX) % 6):
        q_raw, q_text = _content(draw, "**Question:**", " ")
        a_raw, a_text = _content(draw, "**Correct Answer:**", "")
        rid: Any = pick(draw, (f"r{i}", f"r{i}-{draw(TEXT).replace(chr(0), '0')}", 1000 + i))
        entries = draw(ENTRIES)
        rec: dict[str, Any] = {
            "rid": rid,
            "messages": [{"role": "user", "content": q_raw},
                         {"role": "assistant", "content": a_raw}],
        }
        if entries or draw(BOOL):
            rec["images"] = entries
        for key in ("presentation", "age_label", "gender_label"):
            if draw(BOOL):
                rec[key] = draw(SCALAR)
        if draw(BOOL):
            rec["caption"] = draw(CAPTIONS)
        defect = pick(draw, DEFECTS)
        if defect == "dup" and not seen:
            defect = None
        field: str | None = None
        raw: bytes | None = None
        if defect == "drop":
            field = pick(draw, ("rid", "messages"))
            del rec[field]
        elif defect == "junk":
            field = pick(draw, sorted(JUNK))
            _apply_junk(rec, field, pick(draw, JUNK[field]))
        elif defect in ("image", "image_entry"):
            pos = draw(INDEX) % (len(entries) + 1)
            bad = pick(draw, BAD_IMAGES if defect == "image" else (1, None, "", "  ", [], {}))
            rec["images"] = [*entries[:pos], bad, *entries[pos:]]
            field = f"images[{pos}]"
        elif defect == "dup":
            rec["rid"] = pick(draw, seen)
            field = "rid"
        elif defect == "short_messages":
            rec["messages"] = rec["messages"][: draw(INDEX) % 2]
            field = "messages"
        elif defect == "empty_content":
            turn = draw(INDEX) % 2
            rec["messages"][turn]["content"] = pick(
                draw, ("", "   ", "\n\t", "**Correct Answer:** " if turn else "**Question:**"))
            field = f"messages[{turn}].content"
        elif defect == "not_object":  # (a JSONL file starting with "[" reads as a JSON list)
            rec = pick(draw, ([rec], "record", 7, None, []) if i else ("r", 7, None))
            field = "record"
        elif defect == "bad_json":
            raw, field = pick(draw, BAD_JSON), "json"
        elif defect == "bad_utf8":
            line = json.dumps(rec, ensure_ascii=False).encode()
            raw = line.replace(b'"messages"', b'"mess' + pick(draw, BAD_UTF8) + b'ages"', 1)
            field = "line"
        if raw is None:
            raw = json.dumps(rec, ensure_ascii=draw(BOOL)).encode()
        readable_rid = (field not in ("record", "json", "line") and isinstance(rec, dict)
                        and "rid" in rec and _rid_ok(rec["rid"]))
        if readable_rid and defect != "dup":
            seen.append(rec["rid"])
        out.append(Planned(raw, field, str(rec["rid"]) if readable_rid else None,
                           q_text, a_text, len(entries)))
    return out


def _rid_ok(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, str):  # storable: no NUL, at most 200 UTF-8 bytes (an LMDB key part)
        return bool(rid.strip()) and "\x00" not in rid and len(rid.encode()) <= 200
    return isinstance(rid, int)


# field -> values that are wrong there (None and numbers are fine for the optional scalars,
# None and [] for images and caption)
JUNK: dict[str, tuple[Any, ...]] = {
    "rid": (None, True, False, 2.5, [], {}, [1], "", " \t", "a\x00b", "r" * 201, "é" * 101),
    "messages": (None, True, 0, 2.5, "", "x", {}, {"a": 1}, []),
    "messages[0]": (None, True, 0, "x", [], ["x"]),
    "messages[1].content": (None, True, 0, 2.5, [], {}, ["x"]),
    "images": (True, 0, 2.5, "ok.png", {}, {"a": 1}),
    "presentation": (True, False, [], {}, ["x"], {"a": 1}),
    "age_label": (True, [40], {}),
    "gender_label": (False, ["F"], {"g": "F"}),
    "caption": (True, 0, "x", {}),
    "caption[0]": (None, 1, True, [], {}),
}


def _apply_junk(rec: dict[str, Any], field: str, value: Any) -> None:
    if field == "messages[0]":
        rec["messages"][0] = value
    elif field == "messages[1].content":
        rec["messages"][1]["content"] = value
    elif field == "caption[0]":
        rec["caption"] = [value, "fine"]
    else:
        rec[field] = value


def _write(path: Path, tree: ImageTree, lines: list[Planned], as_list: bool
           ) -> dict[int, Planned]:
    """Write JSONL (record k on line k + 1) or a JSON list (item k on line k + 2)."""
    if as_list:
        path.write_bytes(b"[\n" + b",\n".join(tree.fill(p.raw) for p in lines) + b"\n]\n")
        return {k + 2: p for k, p in enumerate(lines)}
    path.write_bytes(b"\n".join(tree.fill(p.raw) for p in lines) + b"\n")
    return {k + 1: p for k, p in enumerate(lines)}


def check_loader(path: Path, tree: ImageTree, plan: dict[int, Planned]) -> None:
    """The oracle: one item per record, errors name the planned field and line, valid records
    parse, and no image outside the root is ever resolved."""
    items = list(read_dataset(path, tree.root))  # nothing may escape
    assert len(items) == len(plan), (len(items), len(plan))
    for k, (item, (line, p)) in enumerate(zip(items, sorted(plan.items()), strict=True)):
        assert item.index == k
        if isinstance(item, RecordError):
            assert item.line == line and item.field and item.message, item
            assert p.field is not None, f"valid record refused: {item}"
            assert item.field == p.field, (item, p.field)
            assert item.qid == (p.rid if p.rid is not None else f"line-{line}"), item
            continue
        assert isinstance(item, Question)
        assert p.field is None, f"expected an error on {p.field!r}, got {item.qid!r}"
        assert item.qid == p.rid and item.question == p.question
        assert item.gt_answer == p.answer and len(item.images) == p.n_images
        for ref in item.images:
            assert Path(ref.path).resolve().is_relative_to(tree.root), ref.path
            assert Path(ref.path).is_file() and ref.width > 0 and ref.height > 0


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=planned_lines(), as_list=st.booleans())
def test_dataset_loader_fuzz(tmp_path: Path, images: ImageTree, lines: list[Planned],
                             as_list: bool) -> None:
    """1,000 generated files: wrong types, missing fields, duplicate rids, invalid JSON,
    non-UTF-8 bytes, missing / zero-byte / truncated / non-image / 20,000 x 20,000 px images,
    traversal, absolute paths and symlinks out of the root."""
    as_list = as_list and all(p.field != "json" for p in lines)
    path = tmp_path / "fuzz.jsonl"
    check_loader(path, images, _write(path, images, lines, as_list))


# Inputs that once crashed the loader (minimal reproductions).
HOSTILE_LINES: dict[str, bytes] = {
    "nul-in-image-path": b'{"rid": "a", "messages": [{"content": "q"}, {"content": "a"}], '
                         b'"images": ["x\\u0000.png"]}',
    "overlong-image-path": b'{"rid": "a", "messages": [{"content": "q"}, {"content": "a"}], '
                           b'"images": ["' + b"a" * 5000 + b'.png"]}',
    "deeply-nested-json": b'{"rid": "a", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge-integer": b'{"rid": 1' + b"0" * 5000 + b"}",
    "caption-tag-split-by-html": b'{"rid": "a", "messages": [{"content": "q"}, '
                                 b'{"content": "a"}], "caption": ["<ima<b>ge>"]}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_LINES))
def test_loader_survives_hostile_line(tmp_path: Path, images: ImageTree, name: str) -> None:
    good = {"rid": "good", "messages": [{"content": "q"}, {"content": "a"}]}
    path = tmp_path / "d.jsonl"
    path.write_bytes(HOSTILE_LINES[name] + b"\n" + json.dumps(good).encode() + b"\n")
    items = list(read_dataset(path, images.root))
    if name == "caption-tag-split-by-html":  # valid: the tag formed by HTML removal is numbered
        assert isinstance(items[0], Question) and items[0].captions == ("image 1",)
    else:
        assert isinstance(items[0], RecordError) and items[0].line == 1 and items[0].field
    assert isinstance(items[1], Question) and items[1].qid == "good"


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(bits=["x\x00.png"])
@given(bits=st.lists(st.sampled_from(("\x00", "a" * 300, "<ima", "<b>", "ge>", "/", "..")),
                     min_size=1, max_size=6))
def test_loader_fuzz_hostile_paths_and_captions(tmp_path: Path, images: ImageTree,
                                                bits: list[str]) -> None:
    """Like the main fuzz, over the fragments that crash the loader today."""
    text = "".join(bits)
    rec = {"rid": "a", "messages": [{"content": "q"}, {"content": "a"}], "images": [text],
           "caption": [text]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    [item] = list(read_dataset(path, images.root))
    assert isinstance(item, RecordError) and item.field in ("images[0]", "caption[0]")


# ---------------------------------------------------------------- 3. hostile input: a search


def test_hostile_dataset_search_stores_bad_records_as_failed(tmp_path: Path) -> None:
    """`mics search` on a mixture: exit 0, each bad record in failed.jsonl (stage "input",
    line and field named), valid records searched, images only from inside --image-root."""
    tree = build_image_tree(tmp_path)
    q = [{"content": "**Question:** What is the diagnosis in case {}?"},
         {"content": "**Correct Answer:** Pneumothorax"}]

    def rec(rid: Any, images: list[Any] | None = None, **extra: Any) -> bytes:
        msgs = [{"content": m["content"].format(rid)} for m in q]
        return json.dumps({"rid": rid, "messages": msgs, "images": images or [], **extra}
                          ).encode()

    lines: list[tuple[bytes, str | None]] = [
        (rec("good-1", ["ok.png"]), None),
        (b'{"rid": "broken", "messages": [', "json"),
        (rec("bytes").replace(b"diagnosis", b"diagn\xffsis"), "line"),
        (rec(True), "rid"),
        (json.dumps({"rid": "no-messages"}).encode(), "messages"),
        (rec("traversal", ["ok.png", "../../etc/passwd"]), "images[1]"),
        (rec("absolute", ["/etc/passwd"]), "images[0]"),
        (rec("symlink-out", ["link_out.png"]), "images[0]"),
        (rec("zero-byte", ["zero.png"]), "images[0]"),
        (rec("truncated", ["trunc.png"]), "images[0]"),
        (rec("not-an-image", ["text.png"]), "images[0]"),
        (rec("huge", ["huge.png"]), "images[0]"),
        (rec("missing", ["missing.png"]), "images[0]"),
        (rec("age", age_label=[40]), "age_label"),
        (b"[1, 2, 3]", "record"),
        (rec(2, ["sub/ok2.png", "ok.jpg"]), None),
        (rec("good-3", ["link_in.png"]), None),
    ]
    data = tmp_path / "hostile.jsonl"
    data.write_bytes(b"\n".join(raw for raw, _ in lines) + b"\n")
    run, out = tmp_path / "R", tmp_path / "O"
    s = run_mics(["search", data, "--image-root", tree.root, "--config", EXAMPLE, "--run", run])
    assert s.rc == 0, s.stderr
    assert "Traceback" not in s.stdout + s.stderr
    ok(run_mics(["export", run, "--out", out]))
    failed = {(f["details"].get("line"), f["rid"]): f for f in read_jsonl(out / "failed.jsonl")}
    inputs = {line: f for (line, _), f in failed.items() if f["stage"] == "input"}
    for n, (_raw, field) in enumerate(lines, start=1):
        if field is None:
            continue
        assert n in inputs, f"line {n} ({field}) not stored as failed"
        f = inputs[n]
        assert f["details"]["field"] == field and f["error"], f
    assert len(inputs) == sum(field is not None for _, field in lines)
    searched = {"good-1", "2", "good-3"}
    results = {r["rid"] for r in read_jsonl(out / "results.jsonl")}
    others = {rid for (_, rid), f in failed.items() if f["stage"] != "input"}
    assert searched <= results | others
    with RunStore.open(run, write=False) as store:
        for qid in searched:
            rec_ = store.get_question(qid)
            assert rec_ is not None and rec_["status"] in ("succeeded", "failed")
            for img in rec_["question"]["images"]:
                assert Path(img["path"]).resolve().is_relative_to(tree.root)


UNSTORABLE: dict[str, dict[str, Any]] = {
    "nul-in-rid": {"rid": "a\x00b"},
    "rid-over-511-bytes": {"rid": "r" * 600},
    "lone-surrogate-in-rid": {"rid": "\udc80"},
    "lone-surrogate-in-question": {"question": "What \ud800 is it?"},
    "lone-surrogate-in-image-path": {"images": ["\udc80.png"]},
}


@pytest.mark.parametrize("name", sorted(UNSTORABLE))
def test_search_survives_unstorable_record(tmp_path: Path, name: str) -> None:
    tree = build_image_tree(tmp_path)
    bad = {"rid": "bad", "question": "What is it?", "images": [], **UNSTORABLE[name]}
    records = [
        {"rid": bad["rid"], "messages": [{"content": bad["question"]}, {"content": "A"}],
         "images": bad["images"]},
        {"rid": "good", "messages": [{"content": "What is it?"}, {"content": "A"}]},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "R"
    start_run(run, load_config(EXAMPLE), data, tree.root, None)
    summary = anyio.run(lambda: search_run(run))
    assert summary.questions == 2 and summary.failed >= 1
    with RunStore.open(run, write=False) as store:
        assert store.get_question("good")["status"] in ("succeeded", "failed")
        stages = [rec["outcome"].get("stage") for _, rec in store.iter_questions()]
    assert "input" in stages


def test_duplicate_rid_record_is_stored_as_failed(tmp_path: Path) -> None:
    msgs = [{"content": "What is it?"}, {"content": "A"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"rid": rid, "messages": msgs}) + "\n"
                            for rid in ("dup", "dup", "other")))
    run, out = tmp_path / "R", tmp_path / "O"
    start_run(run, load_config(EXAMPLE), data, None, None)
    anyio.run(lambda: search_run(run))
    with RunStore.open(run, write=False) as store:
        export_reference(store, out)
    inputs = [f for f in read_jsonl(out / "failed.jsonl") if f["stage"] == "input"]
    assert [(f["details"]["line"], f["details"]["field"]) for f in inputs] == [(2, "rid")]


# ---------------------------------------------------------------- 4. store integrity (CLI)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small finished simulated run (searched in-process)."""
    work = tmp_path_factory.mktemp("finished")
    data, images = write_demo_dataset(work / "data", n=3)
    start_run(work / "run", load_config(EXAMPLE), data, images, None)
    anyio.run(lambda: search_run(work / "run"))
    return work / "run"


def _damage(run: Path, how: str) -> str:
    """Damage a copy of a run; returns what the error message must say."""
    data = run / "store" / "data.mdb"
    if how == "truncated":
        os.truncate(data, data.stat().st_size // 2)
        return "truncated"
    if how == "not-lmdb":
        with data.open("r+b") as f:
            f.write(b"\x00garbage" * 1000)
        return "corrupt"
    if how == "corrupt-record":  # every copy of every question record (LMDB has no checksums)
        raw = data.read_bytes()
        assert raw.count(b'{"status":"') > 0
        data.write_bytes(raw.replace(b'{"status":"', b"\xff" * 11))
        return "corrupt record"
    with RunStore.open(run) as store:
        store.put_meta("schema_version", 99)
    return "newer mics"


@pytest.mark.parametrize("command", ["status", "export", "inspect", "resume"])
@pytest.mark.parametrize("how", ["truncated", "not-lmdb", "corrupt-record", "newer-schema"])
def test_damaged_store_gives_a_clear_error(request: pytest.FixtureRequest, tmp_path: Path,
                                           finished_run: Path, how: str, command: str) -> None:
    """Every command on a damaged store: exit 2 and one clear line, never a traceback."""
    from typer.testing import CliRunner

    from cli.app import app

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    expected = _damage(run, how)
    args = {"status": ["status", run], "export": ["export", run, "--out", tmp_path / "O"],
            "inspect": ["inspect", run, "--json"], "resume": ["resume", run]}[command]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())


# ---------------------------------------------------------------- 5. secrets


def _sentinel(name: str) -> str:
    return f"sk-SENTINEL-{name}-7f3a9c1e5b"


class EchoingServer(QuietLoopbackServer):
    """Answers every third model call with a retryable 503 that echoes the Authorization
    header back, as a badly written proxy might."""

    def _model_call(self, path: str, headers: Any, raw: bytes, model: str) -> Any:
        from bench.loopback import json_response as _json

        with self._lock:
            self._echo_n = getattr(self, "_echo_n", 0) + 1
            n = self._echo_n
        if n % 3 == 1:
            return _json(503, {"error": {"message": "overloaded; you sent "
                                         f"{headers.get('Authorization')}"}})
        return super()._model_call(path, headers, raw, model)


def _per_model_config(servers: dict[str, QuietLoopbackServer], tokenizer: Path | None) -> str:
    """One endpoint and one key variable per model; interns over sglang when a tokenizer."""
    lines = ["[search]", "seed = 0", "concurrency = 4", ""]
    for table, names in (("mentors", ("m0", "m1", "m2")), ("interns", ("i0", "i1", "i2")),
                         ("judge", ("judge",))):
        for name in names:
            srv = servers[name]
            sglang = table == "interns" and tokenizer is not None
            lines += ["[judge]" if table == "judge" else f"[[{table}]]", f'name = "{name}"',
                      f'backend = "{"sglang" if sglang else "openai"}"', f'model = "{name}"',
                      f'base_url = "{srv.url if sglang else srv.url + "/v1"}"',
                      f'api_key_env = "MICS_KEY_{name.upper()}"', "max_retries = 6",
                      "backoff_s = 0.01", "timeout_s = 10.0"]
            if sglang:
                lines.append(f'options = {{ tokenizer = "{tokenizer}" }}')
            lines.append("")
    return "\n".join(lines)



def _secret_search(tmp_path: Path, tokenizer: Path | None, server_cls: type,
                   echo: set[str], read_side: bool = True, n: int = 4) -> list[Session]:
    """A full search with a sentinel key per endpoint, then status and (`read_side`) every
    other read-side command."""
    data, imgs = write_demo_dataset(tmp_path / "data", n=n)
    env = {f"MICS_KEY_{m.upper()}": _sentinel(m) for m in MODELS}
    servers = {m: (server_cls if m in echo else QuietLoopbackServer)(
        {m: MODELS[m]}, api_key=_sentinel(m)) for m in MODELS}
    for srv in servers.values():
        srv.start()
    try:
        cfg = tmp_path / "secret.toml"
        cfg.write_text(_per_model_config(servers, tokenizer))
        run, out = tmp_path / "R", tmp_path / "O"
        sessions = [run_mics(["search", data, "--image-root", imgs, "--config", cfg,
                              "--run", run], env=env)]
        assert sessions[0].rc == 0, sessions[0].stderr
        assert all(srv.counts()["by_status"].get(401, 0) == 0 for srv in servers.values())
        qid = "synthetic-001"
        commands: list[list[str | Path]] = [
            ["status", run], ["inspect", run, "--json"], ["inspect", run, qid, "--json"],
            ["export", run, "--out", out, "--format", "all"],
            ["viz", run, "--all", "--out", tmp_path / "viz"], ["doctor", cfg]]
        for args in commands if read_side else commands[:1]:
            sessions.append(ok(cli(args, env)))
    finally:
        for srv in servers.values():
            srv.stop()
    return sessions


def cli(args: list[str | Path], env: dict[str, str]) -> Session:
    """A read-side command in-process (no interpreter start-up); output and any traceback."""
    from typer.testing import CliRunner

    from cli.app import app

    argv, start = [str(a) for a in args], time.time()
    result = CliRunner().invoke(app, argv, env=env)
    exc = result.exception
    trace = "".join(traceback.format_exception(exc)) if exc and not isinstance(
        exc, SystemExit) else ""
    return Session(argv[0], argv, start, time.time(), result.exit_code, stdout=result.output,
                   stderr=trace)


def _assert_no_sentinel(tmp_path: Path, sessions: list[Session]) -> None:
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "data.mdb" for p in files)
    for m in MODELS:
        key = _sentinel(m).encode()
        leaks = [str(p) for p in files if key in p.read_bytes()]
        assert leaks == [], f"key of {m} found in {leaks}"
        for s in sessions:
            assert key.decode() not in s.stdout + s.stderr, f"key of {m} printed by {s.args}"


def test_secrets_never_reach_store_exports_or_output(tmp_path: Path,
                                                     tokenizer_dir: Path) -> None:
    """Sentinel keys (one per endpoint, from the environment only): grep every file under the
    run, export and viz directories, and the output of search, status, inspect (tables and
    --json), export, viz and doctor."""
    sessions = _secret_search(tmp_path, tokenizer_dir, QuietLoopbackServer, echo=set())
    assert len(list((tmp_path / "viz").glob("*.html"))) > 1
    assert (tmp_path / "O" / "sft.jsonl").is_file()
    cfg_text = (tmp_path / "secret.toml").read_text()
    assert "SENTINEL" not in cfg_text  # keys come from the environment only
    with RunStore.open(tmp_path / "R", write=False) as store:
        stored = json.dumps(store.get_meta("config"))
    assert "MICS_KEY_M0" in stored  # the variable's name is kept, never its value
    summary = json.loads(sessions[2].stdout)
    assert summary["totals"]["calls"] > 0
    _assert_no_sentinel(tmp_path, sessions)


@pytest.mark.parametrize("echo", [
    pytest.param({"m0", "i0", "judge"}, id="openai"),
    pytest.param({"i1"}, id="sglang"),
])
def test_a_key_echoed_by_the_server_is_redacted(request: pytest.FixtureRequest, tmp_path: Path,
                                                echo: set[str]) -> None:
    """A server that echoes the key in a retryable error: the key still reaches nothing."""
    sglang = "i1" in echo  # interns over sglang (needs a tokenizer), else all openai
    tokenizer = request.getfixturevalue("tokenizer_dir") if sglang else None
    sessions = _secret_search(tmp_path, tokenizer, EchoingServer, echo=echo, read_side=False,
                              n=2)
    with RunStore.open(tmp_path / "R", write=False) as store:
        errors = [e for c in store.iter_calls() for e in c["errors"]]
    assert any("you sent" in e for e in errors)  # the echoing errors were recorded
    _assert_no_sentinel(tmp_path, sessions)
