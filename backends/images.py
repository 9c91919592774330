"""Images for the wire: base64 data URLs with the MIME type of the decoded format (B21)."""

from __future__ import annotations

import base64
import io
from functools import lru_cache

from PIL import Image as PILImage

from mics.types import ImageRef

_SAVE_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP",
                 "image/gif": "PNG", "image/bmp": "PNG", "image/tiff": "PNG"}


@lru_cache(maxsize=256)
def _encode(path: str, sha256: str, mime: str, max_side: int) -> str:
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


def data_url(image: ImageRef, max_side: int = 0) -> str:
    """The image as a data URL, downscaled so its longest side is <= max_side (0: unchanged)."""
    return _encode(image.path, image.sha256, image.mime, max_side)
