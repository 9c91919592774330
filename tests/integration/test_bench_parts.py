"""`mics bench parts` measures what it says: both storing paths store the same thing, with the
commits the arrival pattern implies, and both renderings give the same strings."""

from __future__ import annotations

import json

import pytest

from bench.parts import (
    INTERNVL_TEMPLATE,
    group_puts,
    loop_workload,
    measure_render,
    measure_storing,
    one_per_turn,
    store_contents,
    template_folders,
    turns,
    with_images,
)
from mics.types import Image


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return loop_workload(tmp_path_factory.mktemp("parts"), replies=120, prompts=12)


def test_puts_are_the_gates_deliveries():
    log = lambda role, qid, model: {"role": role, "qid": qid, "model": model}  # noqa: E731
    entries = [("a", {}, log("mentor", "q1", "m0")), ("b", {}, log("mentor", "q1", "m0")),
               ("c", {}, log("intern", "q1", "i0")), ("d", {}, log("intern", "q1", "i0")),
               ("e", {}, log("intern", "q1", "i1")), ("f", {}, log("intern", "q2", "i1")),
               ("g", {}, log("judge", "q2", "judge"))]
    assert [[k for k, _, _ in put] for put in group_puts(entries)] == [
        ["a"], ["b"], ["c", "d"], ["e"], ["f"], ["g"]]


def test_turns_deal_puts_at_the_given_rate():
    puts = [[("k", {}, {})] for _ in range(177)]
    dealt = turns(puts, 1.77)
    assert [p for turn in dealt for p in turn] == puts  # every put once, in order
    assert len(dealt) == 100 and {len(t) for t in dealt} == {1, 2}
    assert len(turns(puts, 1.0)) == 177 and len(one_per_turn([[1, 2], [3]])) == 3


def test_workload_is_a_real_search(workload):
    replies = [e for put in workload.puts for e in put]
    assert len(replies) == 120 and len({k for k, _, _ in replies}) == 120
    roles = {log["role"] for _, _, log in replies}
    assert roles == {"mentor", "intern", "judge"}
    assert max(len(p) for p in workload.puts) > 1  # intern batches arrive together
    assert all(reply["text"] for _, reply, _ in replies)
    assert len(workload.prompts) == 12 and all("Question:" in p.parts[-2].text
                                               for p in workload.prompts)


def test_old_and_new_store_the_same_memo_and_call_log(workload, tmp_path):
    r = measure_storing(tmp_path, workload.puts, 1.77, repeats=1)
    assert r["stores_identical"] is True
    # and that is what was given: every reply under its key, the log in order with key and seq
    entries = [e for put in workload.puts for e in put]
    expected_log = [{**log, "key": key, "seq": i + 1} for i, (key, _, log) in enumerate(entries)]
    expected_memo = [(key, reply) for key, reply, _ in entries]
    for name in ("measured", "one_per_turn"):
        for mode in ("old", "new"):
            assert store_contents(tmp_path / f"store-{name}-{mode}-0") == (expected_log,
                                                                          expected_memo)
    measured = r["measured"]
    assert measured["turns"] == len(turns(workload.puts, 1.77))
    assert measured["new_commits"] == measured["turns"] < measured["old_commits"] == 120
    assert r["one_per_turn"]["new_commits"] == r["one_per_turn"]["turns"] == 120


def test_renderings_are_equal_and_a_mismatch_stops_the_bench(workload, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from backends.messages import family_messages as messages
    from backends.template_source import load_chat_template

    folders = template_folders(tmp_path)
    # the "old" path renders what transformers renders for the loop's tokenizer folder
    tok = AutoTokenizer.from_pretrained(folders["text"])
    jinja = load_chat_template(str(folders["text"]), "text")
    for p in workload.prompts:
        m = messages(p, "text")
        assert (jinja.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                == tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
    r = measure_render(folders["text"], "text", workload.prompts, repeats=1)
    assert r["equal"] is True and r["prompts"] == 12
    imaged = with_images(workload.prompts)
    assert sum(isinstance(x, Image) for q in imaged for x in q.parts) == 18
    for family in ("qwen2-vl", "internvl"):
        assert measure_render(folders[family], family, imaged, repeats=1)["images"] == 18
    # a template the fast path cannot take (it trims content) is reported, not timed
    trimming = INTERNVL_TEMPLATE.replace("message['content']", "message['content'] | trim")
    (folders["internvl"] / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": trimming}))
    with pytest.raises(RuntimeError, match="could not compile"):
        measure_render(folders["internvl"], "internvl", imaged, repeats=1)
