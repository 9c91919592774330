"""The command line left running (issue 13): words kept, nothing created by a bad start, one
line per error, progress in logs, status that tells a live run from a dead one, --json."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import orjson
import pytest
from helpers import ROOT, command_imports
from PIL import Image
from test_cli import EXAMPLE, mics, read_jsonl

from bench.crash_store import KILL_AFTER_ENV
from mics.demo_data import write_demo_dataset
from store import RunStore


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, demo) -> Path:
    """A finished demo run (12 questions), searched once for the read-only checks."""
    data, images = demo
    run = tmp_path_factory.mktemp("done") / "R"
    mics("search", data, "--image-root", images, "--config", EXAMPLE, "--run", run)
    return run


def one_error_line(proc) -> str:  # noqa: ANN001
    """The single `error: ...` line of a failed command; never a traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- errors keep their words


def test_config_errors_keep_their_section_names(tmp_path, demo):
    data, _ = demo
    no_judge = tmp_path / "no_judge.toml"
    no_judge.write_text(EXAMPLE.read_text().split("[judge]")[0])
    line = one_error_line(mics("search", data, "-c", no_judge, "--run", tmp_path / "R",
                               check=False))
    assert "[judge] missing" in line and "no_judge.toml" in line
    typo = tmp_path / "typo.toml"
    typo.write_text(EXAMPLE.read_text().replace("max_depth = 3", "max_dept = 3"))
    line = one_error_line(mics("search", data, "-c", typo, "--run", tmp_path / "R",
                               check=False))
    assert "[search]" in line and "max_dept" in line
    assert "[search].seed" in mics("search", "--help").stdout
    assert not (tmp_path / "R").exists()


def test_markup_in_a_rid_is_shown_verbatim(tmp_path, demo):
    data, images = demo
    rows = read_jsonl(data)[:2]
    rows[0]["rid"] = "x[/bold]y"
    rows[1]["rid"] = "[red]z"
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    run = tmp_path / "R"
    mics("search", hostile, "--image-root", images, "-c", EXAMPLE, "--run", run)
    for args in (["status", run], ["inspect", run], ["inspect", run, "x[/bold]y"]):
        proc = mics(*args)
        assert "x[/bold]y" in proc.stdout and "MarkupError" not in proc.stderr, args
    assert "[red]z" in mics("inspect", run).stdout


@pytest.mark.parametrize("case", ["export-file", "viz-file", "run-file", "limit", "seed"])
def test_bad_options_are_one_line_and_exit_2(tmp_path, demo, done_run, case):
    data, images = demo
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    search = ["search", data, "--image-root", images, "-c", EXAMPLE]
    args = {"export-file": ["export", done_run, "--out", existing],
            "viz-file": ["viz", done_run, "--all", "-o", existing],
            "run-file": [*search, "--run", existing],
            "limit": [*search, "--run", tmp_path / "R", "--limit", "-3"],
            "seed": [*search, "--run", tmp_path / "R", "--seed", "9" * 23]}[case]
    one_error_line(mics(*args, check=False))
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("args", [["--min-score", "2"], ["--max-depth", "-1"]])
def test_out_of_range_export_filters_are_rejected(tmp_path, done_run, args):
    line = one_error_line(mics("export", done_run, "--out", tmp_path / "O", *args,
                               check=False))
    assert args[0] in line
    assert not (tmp_path / "O").exists()


def test_warnings_for_an_empty_dataset_and_all_records_failed(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = mics("search", empty, "-c", EXAMPLE, "--run", tmp_path / "A")
    assert "warning: the dataset has no records" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"rid": "a"}\n{"rid": "b", "messages": []}\n')
    proc = mics("search", bad, "-c", EXAMPLE, "--run", tmp_path / "B", check=False)
    assert "warning: every record failed (2)" in proc.stderr
    assert proc.returncode == 4  # nothing could be read: `search && export` stops here


# ---------------------------------------------------------------- nothing created by a bad start


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_start_leaves_the_run_directory_as_found(tmp_path, demo, existing):
    data, images = demo
    cfg = tmp_path / "unknown_backend.toml"
    cfg.write_text(EXAMPLE.read_text().replace('backend = "simulated"', 'backend = "nope"', 1))
    run = tmp_path / "R"
    if existing:
        run.mkdir()
    line = one_error_line(mics("search", data, "--image-root", images, "-c", cfg, "--run", run,
                               check=False))
    assert "nope" in line
    assert run.exists() == existing and (not existing or not any(run.iterdir()))
    # the directory stays usable: a good start on it works
    mics("search", data, "--image-root", images, "-c", EXAMPLE, "--run", run, "--limit", "1")


