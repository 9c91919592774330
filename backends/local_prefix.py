"""Prefix KV reuse for the `local` backend: the bounded LRU of prefix caches (its `match` returns
a typed `PrefixMatch`, as SGLang's `BasePrefixCache.match_prefix` returns a `MatchResult`) and
the token trie a batch's prompts are prefilled along. Worker threads only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

MIN_SHARED = 32  # tokens a trie level or a separate forward pass must save to be worth it
_CHUNK_FILL = 0.9  # an item shares a forward pass with items at most ~1/0.9 times its length
_CHUNK_SLACK = 8  # ... or at most this many tokens longer

KV = list[tuple[Any, Any]]  # per layer: (keys, values), each [1, kv_heads, length, head_dim]


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    return len(os.path.commonprefix([a, b]))  # type: ignore[type-var]


class PrefixMatch(NamedTuple):
    """The longest cached prefix of a key: its length in tokens (0: none) and its per-layer KV,
    cropped to that length (None when nothing matched)."""

    length: int
    kv: KV | None


class PrefixLRU:
    """A bounded LRU of prefix KV caches: token key -> per-layer KV of exactly that prefix.

    `match` returns the longest common prefix with any entry and that entry's KV cropped to it.
    `put` keeps only maximal keys: an entry that is a prefix of another is redundant.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.evictions = 0
        self._entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[tuple[int, ...]]:
        """The stored keys, least recently used first."""
        return list(self._entries)

    def match(self, key: tuple[int, ...]) -> PrefixMatch:
        """The longest common prefix of `key` with any entry (that entry becomes the newest)."""
        best, best_key = 0, None
        for k in self._entries:
            n = _lcp(k, key)
            if n > best:
                best, best_key = n, k
        if best_key is None:
            return PrefixMatch(0, None)
        self._entries.move_to_end(best_key)
        kv = self._entries[best_key]
        if best < len(best_key):  # crop: a view of the first `best` positions
            kv = [(k[:, :, :best], v[:, :, :best]) for k, v in kv]
        return PrefixMatch(best, kv)

    def put(self, key: tuple[int, ...], kv: KV) -> None:
        """Store `kv` for `key` unless a longer entry covers it; evict the oldest past `size`."""
        if self.size <= 0 or not key:
            return
        for k in list(self._entries):
            if len(k) >= len(key) and k[: len(key)] == key:
                self._entries.move_to_end(k)  # already covered by a longer entry
                return
            if key[: len(k)] == k:
                del self._entries[k]
        self._entries[key] = [(k.contiguous(), v.contiguous()) for k, v in kv]
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()


@dataclass
class Node:
    """A trie node: the first `length` tokens shared by the contexts `rows`."""

    length: int
    rows: list[int]
    children: list[Node]
    kv: KV | None = None
    cached: int = 0  # tokens of this prefix served from the LRU


def plan_trie(keys: Sequence[tuple[int, ...]], idx: list[int], start: int = 0,
              root: bool = True) -> list[Node]:
    """The compacted token trie of the distinct contexts `keys[idx]` below position `start`.

    A shared node that would save fewer than `MIN_SHARED` tokens is left out (its rows hang
    from its parent), since every trie level costs a forward pass.
    """
    if len(idx) == 1:
        length = len(keys[idx[0]])
    else:
        length = len(os.path.commonprefix([keys[i] for i in idx]))  # type: ignore[type-var]
    buckets: dict[int, list[int]] = {}
    for i in idx:
        if len(keys[i]) > length:
            buckets.setdefault(keys[i][length], []).append(i)
    children = [n for b in buckets.values() for n in plan_trie(keys, b, length, root=False)]
    if not root and len(idx) > 1 and (len(idx) - 1) * (length - start) < MIN_SHARED:
        ends = [i for i in idx if len(keys[i]) == length]  # at most one: keys are distinct
        return children + [Node(length, ends, [])] if ends else children
    return [Node(length, idx, children)]


def walk_trie(node: Node) -> list[Node]:
    """The node and all its descendants, depth first."""
    return [node, *(n for child in node.children for n in walk_trie(child))]


def true_runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def size_chunks(items: list[Any], size: Callable[[Any], int]) -> list[list[Any]]:
    """Items grouped by similar size (longest first), one forward pass per group, so that right
    padding wastes little: an item joins the current group while it is at least
    `_CHUNK_FILL` as long as the group's longest (or at most `_CHUNK_SLACK` shorter)."""
    groups: list[list[Any]] = []
    top = 0
    for item in sorted(items, key=size, reverse=True):
        if groups and (size(item) >= _CHUNK_FILL * top or top - size(item) <= _CHUNK_SLACK):
            groups[-1].append(item)
        else:
            groups.append([item])
            top = size(item)
    return groups


def image_marker(sha256: str) -> int:
    """The key of an image's tokens: negative, so never a real token id."""
    return -1 - int(sha256[:15], 16)


