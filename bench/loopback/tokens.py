"""The loopback server's token and prefix-cache model: deterministic, lossless tokens (images
as runs of IMAGE_TOKENS tokens naming the image's hash) and a longest-common-prefix cache.

Text without images is tokenized once per distinct string (a small LRU memo: a prompt is sent
once per sample and temperature, a reply's tokens are counted several times), and so are a
prompt's prefix hashes (`prompt_chain`); results are those of the plain computation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

_TOKEN_RE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
PLACEHOLDER_RE = re.compile(
    r"<\|vision_start\|><\|image_pad\|><\|vision_end\|>|<image>|<\|image_pad\|>|<IMG_CONTEXT>")
IMAGE_TOKENS = 8  # tokens per image in the token stream


def image_hash(ref: str) -> str:
    """Short hash of the image bytes a data URL, bare base64 or absolute path carries."""
    data: bytes
    if ref.startswith("data:"):
        payload = ref.split(",", 1)[1] if "," in ref else ""
        data = _b64(payload) or ref.encode()
    elif ref.startswith(("file://", "/")):
        p = Path(ref.removeprefix("file://"))
        data = p.read_bytes() if p.is_file() else ref.encode()
    else:
        data = _b64(ref) or ref.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _b64(payload: str) -> bytes | None:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


def tokenize(text: str, images: Sequence[str] = ()) -> list[str]:
    """Deterministic, lossless tokens: each word with its leading whitespace, each punctuation mark
    with its leading whitespace, trailing whitespace. The k-th image placeholder (`<image>`,
    `<|image_pad|>` or Qwen's vision_start/pad/end triple) becomes IMAGE_TOKENS tokens naming the
    k-th image's hash; images without a placeholder are put first. `"".join(tokenize(t)) == t`.
    """
    if not images:
        return list(_text_tokens(text))
    return _tokenize(text, images)


@lru_cache(maxsize=512)
def _text_tokens(text: str) -> tuple[str, ...]:
    return tuple(_tokenize(text, ()))


def _tokenize(text: str, images: Sequence[str]) -> list[str]:
    hashes = [image_hash(i) for i in images]
    pieces = PLACEHOLDER_RE.split(text)
    spots = PLACEHOLDER_RE.findall(text)
    extra, hashes = hashes[len(spots):], hashes[: len(spots)]
    out = [f"<img:{h}:{k}>" for h in extra for k in range(IMAGE_TOKENS)]
    for i, piece in enumerate(pieces):
        out += _TOKEN_RE.findall(piece)
        if i < len(spots):
            if i < len(hashes):
                out += [f"<img:{hashes[i]}:{k}>" for k in range(IMAGE_TOKENS)]
            else:
                out += _TOKEN_RE.findall(spots[i])
    return out


def chain(tokens: Iterable[str], h: int = 0) -> list[int]:
    """The prefix hashes a PrefixCache keeps for `tokens`, continuing from prefix hash `h`."""
    out = []
    for tok in tokens:
        h = hash((h, tok))
        out.append(h)
    return out


def prompt_chain(text: str, images: Sequence[str] = ()) -> tuple[int, ...]:
    """`chain(tokenize(text, images))`; its length is the prompt's token count."""
    if not images:
        return _text_chain(text)
    return tuple(chain(_tokenize(text, images)))


@lru_cache(maxsize=512)
def _text_chain(text: str) -> tuple[int, ...]:
    return tuple(chain(_text_tokens(text)))


class PrefixCache:
    """Every prefix of every inserted sequence, kept as chained hashes (a trie without nodes).

    `match` is the longest common prefix with anything inserted, capped at len - 1 like SGLang
    (one prompt token is always recomputed). `match_chain` and `insert_chain` do the same from
    a prompt's precomputed prefix hashes (`prompt_chain`).
    """

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def match(self, tokens: Sequence[str]) -> int:
        h, n = 0, 0
        for tok in tokens[: max(0, len(tokens) - 1)]:
            h = hash((h, tok))
            if h not in self._seen:
                break
            n += 1
        return n

    def insert(self, tokens: Sequence[str]) -> None:
        h = 0
        for tok in tokens:
            h = hash((h, tok))
            self._seen.add(h)

    def match_chain(self, hashes: Sequence[int]) -> int:
        """`match` of the tokens whose prefix hashes are `hashes`, by bisection: the cache holds
        every prefix of what it holds, so the prefixes found form a run from the start."""
        seen = self._seen
        return bisect_left(range(max(0, len(hashes) - 1)), True,
                           key=lambda i: hashes[i] not in seen)

    def insert_chain(self, hashes: Sequence[int], more: Sequence[str], known: int = 0) -> None:
        """`insert` of the tokens whose prefix hashes are `hashes`, followed by tokens `more`;
        the first `known` prefixes are already in the cache (a match just found them)."""
        seen = self._seen
        seen.update(hashes[known:])
        h = hashes[-1] if hashes else 0
        add = seen.add
        for tok in more:
            h = hash((h, tok))
            add(h)

    def clear(self) -> None:
        self._seen.clear()

