"""The generic dataset schema (docs/datasets.md): valid records, every bad field named, and the
format chosen only by `[dataset] format`, never guessed from the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import sim_config
from PIL import Image

from mics.config import ConfigError, parse_config
from mics.dataset import read_dataset
from mics.dataset_generic import NO_CONTEXT
from mics.types import Question, RecordError


def write(tmp_path: Path, records: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def png(tmp_path: Path) -> str:
    Image.new("RGB", (8, 6), "red").save(tmp_path / "red.png")
    return "red.png"


def test_valid_records_become_questions(tmp_path, png):
    path = write(tmp_path, [
        {"id": "a", "question": " What colour? ", "answer": "Red", "images": [png],
         "context": "A single swatch.", "meta": {"source": "test", "n": [1, 2]}},
        {"id": 7, "question": "2 + 3?", "answer": 5},
        {"id": "c", "question": "Name it.", "answer": "x", "images": [], "context": None},
    ])
    a, b, c = read_dataset(path, fmt="generic")
    assert isinstance(a, Question) and isinstance(b, Question) and isinstance(c, Question)
    assert (a.qid, a.question, a.gt_answer, a.case_info) == ("a", "What colour?", "Red",
                                                             "A single swatch.")
    assert a.image_paths == (png,) and a.images[0].mime == "image/png"
    assert (a.images[0].width, a.images[0].height) == (8, 6)
    assert (b.qid, b.gt_answer, b.images, b.case_info, b.index) == ("7", "5", (), NO_CONTEXT, 1)
    assert c.case_info == NO_CONTEXT and c.captions == ()


@pytest.mark.parametrize(("record", "field", "words"), [
    ({"question": "q", "answer": "a"}, "id", "missing id"),
    ({"id": "", "question": "q", "answer": "a"}, "id", "empty"),
    ({"id": 1.5, "question": "q", "answer": "a"}, "id", "string or integer"),
    ({"id": "x", "answer": "a"}, "question", "missing question"),
    ({"id": "x", "question": "  ", "answer": "a"}, "question", "empty question"),
    ({"id": "x", "question": ["q"], "answer": "a"}, "question", "must be a string"),
    ({"id": "x", "question": "q"}, "answer", "missing answer"),
    ({"id": "x", "question": "q", "answer": 0.5}, "answer", "write it as a string"),
    ({"id": "x", "question": "q", "answer": True}, "answer", "must be a string"),
    ({"id": "x", "question": "q", "answer": "a", "contxt": "c"}, "contxt", "unknown field"),
    ({"id": "x", "question": "q", "answer": "a", "context": 3}, "context", "must be a string"),
    ({"id": "x", "question": "q", "answer": "a", "images": "a.png"}, "images", "list"),
    ({"id": "x", "question": "q", "answer": "a", "images": ["nope.png"]}, "images[0]",
     "not found"),
    ({"id": "x", "question": "q", "answer": "a", "images": ["../up.png"]}, "images[0]",
     "escapes"),
    ({"id": "x", "question": "q\ud800", "answer": "a"}, "question", "surrogate"),
])
def test_bad_fields_are_named_and_the_rest_still_read(tmp_path, png, record, field, words):
    good = {"id": "ok", "question": "q", "answer": "a", "images": [png]}
    path = write(tmp_path, [record, good])
    bad, ok = read_dataset(path, fmt="generic")
    assert isinstance(bad, RecordError), bad
    assert bad.field == field and words in bad.message, str(bad)
    assert bad.line == 1 and isinstance(ok, Question) and ok.qid == "ok"


def test_an_undecodable_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"not an image")
    [bad] = read_dataset(write(tmp_path, [{"id": "x", "question": "q", "answer": "a",
                                           "images": ["fake.png"]}]), fmt="generic")
    assert isinstance(bad, RecordError) and bad.field == "images[0]" and "fake.png" in bad.message


def test_duplicate_ids_and_broken_lines(tmp_path):
    path = write(tmp_path, [{"id": "d", "question": "q", "answer": "a"}, "{not json",
                            {"id": "d", "question": "q2", "answer": "b"}, "[1]"])
    first, broken, dup, not_object = read_dataset(path, fmt="generic")
    assert isinstance(first, Question)
    assert isinstance(broken, RecordError) and broken.field == "json"
    assert isinstance(dup, RecordError) and dup.field == "id" and "line 1" in dup.message
    assert isinstance(not_object, RecordError) and not_object.field == "record"


def test_errors_name_the_id_by_the_formats_own_field(tmp_path, png):
    """A generic record's error says `id`, never the Chiron schema's `rid`, wherever it is
    caught: a bad field, a broken line, or an unreadable record."""
    bad_field, broken = read_dataset(write(tmp_path, [
        {"id": "q7", "question": "q", "answer": "a", "images": ["nope.png"]}, "{not json"]),
        fmt="generic")
    assert str(bad_field).startswith("line 1, id 'q7', field 'images[0]': ")
    assert str(broken).startswith("line 2, id 'line-2', field 'json': ")
    [chiron] = read_dataset(write(tmp_path, [{"rid": "c1"}], name="c.jsonl"))
    assert str(chiron).startswith("line 1, rid 'c1', field ")


def test_library_records_that_are_not_json_name_their_id_field(tmp_path):
    import mics

    config = {**sim_config(), "dataset": {"format": "generic"}}
    records = [{"id": "fine", "question": "q", "answer": "a"},
               {"id": "odd", "question": "q", "answer": "a", "meta": {1, 2}}]
    with pytest.raises(mics.DataError, match=r"record 1 \(id 'odd'\)"):
        mics.search_sync(config, records, tmp_path / "run")


def test_the_format_is_chosen_by_config_never_guessed(tmp_path):
    path = write(tmp_path, [{"id": "a", "question": "q", "answer": "a"}])
    [as_chiron] = read_dataset(path)  # the default reader does not recognise generic records
    assert isinstance(as_chiron, RecordError) and as_chiron.field == "rid"
    assert parse_config(sim_config()).dataset.format == "chiron"
    assert parse_config({**sim_config(), "dataset": {"format": "generic"}}).dataset.format \
        == "generic"
    with pytest.raises(ConfigError, match=r"\[dataset\].format: expected one of chiron, generic"):
        parse_config({**sim_config(), "dataset": {"format": "csv"}})
    with pytest.raises(ConfigError, match=r"\[dataset\]: unknown key\(s\) schema"):
        parse_config({**sim_config(), "dataset": {"schema": "generic"}})
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        next(read_dataset(path, fmt="csv"))


def test_chiron_records_still_read_by_the_chiron_adapter(chiron):
    items = list(read_dataset(chiron / "demo.jsonl", chiron / "images"))
    assert items and all(isinstance(i, Question) for i in items)
    assert all(i.case_info.startswith("Chief complaint:") for i in items)
