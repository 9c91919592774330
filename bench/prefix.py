"""`mics bench prefix`: prefix KV reuse on a MICS-shaped intern workload (issue 4).

The workload is the engine's intern traffic: `questions` questions searched for `depths` depths;
at every depth `candidates` candidate steps extend the selected path, and each candidate prompt
(`mics.prompts.intern_prompt`) is sampled once per temperature, so every question and depth is one
`rollout` of candidates x temperatures calls. Questions run concurrently, depths in order, as in
the engine. Question and step texts are seeded random clinical prose; VL models get 1-2 images
per question. Each model is a random model built on the fly (`bench.models`); it runs the same
workload on the `local` backend with prefix reuse off, then on, and a greedy copy of the workload
(temperature 0) both ways to check that the outputs are identical.

Baselines for the reuse mode's prefill tokens: `naive` (every call's prompt prefilled, padding
included: with two temperatures each prompt twice), `dedup_only` (each distinct prompt once,
whole, no shared-prefix KV, no padding) and the unique-token bound (each distinct prompt token
once: the token trie of all prompts; no prefix cache can do better). Each result carries
`prefill_vs_dedup_only` and `prefill_vs_unique_bound` (reuse prefill tokens / each).

With `sglang_url`, the workload also goes to a running SGLang server through the `sglang` backend
(root warm-up on) and the server's own `cached_tokens` accounting is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson

from backends.base import Call
from mics.config import ModelConfig
from mics.prompts import intern_prompt
from mics.types import ROOT_TEXT, ImageRef, Question, Reply, Sampling

Workload = list[list[list[Call]]]  # question -> depth -> the calls of one rollout

TINY = "tiny"
BIG = "qwen2-0.5b-shape"
TINY_VL = "tiny-qwen2-vl"
# On 2 CPU cores the 0.5B shape needs about a minute per batch of 6 calls without reuse
# (prefill, then 16 decode steps); one question (and one for its greedy check) keeps the whole
# bench at a few minutes. `max_questions` raises the cap.
DEFAULT_MAX_QUESTIONS = {BIG: 1}
DEFAULT_GREEDY_QUESTIONS = {BIG: 1}
_VL_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 256}

_AGES = ["34", "47", "58", "62", "71", "29", "83", "45"]
_FINDINGS = [
    "fever", "productive cough", "pleuritic chest pain", "dyspnea on exertion", "hemoptysis",
    "night sweats", "weight loss", "abdominal pain", "nausea", "lower limb edema", "syncope",
    "palpitations", "headache", "confusion", "jaundice", "back pain",
]
_OPENERS = [
    "The chest radiograph shows", "On the contrast enhanced CT there is", "The MRI demonstrates",
    "Ultrasound reveals", "The lateral view shows", "Comparison with the prior study shows",
    "The scout image suggests", "Careful review of the images shows",
]
_LESIONS = [
    "a dense consolidation", "a low attenuation lesion", "a small pleural effusion",
    "an enlarged cardiac silhouette", "an air fluid level", "a ring enhancing lesion",
    "multiple cavitating nodules", "a thickened wall with surrounding fluid",
]
_SITES = [
    "in the right lower lobe", "in the left upper lobe", "in the liver", "behind the heart",
    "in the gallbladder fossa", "in the left parietal region", "at the lung bases",
    "along the descending aorta",
]
_REASONING = [
    "which is most consistent with an infectious process", "so a malignancy must be excluded",
    "and the laboratory values support an inflammatory cause",
    "which makes a cardiac etiology less likely", "and the time course argues against trauma",
    "so the differential narrows to two conditions", "which matches the clinical presentation",
    "and the distribution of findings is typical for this disease",
]


def _sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_OPENERS)} {rng.choice(_LESIONS)} {rng.choice(_SITES)}, "
            f"{rng.choice(_REASONING)}.")


def _question_text(rng: random.Random) -> str:
    findings = rng.sample(_FINDINGS, 3)
    return (f"A {rng.choice(_AGES)}-year-old {rng.choice(['man', 'woman'])} presents with "
            f"{findings[0]}, {findings[1]} and {findings[2]} for {rng.randint(2, 14)} days. "
            f"{_sentence(rng)} What is the most likely diagnosis?")


def _step(rng: random.Random, depth: int) -> str:
    return f"### Step {depth}: " + " ".join(_sentence(rng) for _ in range(rng.randint(2, 3)))


def _image(directory: Path, name: str, rng: random.Random) -> ImageRef:
    """A seeded random PNG (noise over a colour, so image tokens differ between images)."""
    from PIL import Image as PILImage

    w, h = rng.choice([(224, 224), (280, 224), (336, 252)])
    img = PILImage.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    noise = PILImage.frombytes("RGB", (w // 8, h // 8), rng.randbytes(3 * (w // 8) * (h // 8)))
    img.paste(noise.resize((w // 2, h // 2)), (w // 4, h // 4))
    path = directory / f"{name}.png"
    img.save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ImageRef(path=str(path), sha256=digest, mime="image/png", width=w, height=h)


def build_workload(questions: int, depths: int, candidates: int, temperatures: Sequence[float],
                   new_tokens: int, seed: int = 0, image_dir: Path | None = None) -> Workload:
    """The intern calls of a MICS search: [question][depth] -> candidates x temperatures calls.

    The selected path grows by one (seeded) chosen candidate per depth, exactly as the engine's
    node prefixes do (`ROOT_TEXT`, then steps joined by blank lines).
    """
    rng = random.Random(seed)
    out: Workload = []
    for qi in range(questions):
        images: tuple[ImageRef, ...] = ()
        if image_dir is not None:
            images = tuple(_image(image_dir, f"q{qi}-{k}", rng)
                           for k in range(rng.randint(1, 2)))
        q = Question(qid=f"q{qi}", index=qi, question=_question_text(rng), gt_answer="",
                     images=images, image_paths=tuple(i.path for i in images), case_info="")
        path, per_depth = ROOT_TEXT, []
        for depth in range(1, depths + 1):
            steps = [_step(rng, depth) for _ in range(candidates)]
            per_depth.append([Call(intern_prompt(q, f"{path}\n\n{step}"),
                                   Sampling(temperature=t, max_tokens=new_tokens))
                              for step in steps for t in temperatures])
            path = f"{path}\n\n{rng.choice(steps)}"
        out.append(per_depth)
    return out


async def drive(model: Any, workload: Workload,
                depths: Sequence[int] | None = None) -> tuple[list[Reply], float, float]:
    """Run the workload like the engine: questions concurrently, depths in order.

    `depths` restricts the run to those depth indices. Returns the replies in workload order,
    the wall time and this process's CPU time (all threads), in seconds.
    """
    levels = range(max(len(q) for q in workload)) if depths is None else depths
    replies: list[list[list[Reply]]] = [[[] for _ in q] for q in workload]

    async def question(i: int) -> None:
        for d in levels:
            replies[i][d] = await model.rollout(workload[i][d])

    start, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(len(workload)):
            tg.start_soon(question, i)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return [r for q in replies for d in q for r in d], wall, cpu


async def compare(naive: Any, reuse: Any, workload: Workload,
                  flip: bool = False) -> dict[str, dict[str, Any]]:
    """Both models on the same workload, depth by depth in alternating order (naive first at
    even depths unless `flip`), so that drifting load on a shared machine hits both alike:
    replies (depth-major), summed wall and CPU seconds, and the models' stats."""
    out: dict[str, dict[str, Any]] = {}
    for label, model in (("naive", naive), ("reuse", reuse)):
        model.reset_stats()
        out[label] = {"replies": [], "wall": 0.0, "cpu": 0.0}
    for d in range(max(len(q) for q in workload)):
        order = [("naive", naive), ("reuse", reuse)]
        for label, model in order if (d % 2 == 0) != flip else order[::-1]:
            replies, wall, cpu = await drive(model, workload, [d])
            out[label]["replies"] += replies
            out[label]["wall"] += wall
            out[label]["cpu"] += cpu
    for label, model in (("naive", naive), ("reuse", reuse)):
        out[label]["stats"] = dict(model.stats)
    return out


