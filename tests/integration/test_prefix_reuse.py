"""Prefix KV reuse in the `local` backend (issue 4): equality, prefill savings, LRU, layout."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import local_rollout as local  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from backends.local import PrefixLRU  # noqa: E402
from backends.local_runner import local_messages  # noqa: E402
from bench.local_twin import twin  # noqa: E402
from bench.prefix import Workload, build_workload, compare, run_prefix_bench  # noqa: E402
from mics.prompts import INTERN_INSTRUCTION, intern_prompt  # noqa: E402
from mics.types import ROOT_TEXT, ImageRef, Question, Reply  # noqa: E402

VL_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}




@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRef]:
    from PIL import Image as PILImage

    out = []
    for i, (size, color) in enumerate([((100, 80), (200, 30, 30)), ((120, 90), (30, 30, 200)),
                                       ((100, 80), (30, 200, 30))]):
        path = tmp_path_factory.mktemp("img") / f"{i}.png"
        PILImage.new("RGB", size, color).save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append(ImageRef(str(path), digest, "image/png", *size))
    return out



def both(path: Path, workload: Workload, **options: Any) -> dict[str, dict[str, Any]]:
    reuse = local(path, **options)
    return anyio.run(compare, twin(reuse, prefix_cache=False), reuse, workload)


def texts(replies: list[Reply]) -> list[str]:
    return [r.text for r in replies]


# --- equality and savings ----------------------------------------------------------------------

def test_reuse_is_greedy_equal_and_prefills_under_a_quarter(tiny_lm: Path) -> None:
    # 2 questions x 3 depths x 3 candidates, greedy and sampled rows mixed in every batch
    work = build_workload(2, 3, 3, (0.0, 1.0), 6, seed=1)
    got = both(tiny_lm, work)
    naive, reuse = got["naive"], got["reuse"]
    greedy = [i for i, c in enumerate(c for d in range(3) for q in work for c in q[d])
              if c.sampling.greedy]
    assert [naive["replies"][i].text for i in greedy] == [reuse["replies"][i].text for i in greedy]
    assert texts(naive["replies"]) == texts(reuse["replies"])  # per-row seeds: sampled too
    assert len(set(texts(naive["replies"]))) > 10  # not degenerate
    sn, sr = naive["stats"], reuse["stats"]
    assert sr["fallbacks"] == 0 and sr["prompt_tokens"] == sn["prompt_tokens"]
    assert sr["prefill_tokens"] <= 0.25 * sn["prefill_tokens"]
    assert sr["prefill_tokens"] <= 0.25 * sn["prompt_tokens"]  # even against unpadded prompts
    usage = [r.usage for r in reuse["replies"]]
    assert all(u.cached_tokens == 0 for u in usage[:12])  # depth 1 (one batch): nothing cached
    assert all(0 < u.cached_tokens < u.prompt_tokens for u in usage[12:])
    assert [u.prompt_tokens for u in usage] == [r.usage.prompt_tokens for r in naive["replies"]]
    assert sr["cached_tokens"] == sum(u.cached_tokens for u in usage)


def test_vl_reuse_with_images_in_the_prefix_is_greedy_equal(tiny_vl: Path, tmp_path: Path) -> None:
    work = build_workload(2, 2, 3, (0.0,), 8, seed=2, image_dir=tmp_path)
    got = both(tiny_vl, work, **VL_PIXELS)
    assert texts(got["naive"]["replies"]) == texts(got["reuse"]["replies"])
    sn, sr = got["naive"]["stats"], got["reuse"]["stats"]
    assert sr["fallbacks"] == 0 and sr["prefill_tokens"] < 0.5 * sn["prefill_tokens"]


def test_lru_stays_bounded_and_outputs_stay_equal(tiny_lm: Path) -> None:
    work = build_workload(3, 2, 2, (0.0,), 4, seed=3)
    reuse = local(tiny_lm, prefix_cache_size=2, max_batch=4)
    got = anyio.run(compare, twin(reuse, prefix_cache=False), reuse, work)
    assert texts(got["naive"]["replies"]) == texts(got["reuse"]["replies"])
    # bounded: the LRU ends full at its size of 2 and had to evict to stay there
    assert got["reuse"]["stats"]["prefix_entries"] == 2
    assert got["reuse"]["stats"]["prefix_evictions"] > 0
    assert got["reuse"]["stats"]["prefix_hits"] > 0


def test_prefix_lru_crops_keeps_maximal_keys_and_evicts_oldest() -> None:
    import torch

    def kv(n: int, fill: float) -> list[tuple[Any, Any]]:
        t = torch.full((1, 2, n, 4), fill)
        return [(t, t.clone())]

    lru = PrefixLRU(2)
    lru.put((1, 2, 3), kv(3, 1.0))
    lru.put((1, 2), kv(2, 9.0))  # covered by (1, 2, 3): not stored
    assert lru.keys() == [(1, 2, 3)]
    n, got = lru.match((1, 2, 7, 8))  # cropped to the common prefix
    assert n == 2 and got is not None and got[0][0].shape[2] == 2
    lru.put((1, 2, 3, 4), kv(4, 2.0))  # replaces its prefix (1, 2, 3)
    assert lru.keys() == [(1, 2, 3, 4)]
    lru.put((5,), kv(1, 3.0))
    lru.match((1, 2))  # touch: (5,) becomes the oldest
    lru.put((6, 7), kv(2, 4.0))
    assert lru.keys() == [(1, 2, 3, 4), (6, 7)] and lru.evictions == 1
    assert lru.match((9,)) == (0, None)
    assert len(PrefixLRU(0)) == 0


def test_reuse_options_are_validated(tiny_lm: Path) -> None:
    with pytest.raises(ValueError, match="prefix_cache: expected bool"):
        local(tiny_lm, prefix_cache="yes")
    with pytest.raises(ValueError, match="prefix_cache_size"):
        local(tiny_lm, prefix_cache_size=-1)
    with pytest.raises(ValueError, match="twin can change only"):
        twin(local(tiny_lm), dtype="float16")
    assert local(tiny_lm, prefix_cache=False).identity() == local(tiny_lm).identity()


# --- prefix-stable layout (property test) ------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=60)
_STEP = _TEXT.map(str.strip).filter(bool)


def _block_tokens(tokenizer: Any, text: str, end: int) -> int:
    """How many tokens of `text` lie entirely before character `end`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return sum(1 for _, stop in enc["offset_mapping"] if stop <= end)


