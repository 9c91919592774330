"""Tests for the dataset loader (mics.dataset) and the synthetic demo set (mics.demo_data)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from helpers import CHIRON
from PIL import Image, ImageFile

from mics.dataset import clean_captions, inspect_image, read_dataset
from mics.demo_data import write_demo_dataset
from mics.types import Question, RecordError

CHIRON_RIDS = [
    "169992", "159949", "189353", "190893", "158377",
    "178062", "160688", "177194", "189817", "181112",
]  # fmt: skip


# ---------------------------------------------------------------- helpers


def _png_bytes(size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("L", size, bytes(range(256)) * (size[0] * size[1] // 256)).save(
        buf, format="JPEG", quality=90
    )
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR (with a valid CRC) claims width x height."""
    data = bytearray(_png_bytes((1, 1)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _rec(rid: Any = "r1", images: Any = None, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "rid": rid,
        "messages": [
            {"role": "user", "content": f"**Question:** What is shown in case {rid}?"},
            {"role": "assistant", "content": "**Correct Answer:** A finding."},
        ],
        "images": images if images is not None else [],
        "presentation": "Cough.",
        "age_label": "40 years",
        "gender_label": "Female",
        "caption": ["According to the <image>\n, a finding."] if images else [],
    }
    rec.update(extra)
    return rec


def _write_lines(path: Path, lines: list[Any], end: bytes = b"\n") -> Path:
    raw = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + end)
    return path


def _load(path: Path, root: Path | None = None) -> list[Question | RecordError]:
    return list(read_dataset(path, root))


def _only_error(results: list[Question | RecordError]) -> RecordError:
    errors = [r for r in results if isinstance(r, RecordError)]
    assert len(errors) == 1, results
    return errors[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image root holding one valid PNG, ok.png."""
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "ok.png").write_bytes(_png_bytes())
    return d


def _sandwich(tmp_path: Path, root: Path, bad: Any) -> tuple[RecordError, list[Question]]:
    """Write good, bad, good records; return the one error and the loaded questions."""
    path = _write_lines(
        tmp_path / "d.jsonl", [_rec("good1", ["ok.png"]), bad, _rec("good2", ["ok.png"])]
    )
    results = _load(path, root)
    assert len(results) == 3
    questions = [r for r in results if isinstance(r, Question)]
    assert [q.qid for q in questions] == ["good1", "good2"]
    assert [r.index for r in results] == [0, 1, 2]
    err = _only_error(results)
    assert err.line == 2 and err.index == 1
    return err, questions


# ---------------------------------------------------------------- Chiron demo records


@pytest.fixture(scope="module")
def chiron() -> dict[str, Question]:
    if not (CHIRON / "demo.jsonl").is_file():
        pytest.fail(f"Chiron demo data missing at {CHIRON} (tests need ../shared)")
    results = _load(CHIRON / "demo.jsonl", CHIRON / "images")
    assert all(isinstance(r, Question) for r in results), [str(r) for r in results]
    return {q.qid: q for q in results if isinstance(q, Question)}


@pytest.fixture(scope="module")
def chiron_raw() -> dict[str, dict[str, Any]]:
    if not (CHIRON / "demo.jsonl").is_file():
        pytest.fail(f"Chiron demo data missing at {CHIRON} (tests need ../shared)")
    lines = (CHIRON / "demo.jsonl").read_text(encoding="utf-8").splitlines()
    return {d["rid"]: d for d in map(json.loads, filter(str.strip, lines))}


def test_chiron_loads_all_records_in_order(chiron: dict[str, Question]) -> None:
    assert list(chiron) == CHIRON_RIDS
    assert [q.index for q in chiron.values()] == list(range(10))


def test_chiron_question_and_answer_are_stripped(
    chiron: dict[str, Question], chiron_raw: dict[str, dict[str, Any]]
) -> None:
    for rid, q in chiron.items():
        raw_q = chiron_raw[rid]["messages"][0]["content"]
        assert q.question == raw_q.replace("**Question:**", " ").strip()
        assert "**" not in q.question and "**" not in q.gt_answer
        assert q.question.startswith(("Given", "Based"))
    assert chiron["178062"].gt_answer == "Post-traumatic headache"
    assert chiron["189353"].gt_answer == "Pacemaker lead fracture."


def test_chiron_images_hashed_and_typed_from_content(
    chiron: dict[str, Question], chiron_raw: dict[str, dict[str, Any]]
) -> None:
    for rid, q in chiron.items():
        assert q.image_paths == tuple(chiron_raw[rid]["images"])
        assert len(q.images) == len(q.image_paths) >= 1
        for ref, rel in zip(q.images, q.image_paths, strict=True):
            path = CHIRON / "images" / rel
            assert Path(ref.path) == path.resolve() and Path(ref.path).is_absolute()
            assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            expected = {".png": "image/png", ".jpeg": "image/jpeg"}[path.suffix]
            assert ref.mime == expected
            with Image.open(path) as im:
                assert (ref.width, ref.height) == im.size


def test_chiron_case_info_169992_exact(chiron: dict[str, Question]) -> None:
    expected = (
        "Chief complaint: Interscapular chest pain. Aortic dissection?\n"
        "Age: 45 years\n"
        "Gender: Male\n"
        "Image analysis:\n"
        "Modality 1: According to the image 1, no aortic dissection.\n"
        "Incidental anomalous course of the left coronary artery, which passes between the "
        "right ventricular outflow tract and the ascending aorta."
    )
    assert chiron["169992"].case_info == expected


def test_chiron_177194_second_caption_without_tags(chiron: dict[str, Question]) -> None:
    q = chiron["177194"]
    assert q.captions == (
        "According to the image 1, image 2, cT cisternography in coronal and axial planes shows "
        "a contrast leak through the left cribriform plate to the left-sided anterior ethmoidal "
        "air cells.",
        "Contrast leak and accumulation within the left-sided anterior ethmoid air cells.",
    )
    assert q.case_info.endswith(
        "\nModality 2: Contrast leak and accumulation within the left-sided anterior ethmoid "
        "air cells."
    )


def test_chiron_189817_two_images_in_one_caption(chiron: dict[str, Question]) -> None:
    q = chiron["189817"]
    assert [r.mime for r in q.images] == ["image/png", "image/jpeg"]
    (caption,) = q.captions
    assert caption.startswith("According to the image 1, marked regurgitation")
    assert "According to the image 2, additionally, there is non-visualization" in caption
    assert "image 3" not in caption


def test_chiron_captions_are_clean_and_title_unused(
    chiron: dict[str, Question], chiron_raw: dict[str, dict[str, Any]]
) -> None:
    for rid, q in chiron.items():
        assert "<image>" not in q.case_info and "<br" not in q.case_info
        assert ",  " not in q.case_info  # B22: no double space after the renumbered tags
        assert chiron_raw[rid]["certainty"] not in q.case_info
        assert q.case_info.startswith("Chief complaint: ")
        assert "\nImage analysis:\nModality 1: " in q.case_info
    assert "Normal CT head" not in chiron["178062"].case_info
    assert "no intracranial bleed.\nFrontal and parietal sulci" in chiron["178062"].captions[0]
    assert "<25%" in chiron["190893"].captions[0]  # not mistaken for an HTML tag


# ---------------------------------------------------------------- captions and case info


def test_clean_captions_maps_tags_per_group_when_image_order_differs() -> None:
    paths = ["r/ct_group2/0.png", "r/ct_group2/1.png", "r/x-ray_group1/0.png"]
    captions = [
        "According to the <image>\n, chest film.",
        "According to the <image>\n<image>\n, ct.",
    ]
    assert clean_captions(captions, paths) == (
        "According to the image 3, chest film.",
        "According to the image 1, image 2, ct.",
    )


def test_clean_captions_global_counter_without_groups_and_html() -> None:
    captions = ["According to the <image>\n, a.<br/>b<br>c", "<p>According to the <image>\n, d</p>"]
    assert clean_captions(captions, ["x.png", "y.png"]) == (
        "According to the image 1, a.\nb\nc",
        "According to the image 2, d",
    )


def test_missing_scalars_and_no_captions(tmp_path: Path) -> None:
    rec = _rec("t1")
    for key in ("presentation", "age_label", "gender_label", "caption", "images"):
        del rec[key]
    rec["title"] = "Secret diagnosis"
    (q,) = _load(_write_lines(tmp_path / "d.jsonl", [rec]))
    assert isinstance(q, Question)
    assert q.case_info == "Chief complaint: N/A\nAge: N/A\nGender: N/A\nCaptions: None"
    assert q.images == () and q.image_paths == () and q.captions == ()


def test_integer_rid_is_accepted_as_string(tmp_path: Path) -> None:
    (q,) = _load(_write_lines(tmp_path / "d.jsonl", [_rec(42)]))
    assert isinstance(q, Question) and q.qid == "42"


# ---------------------------------------------------------------- bad records


def test_invalid_json_line(tmp_path: Path, root: Path) -> None:
    err, _ = _sandwich(tmp_path, root, b'{"rid": "x", "messages": [')
    assert err.field == "json" and err.qid == "line-2"
    assert "line 2" in str(err)


def test_non_utf8_line(tmp_path: Path, root: Path) -> None:
    bad = json.dumps(_rec("latin")).encode().replace(b"Cough.", b"Toux \xe9.")
    err, _ = _sandwich(tmp_path, root, bad)
    assert err.field == "line" and "UTF-8" in err.message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rid": ["r"]}, "rid"),
        ({"rid": True}, "rid"),
        ({"rid": ""}, "rid"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"content": "**Question:** q"}]}, "messages"),
        ({"messages": ["q", "a"]}, "messages[0]"),
        ({"messages": [{"content": "q"}, {"content": 5}]}, "messages[1].content"),
        ({"images": "ok.png"}, "images"),
        ({"images": ["ok.png", 3]}, "images[1]"),
        ({"caption": "a caption"}, "caption"),
        ({"caption": ["fine", {"x": 1}]}, "caption[1]"),
        ({"age_label": [45]}, "age_label"),
    ],
)
def test_wrong_types_name_the_field(
    tmp_path: Path, root: Path, change: dict[str, Any], field: str
) -> None:
    bad = _rec("bad", ["ok.png"]) | change
    err, _ = _sandwich(tmp_path, root, bad)
    assert err.field == field, str(err)
    assert field in str(err) and "line 2" in str(err)


def test_record_that_is_not_an_object(tmp_path: Path, root: Path) -> None:
    err, _ = _sandwich(tmp_path, root, ["not", "a", "record"])
    assert err.field == "record" and err.qid == "line-2"


@pytest.mark.parametrize(
    ("drop", "field"),
    [("rid", "rid"), ("messages", "messages")],
)
def test_missing_fields(tmp_path: Path, root: Path, drop: str, field: str) -> None:
    bad = _rec("bad", ["ok.png"])
    del bad[drop]
    err, _ = _sandwich(tmp_path, root, bad)
    assert err.field == field
    assert "missing" in err.message and "null" not in err.message  # not "got null"
    if drop == "rid":
        assert err.qid == "line-2"


@pytest.mark.parametrize(("turn", "content"), [(0, "**Question:**   "), (1, "**Correct Answer:**")])
def test_empty_question_or_answer(tmp_path: Path, root: Path, turn: int, content: str) -> None:
    bad = _rec("bad", ["ok.png"])
    bad["messages"][turn]["content"] = content
    err, _ = _sandwich(tmp_path, root, bad)
    assert err.field == f"messages[{turn}].content" and err.qid == "bad"


def test_duplicate_rid_rejects_the_later_record(tmp_path: Path, root: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_rec("a"), _rec("b"), _rec("a")])
    results = _load(path, root)
    assert [type(r) for r in results] == [Question, Question, RecordError]
    err = results[2]
    assert isinstance(err, RecordError)
    assert (err.qid, err.field, err.line, err.index) == ("a", "rid", 3, 2)
    assert "line 1" in err.message


def test_blank_lines_skipped_and_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b"\n" + json.dumps(_rec("a")).encode() + b"\n  \n\n" + json.dumps(_rec("b")).encode()
    )
    results = _load(path)
    assert [(r.qid, r.index) for r in results] == [("a", 0), ("b", 1)]
    assert all(isinstance(r, Question) for r in results)

    path.write_bytes(json.dumps(_rec("a")).encode() + b"\n\n{broken")
    err = _load(path)[1]
    assert isinstance(err, RecordError) and (err.line, err.index, err.field) == (3, 1, "json")


# ---------------------------------------------------------------- bad images


def _image_error(tmp_path: Path, root: Path, name: str, data: bytes | None) -> RecordError:
    if data is not None:
        (root / name).write_bytes(data)
    err, _ = _sandwich(tmp_path, root, _rec("img", ["ok.png", name]))
    assert err.field == "images[1]" and err.qid == "img"
    assert name in err.message
    return err


def test_missing_image_is_an_error_not_dropped(tmp_path: Path, root: Path) -> None:
    err = _image_error(tmp_path, root, "nowhere.png", None)
    assert "not found" in err.message


def test_zero_byte_image(tmp_path: Path, root: Path) -> None:
    err = _image_error(tmp_path, root, "empty.png", b"")
    assert "empty file" in err.message


def test_truncated_png(tmp_path: Path, root: Path) -> None:
    data = _png_bytes((64, 64), "RGB")
    _image_error(tmp_path, root, "cut.png", data[: len(data) // 2])


def test_truncated_jpeg(tmp_path: Path, root: Path) -> None:
    data = _jpeg_bytes()
    _image_error(tmp_path, root, "cut.jpeg", data[: len(data) // 2])


def test_text_file_named_png(tmp_path: Path, root: Path) -> None:
    err = _image_error(tmp_path, root, "notes.png", b"this is not an image\n")
    assert "not a recognised image" in err.message


def test_mime_comes_from_content_not_extension(tmp_path: Path, root: Path) -> None:
    (root / "really_jpeg.png").write_bytes(_jpeg_bytes())
    path = _write_lines(tmp_path / "d.jsonl", [_rec("j", ["really_jpeg.png"])])
    (q,) = _load(path, root)
    assert isinstance(q, Question)
    assert q.images[0].mime == "image/jpeg" and (q.images[0].width, q.images[0].height) == (64, 64)


@pytest.mark.parametrize("entry", ["../../etc/passwd", "../outside.png", "/etc/passwd"])
def test_path_traversal_is_rejected(tmp_path: Path, root: Path, entry: str) -> None:
    (tmp_path / "outside.png").write_bytes(_png_bytes())
    err, _ = _sandwich(tmp_path, root, _rec("trav", [entry]))
    assert err.field == "images[0]" and "escapes the image root" in err.message


def test_absolute_path_inside_root_and_symlink_escape(tmp_path: Path, root: Path) -> None:
    (tmp_path / "outside.png").write_bytes(_png_bytes())
    os.symlink(tmp_path / "outside.png", root / "link.png")
    path = _write_lines(
        tmp_path / "d.jsonl", [_rec("abs", [str(root / "ok.png")]), _rec("sym", ["link.png"])]
    )
    q, err = _load(path, root)
    assert isinstance(q, Question) and q.images[0].path == str((root / "ok.png").resolve())
    assert isinstance(err, RecordError) and "escapes the image root" in err.message


def test_image_root_defaults_to_dataset_directory(tmp_path: Path) -> None:
    (tmp_path / "pic.png").write_bytes(_png_bytes())
    (q,) = _load(_write_lines(tmp_path / "d.jsonl", [_rec("d", ["pic.png"])]))
    assert isinstance(q, Question) and q.images[0].mime == "image/png"


@pytest.mark.parametrize(("w", "h"), [(20000, 20000), (9000, 8000)])
def test_huge_image_rejected_without_decoding(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch, w: int, h: int
) -> None:
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        loads.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    err = _image_error(tmp_path, root, "bomb.png", _png_claiming(w, h))
    assert "too large" in err.message or "megapixel" in err.message
    assert all(im.size != (w, h) for im in loads)  # the huge one was never decoded
    with pytest.raises(ValueError, match="megapixel|too large"):
        inspect_image(_png_claiming(w, h))


# ---------------------------------------------------------------- JSON list files


def test_json_list_file(tmp_path: Path, root: Path) -> None:
    path = tmp_path / "d.json"
    items = [_rec("a", ["ok.png"]), _rec("b", images="ok.png"), _rec("c")]
    path.write_text("  \n[\n" + ",\n".join(json.dumps(i) for i in items) + "\n]\n")
    results = _load(path, root)
    assert [r.qid for r in results] == ["a", "b", "c"]
    assert [r.index for r in results] == [0, 1, 2]
    err = results[1]
    assert isinstance(err, RecordError) and err.field == "images" and err.line == 4
    assert isinstance(results[0], Question) and isinstance(results[2], Question)


def test_json_list_with_syntax_error_keeps_earlier_items(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("[" + json.dumps(_rec("a")) + ",\n{oops}\n]")
    q, err = _load(path)
    assert isinstance(q, Question) and q.qid == "a"
    assert isinstance(err, RecordError) and err.field == "json" and err.line == 2


def test_json_list_non_utf8_item(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    bad = json.dumps(_rec("b")).encode().replace(b"Cough.", b"Toux \xe9.")
    path.write_bytes(b"[" + json.dumps(_rec("a")).encode() + b",\n" + bad + b"]")
    q, err = _load(path)
    assert isinstance(q, Question)
    assert isinstance(err, RecordError) and (err.field, err.line) == ("line", 2)


# ---------------------------------------------------------------- synthetic demo set


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_demo_dataset_is_deterministic_and_loads(tmp_path: Path) -> None:
    jsonl, image_root = write_demo_dataset(tmp_path / "a")
    write_demo_dataset(tmp_path / "b")
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second and len(first) > 12
    assert _tree(tmp_path / "a") != _tree(write_demo_dataset(tmp_path / "c", seed=1)[0].parent)

    results = _load(jsonl, image_root)
    assert len(results) >= 12
    assert all(isinstance(r, Question) for r in results), [str(r) for r in results]
    questions = [r for r in results if isinstance(r, Question)]
    mimes = {i.mime for q in questions for i in q.images}
    assert mimes == {"image/png", "image/jpeg"}
    assert any(not q.images for q in questions)
    assert any(len(q.captions) == 2 for q in questions)
    assert {len(q.images) for q in questions if q.images} >= {1, 2}
    assert all("<image>" not in q.case_info for q in questions)


def test_demo_dataset_sizes_and_group_mapping(tmp_path: Path) -> None:
    jsonl, image_root = write_demo_dataset(tmp_path, n=20, seed=3)
    questions = [r for r in _load(jsonl, image_root) if isinstance(r, Question)]
    assert len(questions) == 20 and len({q.qid for q in questions}) == 20
    mixed = next(q for q in questions if q.image_paths and "group2" in q.image_paths[0])
    assert "According to the image 3," in mixed.captions[0]


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_truncated_json_line_reports_its_break_column(tmp_path: Path, ending: str) -> None:
    good = json.dumps({"rid": "ok", "messages": [{"content": "q"}, {"content": "a"}]})
    cut = '{"rid": "cut", "messages": [{"content": "why'
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{good}\n{cut}{ending}".encode())
    err = _load(path)[1]
    assert isinstance(err, RecordError) and err.line == 2 and err.field == "json"
    # the line breaks off after its last character: column len + 1, never "column 1"
    assert f"breaks off at column {len(cut) + 1}" in err.message, err.message
    assert "Unterminated string starting at column 41" in err.message
    assert "line 2" not in err.message


def test_skip_images_yields_finished_records_without_opening_images(tmp_path: Path) -> None:
    data, images = write_demo_dataset(tmp_path / "demo")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    with_images = [r["rid"] for r in rows if r["images"]]
    for r in rows:
        if r["rid"] == with_images[0]:
            for p in r["images"]:
                (images / p).write_bytes(b"broken")  # would be a RecordError if opened
    skipped = list(read_dataset(data, images, skip_images={with_images[0]}.__contains__))
    first = next(q for q in skipped if q.qid == with_images[0])
    assert isinstance(first, Question) and first.images == () and first.image_paths
    others = [q for q in skipped if q.qid != with_images[0]]
    assert all(isinstance(q, Question) for q in others)
    assert all(len(q.images) == len(q.image_paths) for q in others)
    unskipped = {q.qid: q for q in read_dataset(data, images)}
    broken = unskipped[with_images[0]]
    assert isinstance(broken, RecordError) and broken.field.startswith("images[")