# ---------------------------------------------------------------- long runs you can watch


def test_progress_lines_in_a_log_count_the_whole_run(tmp_path, demo):
    data, images = demo
    run = tmp_path / "R"
    args = ["--image-root", images, "-c", EXAMPLE, "--run", run, "--progress-every", "0.1"]
    killed = mics("search", data, *args, env={KILL_AFTER_ENV: "300"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    lines = [ln for ln in killed.stdout.splitlines() if ln.startswith("progress: ")]
    assert lines and lines[0].startswith("progress: 0/12 done, ok 0, failed 0, deferred 0")
    with RunStore.open(run, write=False) as store:
        status_of = {q: st for q, st, _ in store.question_statuses()}
    before = sum(st in ("succeeded", "failed") for st in status_of.values())
    assert 0 < before < 12
    prefix = 0  # records finished in dataset order before the first unfinished one
    for row in read_jsonl(data):
        if status_of.get(row["rid"]) not in ("succeeded", "failed"):
            break
        prefix += 1

    status = json.loads(mics("status", run, "--json").stdout)
    assert status["total"] == 12 and status["finished"] == before
    assert status["running_pid"] is None  # killed -9: the lock file's pid is gone
    assert "running now: no" in mics("status", run).stdout
    assert "model calls (whole run)" in mics("status", run).stdout

    proc = mics("resume", run, "--progress-every", "0.1")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("progress: ")]
    first = re.match(r"progress: (\d+)/12 done", lines[0])
    # starts from the resume point (every record before it finished); questions finished out
    # of order after it are counted as the reader passes them
    assert first is not None and int(first.group(1)) == prefix
    assert lines[-1].startswith("progress: 12/12 done")
    assert re.search(r"\d+ tokens", lines[-1]) and "calls/s" in lines[-1]


def test_json_closing_summary_status_and_doctor(tmp_path, demo, done_run):
    data, images = demo
    proc = mics("search", data, "--image-root", images, "-c", EXAMPLE, "--run", tmp_path / "R",
                "--limit", "2", "--json")
    summary = json.loads(proc.stdout)
    assert summary["questions"] == 2 and summary["total"] == 2
    assert summary["succeeded"] + summary["failed"] == 2 and summary["calls"]["sent"] > 0
    status = json.loads(mics("status", done_run, "--json").stdout)
    assert status["questions"] == 12 and status["left"] == 0 and status["eta_s"] is not None
    doctor = json.loads(mics("doctor", EXAMPLE, "--json").stdout)
    assert doctor["ok"] is True and len(doctor["checks"]) == 7


def test_version_and_short_help():
    from mics import __version__

    assert mics("--version").stdout.strip() == f"mics {__version__}"
    for args in (["-h"], ["export", "-h"], ["bench", "resume", "-h"]):
        assert "Usage" in mics(*args).stdout


def test_step_values_alias_and_training_default(tmp_path, done_run):
    proc = mics("export", done_run, "-o", tmp_path / "O", "-f", "step_values", "-f", "sft")
    assert (tmp_path / "O" / "step_values.jsonl").exists() or any(
        p.name.startswith("step") for p in (tmp_path / "O").iterdir())
    with RunStore.open(done_run, write=False) as store:
        recs = [rec for _, rec in store.iter_questions()]
    full = sum(r.get("stop_reason") == "full_score" for r in recs)
    partial = sum(r["status"] == "succeeded" and r.get("stop_reason") != "full_score"
                  for r in recs)
    assert partial > 0  # the demo has max-depth chains, or this test proves nothing
    sft = read_jsonl(next((tmp_path / "O").glob("sft*.jsonl")))
    assert len(sft) == full
    assert f"{partial} that stopped at max depth without one left out" in proc.stdout
    mics("export", done_run, "-o", tmp_path / "P", "-f", "sft", "--include-partial")
    assert len(read_jsonl(next((tmp_path / "P").glob("sft*.jsonl")))) == full + partial


def test_bad_record_rid_is_one_identity(tmp_path, demo):
    data, images = demo
    rows = read_jsonl(data)[:2]
    rows.append({"rid": rows[0]["rid"], "messages": "duplicate and broken"})
    path = tmp_path / "dup.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    run = tmp_path / "R"
    mics("search", path, "--image-root", images, "-c", EXAMPLE, "--run", run)
    rid = rows[0]["rid"]
    tree = json.loads(mics("inspect", run, rid, "--json").stdout)
    assert tree["qid"] == rid and tree["status"] == "succeeded"  # the valid record
    bad = json.loads(mics("inspect", run, f"{rid}@line3", "--json").stdout)
    assert bad["stop_reason"] == "bad_record" and "duplicate rid" in bad["error"]
    summary = mics("inspect", run).stdout
    assert f"{rid}@line3" in summary and re.search(r"│ bad_record\s+│", summary)
    assert not re.search(r"│ error\s+│", summary)  # one word per stop reason
    assert "bad_record" in mics("status", run).stdout
    mics("export", run, "--out", tmp_path / "E")
    results, failed = read_jsonl(tmp_path / "E" / "results.jsonl"), read_jsonl(
        tmp_path / "E" / "failed.jsonl")
    assert [r["rid"] for r in results].count(rid) == 1
    dup = [f for f in failed if f["rid"] == rid]  # the same rid, told apart by its line
    assert len(dup) == 1 and dup[0]["details"]["line"] == 3 and "duplicate" in dup[0]["error"]


# ---------------------------------------------------------------- resume starts at once


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def test_resume_never_opens_finished_questions_images_and_detects_changed_ones(tmp_path, demo):
    data, images = demo
    img_root = tmp_path / "images"
    shutil.copytree(images, img_root)
    run = tmp_path / "R"
    killed = mics("search", data, "--image-root", img_root, "-c", EXAMPLE, "--run", run,
                  env={KILL_AFTER_ENV: "300"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    with RunStore.open(run, write=False) as store:
        recs = dict(store.iter_questions())
    finished = [q for q, r in recs.items() if r["status"] in ("succeeded", "failed")]
    running = [q for q, r in recs.items() if r["status"] == "running" and r["question"]["images"]]
    assert finished and running
    by_rid = {r["rid"]: r for r in read_jsonl(data)}
    # break every image only finished questions use: a resume must not even open them
    used_later = {p for q, r in by_rid.items() if q not in finished for p in r["images"]}
    broken = {p for q in finished for p in by_rid[q]["images"]} - used_later
    for p in broken:
        (img_root / p).write_bytes(b"not an image any more")
    # change one image of a question that was mid-search
    changed_q = running[0]
    target = img_root / by_rid[changed_q]["images"][0]
    with Image.open(target) as im:
        im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, format="PNG")
    mics("resume", run)
    with RunStore.open(run, write=False) as store:
        after = dict(store.iter_questions())
    for q in finished:
        assert after[q]["status"] == recs[q]["status"]  # untouched
    rec = after[changed_q]
    assert rec["status"] == "failed" and rec["retryable"] is True
    assert "changed since the run started" in rec["outcome"]["error"]
    assert broken  # or this test proves nothing
    assert not any("@line" in k for k in after), "a finished question's image was opened"


def test_resume_with_a_moved_dataset(tmp_path, demo):
    data, images = demo
    rows = read_jsonl(data)[:3]
    first = tmp_path / "a" / "d.jsonl"
    first.parent.mkdir()
    first.write_bytes(_jsonl(rows))
    run = tmp_path / "R"
    mics("search", first, "--image-root", images, "-c", EXAMPLE, "--run", run,
         env={KILL_AFTER_ENV: "40"}, check=False)
    moved = tmp_path / "b" / "moved.jsonl"
    moved.parent.mkdir()
    shutil.move(first, moved)
    line = one_error_line(mics("resume", run, check=False))
    assert "--data" in line
    other = tmp_path / "b" / "other.jsonl"
    other.write_bytes(_jsonl(rows[:2]))
    line = one_error_line(mics("resume", run, "--data", other, check=False))
    assert "content differs" in line
    mics("resume", run, "--data", moved)
    with RunStore.open(run, write=False) as store:
        assert store.get_meta("dataset")["path"] == str(moved.resolve())
        assert {st for _, st, _ in store.question_statuses()} <= {"succeeded", "failed"}
        assert store.question_count() == 3


# ---------------------------------------------------------------- lean imports


def test_demo_and_api_commands_never_import_torch_or_transformers(tmp_path, done_run):
    assert command_imports("--help").heavy == []
    assert command_imports("demo", "--run", tmp_path / "demo").heavy == []
    for args in (["status", done_run], ["inspect", done_run], ["inspect", done_run,
                 "synthetic-001"], ["viz", done_run, "--all", "-o", tmp_path / "viz"],
                 ["export", done_run, "-o", tmp_path / "E", "-f", "all"]):
        assert command_imports(*args).heavy == [], args


def test_search_with_api_backends_never_imports_torch(tmp_path, demo):
    from bench.loopback import LoopbackServer

    data, images = demo
    models = {"m0": {"role": "mentor", "quality": 0.6}, "i0": {"role": "intern", "skill": 0.9},
              "judge": "judge"}
    with LoopbackServer(models) as srv:
        cfg = tmp_path / "api.toml"
        cfg.write_text("\n".join([
            "[search]", "concurrency = 4", "",
            "[[mentors]]", 'name = "m0"', 'backend = "openai"', 'model = "m0"',
            f'base_url = "{srv.url}/v1"', "",
            "[[interns]]", 'name = "i0"', 'backend = "openai"', 'model = "i0"',
            f'base_url = "{srv.url}/v1"', "",
            "[judge]", 'name = "judge"', 'backend = "openai"', 'model = "judge"',
            f'base_url = "{srv.url}/v1"', ""]))
        out = command_imports("search", data, "--image-root", images, "-c", cfg,
                              "--run", tmp_path / "R", "--limit", "2")
    assert out.heavy == []


def test_a_pilot_run_s_limit_can_be_raised_and_nothing_else(tmp_path, demo):
    """`--limit 2`, then `--limit 5`, then every record: one run, finished questions kept and
    never searched again; a smaller limit or another image root is refused, saying which."""
    data, images = demo
    base = ["search", data, "--image-root", images, "-c", EXAMPLE, "--run", tmp_path / "R"]
    first = json.loads(mics(*base, "--limit", "2", "--json").stdout)
    assert first["questions"] == 2 and first["total"] == 2
    with RunStore.open(tmp_path / "R", write=False) as store:
        calls = store.call_count()
        before = {q: r["outcome"] for q, r in store.iter_questions()}
    more = mics(*base, "--limit", "5", "--json")
    summary = json.loads(more.stdout)
    assert summary["questions"] == 5 and summary["total"] == 5
    assert "the record limit is raised from 2 to 5" in " ".join(more.stderr.split())
    with RunStore.open(tmp_path / "R", write=False) as store:
        assert {q: store.get_question(q)["outcome"] for q in before} == before
        new_calls = [c for c in store.iter_calls()[calls:]]
        assert new_calls and not {c["qid"] for c in new_calls} & set(before)
    every = json.loads(mics(*base, "--json").stdout)
    assert every["questions"] == 12 and every["total"] == 12
    line = one_error_line(mics(*base, "--limit", "3", check=False))
    assert "every record (a limit can only be raised; given: --limit 3)" in line
    moved = tmp_path / "images2"
    shutil.copytree(images, moved)
    line = one_error_line(mics("search", data, "--image-root", moved, "-c", EXAMPLE, "--run",
                               tmp_path / "R", check=False))
    assert "another image root" in line and "--image-root NEW_ROOT" in line


def test_a_local_intern_without_a_model_folder_is_one_error_line(tmp_path, demo):
    """examples/local.toml on a machine without its model folders: exit 2, the folder named,
    before any run directory exists (it was exit 1, 'an internal error')."""
    data, images = demo
    proc = mics("search", data, "--image-root", images, "-c", ROOT / "examples" / "local.toml",
                "--run", tmp_path / "R", check=False)
    line = one_error_line(proc)
    assert "is not a model folder" in line and "internal error" not in line
    assert not (tmp_path / "R").exists()


def test_inspect_tells_stored_questions_from_the_dataset_s(tmp_path, demo):
    """A run recorded but not yet searched: inspect says 0 stored of the dataset's 12, as
    status counts them (it said "questions 0" while status said 12)."""
    from mics.config import load_config
    from mics.run import start_run

    data, images = demo
    start_run(tmp_path / "R", load_config(EXAMPLE), data, images, None)
    summary = json.loads(mics("inspect", tmp_path / "R", "--json").stdout)
    assert summary["totals"]["questions"] == 0 and summary["totals"]["dataset_records"] == 12
    assert "0 / 12" in mics("inspect", tmp_path / "R").stdout
    assert json.loads(mics("status", tmp_path / "R", "--json").stdout)["total"] == 12
