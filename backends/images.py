"""Images for the wire: base64 data URLs with the MIME type of the decoded format (B21).

Each image is encoded once per run: encodings are content-addressed (the image's sha256, its MIME
type and the size limit), kept in a byte-bounded in-memory LRU, and, once a run directory is set
(`use_directory`, done by `search_run`), written beside the run store so that a resume or a
second pass over more images than memory holds reads them back instead of encoding again.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import threading
from collections import OrderedDict
from contextvars import ContextVar
from pathlib import Path

from PIL import Image as PILImage

from mics.types import ImageRef

_SAVE_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP",
                 "image/gif": "PNG", "image/bmp": "PNG", "image/tiff": "PNG"}
MEMORY_BUDGET_BYTES = 64 * 2**20  # data URLs kept in memory, in characters (= bytes: ASCII)
CACHE_DIR_NAME = "image-cache"  # inside a run directory


def encode(path: str, mime: str, max_side: int) -> str:
    """The image file as a data URL, downscaled so its longest side is <= max_side."""
    with PILImage.open(path) as img:
        if max_side <= 0 or max(img.size) <= max_side:
            if mime in ("image/jpeg", "image/png", "image/webp"):
                with open(path, "rb") as f:
                    data = f.read()
                return f"data:{mime};base64,{base64.b64encode(data).decode()}"
            scaled = img.copy()
        else:
            scaled = img.copy()
            scaled.thumbnail((max_side, max_side), PILImage.Resampling.LANCZOS)
        fmt = _SAVE_FORMATS.get(mime, "PNG")
        if fmt == "JPEG" and scaled.mode not in ("RGB", "L"):
            scaled = scaled.convert("RGB")
        buf = io.BytesIO()
        scaled.save(buf, format=fmt)
        out_mime = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[fmt]
        return f"data:{out_mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


class ImageCache:
    """Content-addressed data URLs: memory LRU (bounded in bytes) over an optional directory."""

    def __init__(self, directory: Path | None = None,
                 budget_bytes: int = MEMORY_BUDGET_BYTES) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.encodes = self.disk_hits = self.memory_hits = 0
        self._memory: OrderedDict[tuple[str, str, int], str] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def data_url(self, image: ImageRef, max_side: int = 0,
                 directory: Path | None = None) -> str:
        """The image's data URL; persisted under `directory` (default: this cache's own)."""
        directory = directory if directory is not None else self.directory
        key = (image.sha256, image.mime, max_side)
        with self._lock:
            url = self._memory.get(key)
            if url is not None:
                self._memory.move_to_end(key)
                self.memory_hits += 1
                return url
        url = self._read(key, directory)
        if url is None:
            url = encode(image.path, image.mime, max_side)
            with self._lock:
                self.encodes += 1
            self._write(key, url, directory)
        else:
            with self._lock:
                self.disk_hits += 1
        self._remember(key, url)
        return url

    def stats(self) -> dict[str, int]:
        """encodes, disk_hits, memory_hits, entries and bytes held in memory."""
        with self._lock:
            return {"encodes": self.encodes, "disk_hits": self.disk_hits,
                    "memory_hits": self.memory_hits, "entries": len(self._memory),
                    "memory_bytes": self._bytes}

    @staticmethod
    def _file(key: tuple[str, str, int], directory: Path | None) -> Path | None:
        if directory is None:
            return None
        sha, mime, side = key
        return directory / f"{sha}-{mime.replace('/', '_')}-{side}.url"

    def _read(self, key: tuple[str, str, int], directory: Path | None) -> str | None:
        path = self._file(key, directory)
        if path is None:
            return None
        try:
            return path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return None

    def _write(self, key: tuple[str, str, int], url: str, directory: Path | None) -> None:
        path = self._file(key, directory)
        if path is None:
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:  # a cache: failing to persist costs a later encode, never the run
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(url, encoding="ascii")
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _remember(self, key: tuple[str, str, int], url: str) -> None:
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = url
            self._bytes += len(url)
            while self._bytes > self.budget_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._bytes -= len(old)


_cache = ImageCache()
_directory: ContextVar[Path | None] = ContextVar("mics_image_cache_directory", default=None)


def use_directory(directory: Path | None) -> None:
    """Persist encodings under `directory` (None: memory only) from now on in this context:
    the calling task and the tasks it starts afterwards (a search run and its calls), so two
    runs in one process (two threads, two event loops) each keep their own folder. The
    in-memory cache is shared: it is keyed by content."""
    _directory.set(Path(directory) if directory is not None else None)


def cache() -> ImageCache:
    """The process-wide cache `data_url` uses (for its counters)."""
    return _cache


def set_cache(new: ImageCache) -> ImageCache:
    """Make `new` the process-wide cache (a benchmark's fresh one); returns the one before."""
    global _cache
    old, _cache = _cache, new
    return old


def data_url(image: ImageRef, max_side: int = 0) -> str:
    """The image as a data URL, downscaled so its longest side is <= max_side (0: unchanged)."""
    return _cache.data_url(image, max_side, _directory.get())
