"""Images encoded once per run: content-addressed, bounded in memory, persistent on disk."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from helpers import ROOT
from PIL import Image as PILImage

from backends.images import ImageCache, encode
from mics.types import ImageRef


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> ImageRef:
    img = PILImage.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    img.save(path, format="JPEG")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ImageRef(path=str(path), sha256=digest, mime="image/jpeg", width=size[0],
                    height=size[1])


def test_same_content_at_two_paths_is_encoded_once(tmp_path: Path) -> None:
    a = _jpeg(tmp_path / "a.jpg", 1)
    shutil.copy(a.path, tmp_path / "b.jpg")
    b = ImageRef(**{**a.__dict__, "path": str(tmp_path / "b.jpg")})
    cache = ImageCache()
    assert cache.data_url(a, 32) == cache.data_url(b, 32) == encode(a.path, a.mime, 32)
    assert cache.stats()["encodes"] == 1 and cache.stats()["memory_hits"] == 1
    cache.data_url(a, 0)  # another size limit is another encoding
    assert cache.stats()["encodes"] == 2


def test_memory_stays_within_budget_and_disk_answers_evicted_images(tmp_path: Path) -> None:
    refs = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(12)]
    one = len(encode(refs[0].path, refs[0].mime, 32))
    cache = ImageCache(tmp_path / "cache", budget_bytes=3 * one)
    urls = [cache.data_url(r, 32) for r in refs]
    stats = cache.stats()
    assert stats["encodes"] == 12 and stats["memory_bytes"] <= 3 * one + one // 2
    assert stats["entries"] < 12
    again = [cache.data_url(r, 32) for r in refs]  # evicted ones come back from disk
    assert again == urls
    stats = cache.stats()
    assert stats["encodes"] == 12 and stats["disk_hits"] >= 12 - stats["entries"]


def test_a_fresh_cache_on_the_same_directory_encodes_nothing(tmp_path: Path) -> None:
    refs = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(5)]
    first = ImageCache(tmp_path / "cache")
    urls = [first.data_url(r, 16) for r in refs]
    second = ImageCache(tmp_path / "cache")  # e.g. `mics resume` in a new process
    assert [second.data_url(r, 16) for r in refs] == urls
    assert second.stats()["encodes"] == 0 and second.stats()["disk_hits"] == 5


def test_an_unwritable_directory_only_costs_encodes(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    ref = _jpeg(tmp_path / "a.jpg", 3)
    cache = ImageCache(blocker / "cache", budget_bytes=1)
    assert cache.data_url(ref) == cache.data_url(ref) == encode(ref.path, ref.mime, 0)


def test_images_bench_encodes_each_distinct_image_once(tmp_path: Path) -> None:
    from bench.images import run_images

    r = run_images(images=300, concurrency=64, passes=2, width=96, height=64, max_side=48,
                   work_dir=tmp_path)
    assert r["failed"] == 0 and r["requests"] == 600
    assert r["encodes"] == 300 and r["encodes_equal_distinct"]
    assert r["disk_hits"] + r["memory_hits"] == 300
    assert r["resume_encodes"] == 0 and r["resume_disk_hits"] == 300


def test_images_bench_command_writes_its_figures(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import orjson

    out = tmp_path / "images.json"
    proc = subprocess.run([sys.executable, "-m", "cli.app", "bench", "images", "--images", "40",
                           "--concurrency", "8", "--json", str(out)],
                          cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = orjson.loads(out.read_bytes())["images"]
    assert r["encodes"] == 40 == r["distinct_images"] and r["resume_encodes"] == 0
    assert r["requests"] == 80 and r["failed"] == 0


def test_two_runs_on_two_threads_keep_their_own_cache_folders(tmp_path: Path) -> None:
    """`use_directory` is per context: a run on another thread does not redirect this one's."""
    import threading

    from backends import images

    refs = [_jpeg(tmp_path / f"i{i}.jpg", 50 + i) for i in range(2)]
    folders = [tmp_path / "run-a" / "image-cache", tmp_path / "run-b" / "image-cache"]
    a_set, b_set = threading.Event(), threading.Event()

    def run(i: int, mine: threading.Event, other: threading.Event) -> None:
        images.use_directory(folders[i])
        mine.set()
        other.wait(5)  # the other run has set its folder too
        images.data_url(refs[i], 64)

    threads = [threading.Thread(target=run, args=(0, a_set, b_set)),
               threading.Thread(target=run, args=(1, b_set, a_set))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert [len(list(f.glob("*.url"))) for f in folders] == [1, 1]
