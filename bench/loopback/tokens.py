"""The loopback server's token and prefix-cache model: deterministic, lossless tokens (images
as runs of IMAGE_TOKENS tokens naming the image's hash) and a longest-common-prefix cache.

Text without images is tokenized once per distinct string (a small memo: a prompt is sent once
per sample and temperature, a reply's tokens are counted several times), from the remembered
text it shares the longest prefix with; a prompt's prefix hashes (`prompt_chain`) likewise.
Results are those of the plain computation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
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
        return list(_RECENT.get(text).tokens)
    return _tokenize(text, images)


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
    return [h := hash((h, tok)) for tok in tokens]


def prompt_chain(text: str, images: Sequence[str] = ()) -> tuple[int, ...]:
    """`chain(tokenize(text, images))`; its length is the prompt's token count."""
    if not images:
        return _RECENT.get(text).prefix_hashes()
    return tuple(chain(_tokenize(text, images)))


class _Text:
    """A remembered text's tokens and, once asked for, where each ends and its prefix hashes."""

    __slots__ = ("_ends", "base", "hashes", "shared", "tokens")

    def __init__(self, tokens: tuple[str, ...], base: _Text | None = None, shared: int = 0
                 ) -> None:
        self.tokens = tokens
        self._ends: list[int] | None = None
        self.hashes: tuple[int, ...] | None = None
        self.base, self.shared = base, shared  # tokens[:shared] are base's first tokens

    @property
    def ends(self) -> list[int]:
        if self._ends is None:
            self._ends = list(accumulate(map(len, self.tokens)))
        return self._ends

    def prefix_hashes(self) -> tuple[int, ...]:
        if self.hashes is None:
            base, k = self.base, self.shared
            if base is not None and base.hashes is not None and k:  # base's chain, then ours
                self.hashes = base.hashes[:k] + tuple(chain(self.tokens[k:], base.hashes[k - 1]))
            else:
                self.hashes = tuple(chain(self.tokens))
            self.base = None
        return self.hashes


class _Recent:
    """Tokens (and prefix hashes) of the last `size` distinct texts tokenized without images.

    Prompts grow from earlier prompts, so a new text without placeholders starts from the
    remembered one sharing the longest prefix with it (a neighbour in sorted order): it keeps
    that text's tokens that end before the two texts differ (the token pattern looks one
    character past a token, no further back than its start) and tokenizes only the rest.
    The result is `_tokenize(text, ())` exactly."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.texts: dict[str, _Text] = {}  # least recently used first
        self.sorted: list[str] = []  # the remembered texts without placeholders
        self._lock = threading.Lock()  # several servers (threads) in one process share it

    def get(self, text: str) -> _Text:
        with self._lock:
            got = self.texts.pop(text, None)
            if got is None:
                got = self._tokenize(text)
                if len(self.texts) >= self.size:
                    old = next(iter(self.texts))
                    del self.texts[old]
                    i = bisect_left(self.sorted, old)
                    if i < len(self.sorted) and self.sorted[i] == old:
                        del self.sorted[i]
            self.texts[text] = got
            return got

    def _tokenize(self, text: str) -> _Text:
        if "<image>" in text or "<|image_pad|>" in text or "<IMG_CONTEXT>" in text:
            return _Text(tuple(_tokenize(text, ())))  # a placeholder (PLACEHOLDER_RE) is in it
        srt = self.sorted
        i = bisect_left(srt, text)
        best, near = 0, None
        for j in (i - 1, i):
            if 0 <= j < len(srt):
                n = _common_prefix(text, srt[j])
                if n > best:
                    best, near = n, self.texts[srt[j]]
        srt.insert(i, text)
        if near is None or best < 16:
            return _Text(tuple(_TOKEN_RE.findall(text)))
        ends = near.ends
        k = bisect_left(ends, best)  # near's tokens ending before the texts differ
        start = ends[k - 1] if k else 0
        new = _TOKEN_RE.findall(text, start)
        # keeps no chain of texts alive: a base only when there are hashes to share
        got = _Text(near.tokens[:k] + tuple(new), near if near.hashes is not None else None, k)
        got._ends = ends[:k] + list(accumulate(map(len, new), initial=start))[1:]
        return got


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


_RECENT = _Recent()


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
        n, seen = len(hashes) - 1, self._seen
        if n <= 0:
            return 0
        if hashes[n - 1] in seen:  # all of it (a prompt sent again: one sample per call)
            return n
        return bisect_left(range(n), True, key=lambda i: hashes[i] not in seen)

    def insert_chain(self, hashes: Sequence[int], more: Sequence[str], known: int = 0) -> None:
        """`insert` of the tokens whose prefix hashes are `hashes`, followed by tokens `more`;
        the first `known` prefixes are already in the cache (a match just found them)."""
        self._seen.update(hashes[known:])
        if more:
            self._seen.update(chain(more, hashes[-1] if hashes else 0))

    def clear(self) -> None:
        self._seen.clear()