def prompt_keys(model: Any, workload: Workload) -> list[tuple[int, ...]]:
    """The token key of every call's prompt, in workload order, tokenized exactly as the
    `local` backend's reuse path does (image tokens keyed by the image's content hash)."""
    runner = model.runner
    m = runner.load()
    memo: dict[Any, tuple[int, ...]] = {}
    out = []
    with runner.lock:
        for call in (c for q in workload for d in q for c in d):
            if call.prompt not in memo:
                imgs = runner._images(call.prompt)
                memo[call.prompt] = runner._encode_row(m, call.prompt, imgs).key
            out.append(memo[call.prompt])
    return out


def dedup_only_tokens(keys: Sequence[tuple[int, ...]]) -> int:
    """Prefill of the `dedup_only` mode: every distinct prompt computed once, whole, with no
    shared-prefix KV and no padding (so, if anything, a flattering baseline)."""
    return sum(len(k) for k in set(keys))


def unique_token_bound(keys: Sequence[tuple[int, ...]]) -> int:
    """Every distinct prompt token prefilled once: the size of the token trie of all prompts
    (a token counts once per distinct prefix ending in it). No prefix cache can compute less."""
    total, prev = 0, ()
    for k in sorted(set(keys)):
        total += len(k) - len(os.path.commonprefix([prev, k]))
        prev = k
    return total


