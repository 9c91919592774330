"""The `local` backend on tiny random models built once per session (no downloads)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import local_rollout as local  # noqa: E402

from backends.base import Call, PermanentError  # noqa: E402
from backends.local import LocalRollout  # noqa: E402
from backends.registry import build_rollout  # noqa: E402
from mics.config import ConfigError, ModelConfig  # noqa: E402
from mics.types import Image, ImageRef, Prompt, Reply, Sampling, Text  # noqa: E402

SMALL_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}
GREEDY = Sampling(temperature=0.0, max_tokens=24)





def text_call(i: int, sampling: Sampling = GREEDY, sample_index: int = 0) -> Call:
    question = f"Case {i}: " + "the patient reports chest pain. " * (i % 3) + "Diagnosis?"
    return Call(Prompt("You are a careful intern.", (Text(question),)), sampling, sample_index)


def png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> ImageRef:
    from PIL import Image as PILImage

    PILImage.new("RGB", size, color).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ImageRef(path=str(path), sha256=digest, mime="image/png", width=size[0],
                    height=size[1])


async def concurrently(model: LocalRollout, calls: list[Call]) -> list[Reply]:
    out: list[Reply | None] = [None] * len(calls)

    async def one(i: int) -> None:
        [out[i]] = await model.rollout([calls[i]])

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return [r for r in out if r is not None]


def test_concurrent_rollouts_batch_and_match_sequential(tiny_lm: Path) -> None:
    calls = [text_call(i) for i in range(6)]

    def batches(model: LocalRollout) -> tuple[int, int]:
        return model.stats["batches"], model.stats["calls"]

    async def main() -> tuple[list[Reply], list[Reply], tuple[int, int], list[Reply],
                              tuple[int, int]]:
        model = local(tiny_lm)
        single = [(await model.rollout([c]))[0] for c in calls]
        assert batches(model) == (6, 6)  # one at a time: one batch each
        model.reset_stats()
        batched = await concurrently(model, calls)
        capped = local(tiny_lm, max_batch=4)
        capped_out = await concurrently(capped, calls)
        await model.aclose()
        return single, batched, batches(model), capped_out, batches(capped)

    single, batched, sizes, capped, capped_sizes = anyio.run(main)
    assert sizes == (1, 6) and capped_sizes == (2, 6)  # six calls: one batch, or 4 + 2
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.text for r in capped] == [r.text for r in single]
    assert len({r.text for r in single}) > 1  # not degenerate
    for r in batched:
        assert r.finish_reason == "length" and r.usage.completion_tokens == 24
    lengths = [r.usage.prompt_tokens for r in batched]
    assert lengths == [r.usage.prompt_tokens for r in single] and len(set(lengths)) == 3


def test_qwen2_vl_answers_about_images(tiny_vl: Path, tmp_path: Path) -> None:
    small = png(tmp_path / "small.png", (100, 80), (200, 30, 30))
    large = png(tmp_path / "large.png", (200, 160), (30, 30, 200))
    calls = [Call(Prompt("You are a radiology intern.", (Image(ref), Text("What is shown?"))),
                  Sampling(temperature=0.0, max_tokens=16)) for ref in (small, large)]

    async def main() -> tuple[list[Reply], list[Reply]]:
        model = local(tiny_vl, **SMALL_PIXELS)
        assert model.kind == "vl"
        return await model.rollout(calls), [(await model.rollout([c]))[0] for c in calls]

    batched, single = anyio.run(main)
    assert all(r.text and r.usage.completion_tokens == 16 for r in batched)
    # 100x80 -> grid 6x8 -> 12 image tokens; 200x160 -> 196x168 -> grid 14x12 -> 42 tokens
    assert batched[1].usage.prompt_tokens - batched[0].usage.prompt_tokens == 42 - 12
    assert [r.text for r in batched] == [r.text for r in single]
    assert batched[0].text != batched[1].text


def test_image_token_ids_follow_the_image(tiny_vl: Path, tmp_path: Path) -> None:
    red = png(tmp_path / "red.png", (100, 80), (200, 30, 30))
    blue = png(tmp_path / "blue.png", (100, 80), (30, 30, 200))
    model = local(tiny_vl, **SMALL_PIXELS)
    runner = model.runner
    enc = [runner.encode_batch([Prompt("s", (Image(r), Text("q")))]) for r in (red, blue)]
    image_id = runner.load().processor.image_token_id
    assert int((enc[0].input_ids == image_id).sum()) == 12
    assert enc[0].input_ids.tolist() == enc[1].input_ids.tolist()
    assert not enc[0].pixel_values.equal(enc[1].pixel_values)
    assert enc[0].image_grid_thw.tolist() == [[1, 6, 8]]  # 100x80 -> 12 tokens after merging


def test_sampling_is_explicit_and_seeded(tiny_lm: Path) -> None:
    hot = Sampling(temperature=1.0, top_p=0.95, top_k=50, max_tokens=16)
    model = local(tiny_lm)
    m = model.runner.load()
    seen: list[Any] = []
    generate = m.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs["generation_config"])
        return generate(**kwargs)

    m.model.generate = spy

    async def main() -> list[list[Reply]]:
        greedy = [await model.rollout([text_call(1)]) for _ in range(2)]
        sampled = [await model.rollout([text_call(1, hot, k) for k in (0, 1, 0)])]
        alone = [await model.rollout([text_call(1, hot, 1)])]
        return greedy + sampled + alone

    (g1,), (g2,), (s0, s1, s0_again), (s1_alone,) = anyio.run(main)
    assert g1.text == g2.text and g1.usage.completion_tokens == g2.usage.completion_tokens
    assert s0.text == s0_again.text and s1.text == s1_alone.text and s0.text != s1.text
    assert [c.do_sample for c in seen] == [False, False, True, True]
    assert (seen[2].temperature, seen[2].top_p, seen[2].top_k) == (1.0, 0.95, 50)
    assert seen[0].max_new_tokens == 24 and seen[2].max_new_tokens == 16


def test_stop_strings_are_trimmed(tiny_lm: Path) -> None:
    async def main() -> tuple[Reply, Reply]:
        model = local(tiny_lm)
        [full] = await model.rollout([text_call(2)])
        stop = full.text[5:8]
        [cut] = await model.rollout([text_call(2, Sampling(0.0, max_tokens=24, stop=(stop,)))])
        return full, cut

    full, cut = anyio.run(main)
    assert full.text.startswith(cut.text) and len(cut.text) < len(full.text)
    assert cut.finish_reason == "stop" and full.text[len(cut.text):].startswith(full.text[5:8])


def test_event_loop_keeps_running_during_generate(tiny_lm: Path) -> None:
    calls = [text_call(i, Sampling(0.0, max_tokens=64)) for i in range(4)]

    async def main() -> int:
        model = local(tiny_lm)
        await model.rollout(calls[:1])  # load outside the measured window
        ticks = 0
        done = anyio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await model.rollout(calls)
            done.set()
        return ticks

    assert anyio.run(main) >= 5  # about 160 ticks on 2 CPU cores


def test_options_validation_and_registry(tiny_lm: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'tiny'.*unknown local option\(s\) colour.*max_batch"):
        local(tiny_lm, colour="red")
    with pytest.raises(ValueError, match="dtype"):
        local(tiny_lm, dtype="int8")
    cfg = ModelConfig(name="intern", backend="local", model=str(tiny_lm), options={"seed": 3})
    model = build_rollout(cfg)
    assert isinstance(model, LocalRollout) and model.kind == "text"
    ident = model.identity()
    assert ident["backend"] == "local" and ident["model"] == str(tiny_lm)
    assert len(ident["weights"]) == 64 and ident["options"]["seed"] == 3
    assert local(tiny_lm, seed=4).identity()["options"]["seed"] == 4
    with pytest.raises(ConfigError, match="unknown local option"):
        build_rollout(ModelConfig(name="x", backend="local", model=str(tiny_lm),
                                  options={"nope": 1}))


def test_bad_model_folder_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path / "missing")):  # a config error
        local(tmp_path / "missing")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        local(unreadable)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2"}')
    model = local(broken)

    async def main() -> None:
        await model.rollout([text_call(0)])

    with pytest.raises(PermanentError, match=str(broken)):
        anyio.run(main)


def test_generation_errors_are_transient_once(tiny_lm: Path) -> None:
    from backends.base import OutOfMemoryError, TransientError

    model = local(tiny_lm)
    m = model.runner.load()
    failures = iter([RuntimeError("CUDA out of memory"), RuntimeError("boom"),
                     RuntimeError("boom")])

    def broken(**kwargs: Any) -> Any:
        raise next(failures)

    m.model.generate = broken

    async def attempt() -> BaseException:
        try:
            await model.rollout([text_call(0)])
        except Exception as e:
            return e
        raise AssertionError("rollout should fail")

    errors = [anyio.run(attempt) for _ in range(3)]
    assert [type(e) for e in errors] == [OutOfMemoryError, TransientError, PermanentError]
    assert "out of memory" in str(errors[0]) and "boom" in str(errors[2])
