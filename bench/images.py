"""`mics bench images`: every distinct image encoded once per run, however many are in use.

Workload: `images` distinct JPEGs (seeded noise, `width` x `height`), each sent with `passes`
mentor calls (distinct prompts, so the memo answers none of them) through the call gate to an
OpenAI-compatible mentor on the loopback server, `concurrency` calls at once, pass after pass
(so an image comes back only after every other image was used: far more images in use than any
small cache holds). Images go as data URLs downscaled to `max_side`, as the openai backend sends
them. Figures: encodes (must equal the distinct images), disk and memory hits of the image cache,
client CPU per request; then a second process-like pass (a fresh cache on the same run directory,
as `mics resume` has) that must encode nothing.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from backends.base import Call
from backends.gate import CallGate
from backends.images import CACHE_DIR_NAME, ImageCache
from backends.openai_chat import OpenAIChat
from bench.loopback import LoopbackServer
from mics.config import ModelConfig
from mics.types import Image, ImageRef, Prompt, Sampling, Text
from store import RunStore


def write_images(directory: Path, n: int, width: int, height: int, seed: int) -> list[ImageRef]:
    """n distinct seeded JPEGs (coarse noise over a colour)."""
    from PIL import Image as PILImage

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        img = PILImage.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        w, h = max(1, width // 16), max(1, height // 16)
        noise = PILImage.frombytes("RGB", (w, h), rng.randbytes(3 * w * h))
        img.paste(noise.resize((width // 2, height // 2)), (width // 4, height // 4))
        path = directory / f"img{i:05d}.jpg"
        img.save(path, format="JPEG", quality=85)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        refs.append(ImageRef(path=str(path), sha256=digest, mime="image/jpeg", width=width,
                             height=height))
    return refs


async def _drive(model: OpenAIChat, gate: CallGate, calls: list[Call], concurrency: int) -> int:
    limit = anyio.Semaphore(concurrency)
    failed = 0

    async def one(call: Call) -> None:
        nonlocal failed
        async with limit:
            out = await gate.chat(model, call, role="mentor", qid="images")
            failed += not hasattr(out, "text")

    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(one, call)
    await model.aclose()
    return failed


def run_images(images: int = 2000, concurrency: int = 64, passes: int = 2, width: int = 640,
               height: int = 480, max_side: int = 512, seed: int = 0,
               work_dir: Path | None = None) -> dict[str, Any]:
    """Run the workload (then the resume-like pass); the `images` section of the report."""
    import backends.images as images_module

    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="mics-bench-images-")
        work_dir = Path(tmp)
    saved = images_module.cache()
    try:
        refs = write_images(Path(work_dir) / "images", images, width, height, seed)
        calls = [Call(Prompt("You are a radiologist.",
                             (Image(ref), Text(f"Pass {p}: describe image {i}."))),
                      Sampling(temperature=0.7, max_tokens=32))
                 for p in range(passes) for i, ref in enumerate(refs)]
        out: dict[str, Any] = {"distinct_images": images, "requests": len(calls),
                               "concurrency": concurrency, "passes": passes,
                               "image_size": [width, height], "max_side": max_side}
        run_dir = Path(work_dir) / "run"
        with LoopbackServer({"m0": {"role": "mentor"}}, seed=seed) as srv:
            for label in ("run", "resume"):
                cache = ImageCache(run_dir / CACHE_DIR_NAME)
                images_module.set_cache(cache)
                with RunStore.open(run_dir / label, write=True, create=True) as store:
                    model = OpenAIChat(ModelConfig(
                        name="m0", backend="openai", model="m0", base_url=f"{srv.url}/v1",
                        max_concurrency=concurrency, timeout_s=60.0,
                        options={"image_max_side": max_side}))
                    gate = CallGate(store, session=label)
                    cpu, t0 = time.process_time(), time.perf_counter()
                    failed = anyio.run(_drive, model, gate, calls, concurrency)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
                stats = cache.stats()
                prefix = "" if label == "run" else "resume_"
                out.update({f"{prefix}encodes": stats["encodes"],
                            f"{prefix}disk_hits": stats["disk_hits"],
                            f"{prefix}memory_hits": stats["memory_hits"],
                            f"{prefix}memory_mb": round(stats["memory_bytes"] / 2**20, 1),
                            f"{prefix}failed": failed, f"{prefix}seconds": round(wall, 3),
                            f"{prefix}cpu_ms_per_request": round(cpu / len(calls) * 1000, 3)})
        out["encodes_equal_distinct"] = out["encodes"] == images
        out["memory_budget_mb"] = round(images_module.MEMORY_BUDGET_BYTES / 2**20, 1)
        return out
    finally:
        images_module.set_cache(saved)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
