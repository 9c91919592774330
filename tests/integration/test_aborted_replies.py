"""Replies that arrive with HTTP 200 but are not answers: a generation the server aborted
(SGLang's finish reason "abort", on /generate and on its OpenAI server) and a reply a content
filter stopped ("content_filter"). Each is a failed call: retried, recorded, the question
deferred; never stored as a reply, never scored as a wrong answer. Real HTTP against the
loopback server, which injects them as the real servers send them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import mics
from bench.loopback import Faults, LoopbackServer
from store import RunStore

MODELS = {**{f"m{i}": {"role": "mentor", "quality": q} for i, q in enumerate((0.6, 0.45, 0.35))},
          **{f"i{i}": {"role": "intern", "skill": s} for i, s in enumerate((0.95, 0.85, 0.75))},
          "judge": "judge"}
RETRIES = 2


def config(srv: LoopbackServer, tok: Path) -> dict[str, Any]:
    """OpenAI-compatible mentors and judge, SGLang interns, all on the loopback server."""
    common = {"max_retries": RETRIES, "backoff_s": 0.01, "timeout_s": 5.0}

    def chat(name: str) -> dict[str, Any]:
        return {"name": name, "backend": "openai", "model": name, "base_url": f"{srv.url}/v1",
                **common}

    return {
        "search": {"seed": 0, "concurrency": 4},
        "mentors": [chat(f"m{i}") for i in range(3)],
        "interns": [{"name": f"i{i}", "backend": "sglang", "model": f"i{i}",
                     "base_url": srv.url_for(f"i{i}"), "options": {"tokenizer": str(tok)},
                     **common} for i in range(3)],
        "judge": chat("judge"),
    }


def run(tmp_path: Path, chiron: Path, tok: Path, forced: dict[str, str]) -> tuple[Any, Path]:
    with LoopbackServer(MODELS, faults=Faults(forced=forced)) as srv:
        summary = anyio.run(lambda: mics.search(
            config(srv, tok), chiron / "demo.jsonl", tmp_path / "R",
            image_root=chiron / "images", limit=2))
    return summary, tmp_path / "R"


def stored(run_dir: Path) -> tuple[list[dict], list[dict], dict[str, dict]]:
    """(call log entries with their memo replies, recorded failures, question records)."""
    with RunStore.open(run_dir, write=False) as store:
        calls = [{**e, "reply": store.memo_get(e["key"])} for e in store.iter_calls()]
        return calls, store.iter_failures(), dict(store.iter_questions())


@pytest.mark.parametrize("forced, model, says", [
    pytest.param({"i0": "abort"}, "i0", "aborted the generation", id="sglang-generate-abort"),
    pytest.param({"m1": "abort"}, "m1", "aborted the generation", id="openai-chat-abort"),
    pytest.param({"judge": "content_filter"}, "judge", "content filter", id="content-filter"),
])
def test_a_reply_that_is_not_an_answer_is_a_failed_call(
        tmp_path: Path, chiron: Path, tokenizer_dir: Path, forced: dict[str, str], model: str,
        says: str) -> None:
    summary, run_dir = run(tmp_path, chiron, tokenizer_dir, forced)
    calls, failures, questions = stored(run_dir)
    assert summary.deferred == 2 and summary.succeeded == summary.failed == 0
    assert summary.exit_code == 3
    assert all(rec["status"] == "deferred" and rec["retryable"] for rec in questions.values())
    assert all(c["reply"]["finish_reason"] not in ("abort", "content_filter") for c in calls)
    mine = [f for f in failures if f["model"] == model]
    assert mine and {f["model"] for f in failures} == {model}
    for f in mine:
        assert says in f["error"]
        # an abort is retried (a transient failure); a content filter is not (permanent)
        assert f["attempts"] == (1 if model == "judge" else RETRIES + 1)
    if model == "i0":  # the rest of each aborted batch is kept: the batch is not lost
        assert any(c["model"] == "i0" for c in calls)
    if model == "judge":
        assert not any(c["role"] == "judge" for c in calls)


def test_aborts_that_clear_on_retry_leave_only_whole_answers(
        tmp_path: Path, chiron: Path, tokenizer_dir: Path) -> None:
    """A third of the interns' requests and the judge's come back aborted: every question
    completes, each aborted call was sent again, and no stored reply is a cut-off one."""
    with LoopbackServer(MODELS, faults=Faults(rate=0.3, kinds=("abort",))) as srv:
        cfg = config(srv, tokenizer_dir)
        for model in (*cfg["interns"], cfg["judge"], *cfg["mentors"]):
            model["max_retries"] = 8
        summary = anyio.run(lambda: mics.search(cfg, chiron / "demo.jsonl", tmp_path / "R",
                                                image_root=chiron / "images", limit=2))
        aborted = [e for e in srv.log if e.fault == "abort"]
    calls, failures, _ = stored(tmp_path / "R")
    assert summary.deferred == 0 and summary.succeeded + summary.failed == 2
    assert len(aborted) > 3 and failures == []
    assert all(c["reply"]["finish_reason"] != "abort" for c in calls)
    assert any(c["attempts"] > 1 for c in calls)


def test_a_mentor_chain_cut_off_at_the_output_limit_is_never_a_candidate(
        tmp_path: Path, chiron: Path, tokenizer_dir: Path) -> None:
    """A chain that stopped at mentor_max_tokens (finish "length") may end in a half-written
    step and has no final answer: it is a malformed reply (asked again), never a candidate or
    an exported chain. With room to finish, the same run succeeds."""
    def search(run: str, max_tokens: int) -> Any:
        with LoopbackServer(MODELS) as srv:
            cfg = config(srv, tokenizer_dir)
            cfg["search"]["mentor_max_tokens"] = max_tokens
            return anyio.run(lambda: mics.search(cfg, chiron / "demo.jsonl", tmp_path / run,
                                                 image_root=chiron / "images", limit=2))

    cut = search("cut", 24)
    with RunStore.open(tmp_path / "cut", write=False) as store:
        records = dict(store.iter_questions())
        mentor_replies = [store.memo_get(c["key"]) for c in store.iter_calls()
                          if c["role"] == "mentor"]
        nodes = [n for qid in records for n in store.get_nodes(qid) if n["depth"] >= 0]
    assert mentor_replies and all(r["finish_reason"] == "length" for r in mentor_replies)
    assert nodes == [] and cut.succeeded == 0
    for rec in records.values():
        assert rec["stop_reason"] == "no_mentor"
        errors = rec["outcome"]["details"]["mentor_errors"]
        assert all("cut off at the output limit" in e for e in errors.values())
    whole = search("whole", 2048)
    assert whole.succeeded + whole.failed == 2 and whole.deferred == 0