def _builders() -> dict[str, Callable[[Path], Path]]:
    from bench.models import build_qwen2_05b_shape, build_tiny_lm, build_tiny_qwen2_vl

    return {TINY: build_tiny_lm, BIG: build_qwen2_05b_shape, TINY_VL: build_tiny_qwen2_vl}


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "cuda": torch.cuda.is_available(), "device": "cpu"}


def _bench_local(name: str, folder: Path, workload: Workload, greedy: Workload,
                 options: dict[str, Any], shape: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Reuse off vs on: `repeats` timed comparisons (each with a fresh, empty LRU; the best time
    per mode counts), then the greedy check."""
    from backends.local import LocalRollout
    from bench.local_twin import twin

    reuse = LocalRollout(ModelConfig(name=name, backend="local", model=str(folder),
                                     options={**options, "prefix_cache": True}))
    naive = twin(reuse, prefix_cache=False)  # loads the weights once, shared by all twins
    fresh = [reuse, *(twin(reuse, prefix_cache=True) for _ in range(repeats))]

    async def main() -> dict[str, Any]:
        warm = build_workload(1, 1, 2, (0.0,), 2, seed=10_000)
        for model in (naive, fresh[-1]):  # warm both paths, untimed
            await drive(model, warm)
        timed = [await compare(naive, fresh[k], workload, flip=k % 2 == 1)
                 for k in range(repeats)]
        checked = await compare(naive, twin(fresh[-1], prefix_cache=True), greedy)
        for model in (naive, *fresh):
            await model.aclose()
        return {"timed": timed, "greedy": checked}

    params = sum(p.numel() for p in reuse.runner.load().model.parameters())
    got = anyio.run(main)
    keys = prompt_keys(reuse, workload)
    dedup, bound = dedup_only_tokens(keys), unique_token_bound(keys)
    runs = got["timed"]
    n, r = runs[0]["naive"], runs[0]["reuse"]
    sn, sr = n["stats"], r["stats"]
    best = {mode: {unit: min(run[mode][unit] for run in runs) for unit in ("wall", "cpu")}
            for mode in ("naive", "reuse")}
    same = sum(a.text == b.text for a, b in zip(n["replies"], r["replies"], strict=True))
    g = got["greedy"]
    return {
        "model": name, "kind": reuse.kind, "params": params,
        "prefill_tokens_naive": sn["prefill_tokens"], "prefill_tokens_reuse": sr["prefill_tokens"],
        "prefill_token_ratio": round(sr["prefill_tokens"] / sn["prefill_tokens"], 4),
        "prefill_tokens_dedup_only": dedup, "prefill_tokens_unique_bound": bound,
        "prefill_vs_dedup_only": round(sr["prefill_tokens"] / dedup, 4),
        "prefill_vs_unique_bound": round(sr["prefill_tokens"] / bound, 4),
        "dedup_only_vs_naive": round(dedup / sn["prefill_tokens"], 4),
        "wall_speedup": round(best["naive"]["wall"] / best["reuse"]["wall"], 3),
        "wall_s_naive": round(best["naive"]["wall"], 3),
        "wall_s_reuse": round(best["reuse"]["wall"], 3),
        "cpu_speedup": round(best["naive"]["cpu"] / best["reuse"]["cpu"], 3),
        "cpu_s_naive": round(best["naive"]["cpu"], 3),
        "cpu_s_reuse": round(best["reuse"]["cpu"], 3),
        "wall_s_runs": {mode: [round(run[mode]["wall"], 3) for run in runs]
                        for mode in ("naive", "reuse")},
        "prompt_tokens": sn["prompt_tokens"],
        "prefill_token_ratio_vs_prompt_tokens":
            round(sr["prefill_tokens"] / sn["prompt_tokens"], 4),
        "cached_tokens": sr["cached_tokens"], "prefix_hits": sr["prefix_hits"],
        "prefix_misses": sr["prefix_misses"], "fallbacks": sr["fallbacks"],
        "calls": sn["calls"], "batches": sn["batches"],
        "greedy_equal": [x.text for x in g["naive"]["replies"]]
                        == [x.text for x in g["reuse"]["replies"]],
        "greedy_calls": len(g["naive"]["replies"]),
        "sampled_equal_fraction": round(same / max(len(n["replies"]), 1), 4),
        "workload": shape,
    }


def _bench_sglang(url: str, workload: Workload, tokenizer: Path, family: str,
                  shape: dict[str, Any]) -> dict[str, Any]:
    """The workload against a running SGLang server; its own cached-token accounting."""
    from backends.sglang import SGLangRollout

    cfg = ModelConfig(name="intern", backend="sglang", model="intern", base_url=url,
                      options={"tokenizer": str(tokenizer), "family": family,
                               "check_model": False})
    model = SGLangRollout(cfg)
    every: list[Reply] = []  # warm-up requests included: they cost prefill too
    generate = model.generate

    async def counted(*args: Any, **kwargs: Any) -> list[Reply]:
        got = await generate(*args, **kwargs)
        every.extend(got)
        return got

    model.generate = counted  # type: ignore[method-assign]

    async def main() -> tuple[list[Reply], float, float]:
        try:
            return await drive(model, workload)
        finally:
            await model.aclose()

    replies, wall, _ = anyio.run(main)
    prompt = sum(r.usage.prompt_tokens for r in replies)
    cached = sum(r.usage.cached_tokens for r in replies)
    computed = sum(max(r.usage.prompt_tokens - r.usage.cached_tokens, 0) for r in every)
    return {
        "model": f"sglang@{url}", "kind": family, "prefill_tokens_naive": prompt,
        "prefill_tokens_reuse": computed,
        "prefill_token_ratio": round(computed / prompt, 4) if prompt else None,
        "wall_speedup": None, "wall_s_reuse": round(wall, 3), "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_token_ratio": round(cached / prompt, 4) if prompt else None,
        "calls": len(replies), "requests_with_warmup": len(every), "workload": shape,
    }


def _command(models: Sequence[str], questions: int, depths: int, candidates: int,
             temperatures: Sequence[float], new_tokens: int, sglang_url: str | None, vlm: bool,
             seed: int) -> str:
    parts = ["mics", "bench", "prefix", "--models", ",".join(models), "--questions",
             str(questions), "--depths", str(depths), "--candidates", str(candidates),
             "--temperatures", ",".join(str(t) for t in temperatures), "--new-tokens",
             str(new_tokens), "--seed", str(seed)]
    if not vlm:
        parts.append("--no-vlm")
    if sglang_url:
        parts += ["--sglang-url", sglang_url]
    return shlex.join(parts)


def run_prefix_bench(models: Sequence[str] = (TINY, BIG), questions: int = 8, depths: int = 3,
                     candidates: int = 3, temperatures: Sequence[float] = (1.2, 0.2),
                     new_tokens: int = 16, sglang_url: str | None = None, vlm: bool = True,
                     seed: int = 0, *, max_questions: dict[str, int] | None = None,
                     greedy_questions: int | None = None, repeats: int = 2,
                     command: str | None = None,
                     work_dir: str | Path | None = None) -> dict[str, Any]:
    """Prefill tokens and wall time with prefix reuse off/on, per model, in one run.

    `models` are names from `bench.models` builders: "tiny", "qwen2-0.5b-shape" (and
    "tiny-qwen2-vl", added when `vlm`; it gets images). `max_questions` caps the questions of a
    model (default: 1 for the 0.5B shape); `greedy_questions` caps the greedy equality check
    (default: 1 for the 0.5B shape, else the model's question count). Reuse off and on run
    depth by depth in alternating order on one copy of the weights, `repeats` times (the best
    time per mode counts; each repeat starts from an empty LRU). Returns {"results": [...],
    "machine": ..., "command": ...}; each result has prefill_tokens_naive/reuse,
    prefill_token_ratio (reuse / naive, both counting every position computed, padding
    included), wall_speedup (naive / reuse), the wall and CPU times, greedy_equal and the
    workload actually run.
    """
    caps = {**DEFAULT_MAX_QUESTIONS, **(max_questions or {})}
    names = list(models)
    if vlm and TINY_VL not in names:
        names.append(TINY_VL)
    builders = _builders()
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"unknown bench model(s) {unknown}; known: {sorted(builders)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="mics-bench-prefix-",
                                     dir=str(work_dir) if work_dir else None) as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        for name in names:
            is_vl = name == TINY_VL
            n_q = min(questions, caps.get(name, questions))
            n_g = min(n_q, greedy_questions if greedy_questions is not None
                      else DEFAULT_GREEDY_QUESTIONS.get(name, n_q))
            image_dir = images if is_vl else None
            work = build_workload(n_q, depths, candidates, temperatures, new_tokens, seed,
                                  image_dir)
            greedy = build_workload(n_g, depths, candidates, (0.0,), new_tokens, seed, image_dir)
            shape = {"questions": n_q, "depths": depths, "candidates": candidates,
                     "temperatures": list(temperatures), "new_tokens": new_tokens,
                     "images": is_vl, "greedy_questions": n_g, "max_batch": 16,
                     "prefix_cache_size": 32, "repeats": repeats}
            folder = builders[name](root / name)
            options = dict(_VL_PIXELS) if is_vl else {}
            results.append(_bench_local(name, folder, work, greedy, options, shape, repeats))
            for f in folder.glob("*.safetensors"):  # free the disk early (1.45 GB for 0.5B)
                f.unlink()
        if sglang_url:
            from bench.models import VL_SPECIALS, build_tokenizer

            tok = root / "sglang-tokenizer"
            build_tokenizer(VL_SPECIALS).save_pretrained(tok)
            work = build_workload(questions, depths, candidates, temperatures, new_tokens, seed,
                                  images if vlm else None)
            shape = {"questions": questions, "depths": depths, "candidates": candidates,
                     "temperatures": list(temperatures), "new_tokens": new_tokens,
                     "images": vlm}
            results.append(_bench_sglang(sglang_url, work, tok, "qwen2-vl" if vlm else "text",
                                         shape))
    cmd = command or _command(models, questions, depths, candidates, temperatures, new_tokens,
                              sglang_url, vlm, seed)
    return {"results": results, "machine": machine_info(), "command": cmd}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.prefix [--json FILE] ...`; the CLI's `mics bench prefix` wraps the same."""
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=f"{TINY},{BIG}")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--depths", type=int, default=3)
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--temperatures", default="1.2,0.2")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--sglang-url", default=None)
    p.add_argument("--no-vlm", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here")
    a = p.parse_args(argv)
    out = run_prefix_bench(
        [m for m in a.models.split(",") if m], a.questions, a.depths, a.candidates,
        tuple(float(t) for t in a.temperatures.split(",")), a.new_tokens, a.sglang_url,
        not a.no_vlm, a.seed, command=shlex.join(["python", "-m", "bench.prefix",
                                                  *(sys.argv[1:] if argv is None else argv)]))
    text = orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
