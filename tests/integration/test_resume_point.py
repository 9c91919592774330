"""The resume point: a resume reads the dataset from where every earlier record is finished."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import anyio
import orjson
import pytest
from helpers import EXAMPLE

from mics.config import load_config
from mics.demo_data import write_demo_dataset
from mics.run import mark_resume_point, search_run, start_run, summarize
from store import RunStore


def dataset(tmp_path: Path, as_list: bool = False) -> tuple[Path, Path]:
    data, images = write_demo_dataset(tmp_path / "demo")
    rows = [json.loads(line) for line in data.read_text().splitlines()][:6]
    rows.insert(2, {"rid": "broken", "messages": "not a list"})
    rows.insert(4, {**rows[0]})  # a duplicate rid
    out = tmp_path / ("d.json" if as_list else "d.jsonl")
    out.write_bytes(orjson.dumps(rows) if as_list
                    else b"\n".join(orjson.dumps(r) for r in rows) + b"\n\n")
    return out, images


@pytest.mark.parametrize("limit", [None, 5])
def test_point_counts_every_record_and_a_resume_sends_nothing(tmp_path, limit):
    data, images = dataset(tmp_path)
    run = tmp_path / "R"
    start_run(run, load_config(EXAMPLE), data, images, limit)
    anyio.run(lambda: search_run(run))
    with RunStore.open(run, write=False) as store:
        point = store.get_meta("resume_point")
        summary = summarize(store)
        assert summarize(store, from_records=False) == summary  # the kept counts agree
        before = {q: r for q, r in store.iter_questions()}
        statuses = store.question_statuses()
    # the summary's counts are those of the records themselves
    assert summary.questions == len(statuses) == len(before)
    assert summary.succeeded == sum(s == "succeeded" for _q, s, _r in statuses)
    assert summary.stop_reasons == dict(sorted(Counter(r for _q, _s, r in statuses if r).items()))
    records = 8 if limit is None else limit
    assert point["index"] == records
    assert (point["ok"], point["failed"]) == (summary.succeeded, summary.failed)
    assert point["ok"] + point["failed"] == records  # bad and duplicate records included
    if limit is None:
        assert point["offset"] == len(data.read_bytes().rstrip(b"\n")) + 1  # past the last line
    seen: list[str] = []
    again = anyio.run(lambda: search_run(run, on_done=lambda o: seen.append(o.qid),
                                         on_start=lambda *a: seen.append(repr(a))))
    assert again.calls.get("sent", 0) == 0 and again.calls.get("memo_hits", 0) == 0
    assert seen == [repr((records, point["ok"], point["failed"]))]  # nothing read again
    with RunStore.open(run, write=False) as store:
        assert dict(store.iter_questions()) == before


def test_resume_after_a_stale_point_reads_on_and_a_json_list_has_none(tmp_path):
    data, images = dataset(tmp_path)
    run = tmp_path / "R"
    start_run(run, load_config(EXAMPLE), data, images, None)
    anyio.run(lambda: search_run(run))
    with RunStore.open(run) as store:
        full = store.get_meta("resume_point")
        store.put_meta("resume_point", None)  # as after a kill -9 before any mark
        ds = store.get_meta("dataset")
        assert mark_resume_point(store, ds) == full
    listed, images = dataset(tmp_path / "list", as_list=True)
    run = tmp_path / "L"
    start_run(run, load_config(EXAMPLE), listed, images, None)
    summary = anyio.run(lambda: search_run(run))
    assert summary.questions == 8
    with RunStore.open(run, write=False) as store:
        assert store.get_meta("resume_point") is None
    assert anyio.run(lambda: search_run(run)).calls.get("sent", 0) == 0


@pytest.mark.parametrize("images", [True, False])
def test_bench_finished_workload_resumes_only_the_new_questions(tmp_path, images):
    from bench.resume import build_finished, fresh_exports_identical, timed_resume

    run = tmp_path / "run"
    built = build_finished(run, finished=300, fresh=3, image_side=32, images=images)
    fresh = built["fresh_rids"]
    with RunStore.open(run, write=False) as store:
        point = store.get_meta("resume_point")
        before = dict(store.iter_questions())
        assert store.get_meta("dataset_stat") is not None  # as the finishing session left it
        assert store.get_meta("dataset_records")["records"] == 303
        with_images = [r for r in before.values() if r["question"]["image_paths"]]
    assert built["finished"] == 300 and built["images"] is images and len(fresh) == 3
    assert point["index"] == 300 and point["ok"] == 300
    assert len(with_images) == (300 if images else 0)
    got = timed_resume(run, t_start=0.0)
    assert got["questions"] == 303 and got["pending"] == 0
    assert got["succeeded"] + got["failed"] == 303 and got["sent"] > 0
    assert got["called_qids"] == sorted(fresh)  # no finished question was called again
    assert got["first_call_s"] <= got["done_s"]
    assert got["first_call_after_search_run_s"] <= got["done_after_search_run_s"]
    with RunStore.open(run, write=False) as store:
        assert store.get_meta("resume_point")["index"] == 303
        after = dict(store.iter_questions())
        summary = summarize(store)
    assert {q: after[q] for q in before} == before  # finished records untouched
    assert {after[q]["status"] for q in fresh} <= {"succeeded", "failed"}
    assert summary.questions == 303 and summary.succeeded == got["succeeded"]
    # the new questions' trees and exports equal those of a run that searched only them
    assert fresh_exports_identical(run, fresh)


def test_bench_export_check_can_fail(tmp_path):
    from bench.resume import build_finished, fresh_exports_identical, timed_resume

    run = tmp_path / "run"
    fresh = build_finished(run, finished=20, fresh=2, image_side=32)["fresh_rids"]
    timed_resume(run, t_start=0.0)
    with RunStore.open(run) as store:  # one stored tree differs from what a search gives
        nodes = store.get_nodes(fresh[0])
        store.put_nodes(fresh[0], [(nodes[-1]["node_id"],
                                    {**nodes[-1], "step": nodes[-1]["step"] + " (edited)"})])
    assert not fresh_exports_identical(run, fresh)
