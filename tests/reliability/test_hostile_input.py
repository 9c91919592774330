"""Reliability: hostile input. A hypothesis fuzz of the dataset loader, hostile lines and
paths, and a hostile dataset searched end to end (issue 7, see RELIABILITY.md). Bugs these
tests found are fixed; their minimal reproductions stay as regression tests."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import EXAMPLE, ok, read_jsonl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.chaos import run_mics
from mics.config import load_config
from mics.dataset import read_dataset
from mics.export import export_reference
from mics.run import search_run, start_run
from mics.types import Question, RecordError
from store import RunStore


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


# ---------------------------------------------------------------- a hostile dataset searched


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