def _expanded(text: str, counts: list[int]) -> str:
    """The text as the VL processor tokenizes it: each image pad repeated per image."""
    pad = "<|image_pad|>"
    parts = text.split(pad)
    assert len(parts) == len(counts) + 1
    return parts[0] + "".join(pad * n + rest for n, rest in zip(counts, parts[1:], strict=True))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(question=_TEXT, path=st.lists(_STEP, max_size=3), a=_STEP, b=_STEP,
       picks=st.lists(st.integers(0, 2), max_size=2), vl=st.booleans())
def test_intern_prompts_share_a_tokenized_prefix(tiny_lm: Path, tiny_vl: Path,
                                                 images: list[ImageRef], question: str,
                                                 path: list[str], a: str, b: str,
                                                 picks: list[int], vl: bool) -> None:
    model = local(tiny_vl, **VL_PIXELS) if vl else local(tiny_lm)
    runner = model.runner
    m = runner.load()  # for its tokenizer and processor
    refs = tuple(images[i] for i in picks) if vl else ()
    q = Question("q", 0, question, "x", refs, tuple(r.path for r in refs), "")
    selected = "\n\n".join([ROOT_TEXT, *path])
    prompts = [intern_prompt(q, f"{selected}\n\n{step}") for step in (a, b)]
    rows = runner.encode_prompts(prompts)
    shared = next((i for i, (x, y) in enumerate(zip(rows[0].key, rows[1].key, strict=False))
                   if x != y), min(len(rows[0].key), len(rows[1].key)))
    [text] = (m.processor or m.tokenizer).apply_chat_template(
        [local_messages(prompts[0], vl)], tokenize=False, add_generation_prompt=True)
    if vl:
        merge = m.processor.image_processor.merge_size ** 2
        text = _expanded(text, [int(g.prod()) // merge for g in rows[0].grids])
    assert m.tokenizer(text, add_special_tokens=False)["input_ids"] == rows[0].ids.tolist()
    # system + images + question: everything before the fixed instruction
    block = _block_tokens(m.tokenizer, text, text.index(INTERN_INSTRUCTION))
    assert block > 0 and shared >= block
    # two candidates at one depth: through the selected path as well
    if a != b:
        through_path = _block_tokens(m.tokenizer, text, text.index(selected) + len(selected))
        assert shared >= through_path > block
    # and the same text with other images parts ways at the first differing image
    if vl and refs:
        other = replace(q, images=tuple(images[(i + 1) % 3] for i in picks))
        p = intern_prompt(other, f"{selected}\n\n{a}")
        [moved] = runner.encode_prompts([p])
        first_image = rows[0].spans[0][0]
        assert moved.key[:first_image] == rows[0].key[:first_image]
        assert moved.key[first_image] != rows[0].key[first_image]


# --- the bench, at tiny size -------------------------------------------------------------------

def test_run_prefix_bench_smoke() -> None:
    from bench.loopback import LoopbackServer

    with LoopbackServer({"i0": {"role": "intern", "skill": 0.9}}) as srv:
        out = run_prefix_bench(["tiny"], questions=2, depths=2, candidates=2,
                               temperatures=(1.0,), new_tokens=4, vlm=True,
                               sglang_url=srv.url_for("i0"), repeats=1)
    assert set(out) == {"results", "machine", "command"}
    assert out["command"].startswith("mics bench prefix")
    tiny, vl, sglang = out["results"]
    for r in (tiny, vl):
        assert isinstance(r["prefill_tokens_naive"], int)
        assert 0 < r["prefill_tokens_reuse"] < r["prefill_tokens_naive"]
        assert r["prefill_token_ratio"] == round(
            r["prefill_tokens_reuse"] / r["prefill_tokens_naive"], 4)
        assert r["wall_speedup"] > 0 and r["greedy_equal"] is True and r["fallbacks"] == 0
        assert r["workload"]["questions"] == 2 and r["calls"] == 8
        assert len(r["wall_s_runs"]["naive"]) == 1
    assert (tiny["model"], vl["model"]) == ("tiny", "tiny-qwen2-vl") and vl["workload"]["images"]
    assert sglang["model"].startswith("sglang@") and sglang["calls"] == 8
    assert 0 < sglang["cached_token_ratio"] < 1 and sglang["prefill_token_ratio"] < 1


def test_the_kv_cache_goes_by_the_keyword_the_installed_transformers_takes(tiny_lm: Path
                                                                         ) -> None:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated and
    slated for removal): prefix reuse passes its cache by the name the model's `forward`
    takes, so it keeps working, silently, on either side of the rename."""
    import inspect
    import warnings

    work = build_workload(1, 2, 2, (0.0,), 4, seed=5)
    reuse = local(tiny_lm)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = anyio.run(compare, twin(reuse, prefix_cache=False), reuse, work)
    assert got["reuse"]["stats"]["prefix_hits"] + got["reuse"]["stats"]["cached_tokens"] > 0
    m = reuse.runner.load()
    takes = inspect.signature(m.model.forward).parameters
    assert m.cache_kw == ("cache" if "cache" in takes else "past_key_values")
    renamed = [str(w.message) for w in seen if "past_key_values" in str(w.message)]
    assert renamed == []
