"""Read Chiron / MMRP-style datasets into validated Questions (docs/algorithm.md: input).

Every record becomes either a :class:`Question` or a :class:`RecordError`; a bad record never
stops the reading of the others. Differences from the reference loader:

- every image must exist and decode (B12: nothing is dropped silently);
- the MIME type comes from the decoded format, never the file extension (B21);
- ``<image>`` tags in captions are numbered per caption group when the ``_group<k>`` folders
  line up with the captions, otherwise by a global counter, and without a double space (B22).

The loader is synchronous and has no dependency on the async engine.
"""

from __future__ import annotations

import codecs
import hashlib
import html
import io
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mics.config import ID_FIELDS
from mics.types import ImageRef, Question, RecordError

MAX_PIXELS = 64_000_000  # width * height above this is rejected before any pixel is decoded
MAX_IMAGE_BYTES = 256 * 1024 * 1024
NA = "N/A"

_MIME_OVERRIDES = {"MPO": "image/jpeg"}  # multi-picture JPEGs from cameras are plain JPEGs

_BR = re.compile(r"<\s*br\s*/?\s*>", re.IGNORECASE)
_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:p|div|li|ul|ol|tr)\b[^<>]*>", re.IGNORECASE)
_INLINE_TAG = re.compile(
    r"<\s*/?\s*(?:b|i|u|em|strong|span|sub|sup|font|a|td|table|tbody)\b[^<>]*>", re.IGNORECASE
)
_IMAGE_TAG = re.compile(r"<image>", re.IGNORECASE)
_IMAGE_RUN = re.compile(r"(?:<image>\s*)+(?:(,)[ \t]*)?", re.IGNORECASE)
_GROUP = re.compile(r"(?:^|/)([^/]+_group(\d+))(?:/|$)")
_NO_SPACE_BEFORE = ".,;:)]!?"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # undecodable bytes under surrogateescape


MAX_RID_BYTES = 200  # store keys are rid + node id, and LMDB keys stop at 511 bytes


class BadField(Exception):
    """One problem with one field of a record."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _TooLarge(Exception):
    """The image header claims more than MAX_PIXELS pixels."""


# ---------------------------------------------------------------- public API


@dataclass
class Cursor:
    """A place in a JSONL dataset: the byte offset of the next line, its 1-based line number and
    the index of the next record. `read_dataset` starts there and moves it past each record
    before yielding it (``tracked`` is False for a JSON list, which has no such places)."""

    offset: int = 0
    line: int = 1
    index: int = 0
    tracked: bool = True


def read_dataset(
    path: str | Path, image_root: str | Path | None = None,
    skip_images: Callable[[str], bool] | None = None, cursor: Cursor | None = None,
    fmt: str = "chiron",
) -> Iterator[Question | RecordError]:
    """Yield one Question or RecordError per record of a JSONL or JSON-list file, lazily.

    Image paths are resolved against ``image_root`` (default: the dataset file's directory)
    and must stay inside it. ``index`` counts every non-blank line / list item, valid or not.
    A record whose rid ``skip_images`` accepts (a finished question on resume) is yielded
    without opening its images: ``images`` is empty, ``image_paths`` as written. With
    ``cursor`` a JSONL file is read from (and the cursor kept at) a place (see Cursor).
    ``fmt`` picks the record schema: "chiron" (this module) or "generic" (mics.dataset_generic).
    """
    adapter = _adapter(fmt)
    path = Path(path)
    root = Path(image_root if image_root is not None else path.parent).resolve()
    cursor = cursor if cursor is not None else Cursor()
    seen: dict[str, int] = {}
    for index, (line, item) in enumerate(_iter_raw(path, cursor), start=cursor.index):
        if cursor.tracked:
            cursor.index = index + 1
        if isinstance(item, BadField):
            yield RecordError(f"line-{line}", index, line, item.field, item.message, adapter[2])
            continue
        try:
            yield _convert(item, index, line, root, seen, adapter, skip_images)
        except Exception as e:  # noqa: BLE001 - a last net: one bad record never ends a run
            yield RecordError(f"line-{line}", index, line, "record",
                              f"unreadable record: {type(e).__name__}: {str(e)[:200]}",
                              adapter[2])


def clean_captions(captions: Sequence[str], image_paths: Sequence[str]) -> tuple[str, ...]:
    """Strip HTML remnants and rewrite ``<image>`` tags as ``image 1, image 2`` (B22).

    Numbers are 1-based positions in ``image_paths``. Tags are mapped per ``_group<k>`` folder
    when the groups line up with the captions (all captions, or the captions that carry tags),
    and tag counts equal group sizes; otherwise a global counter runs across captions.
    """
    numbers = _tag_numbers([_IMAGE_TAG.findall(c) for c in captions], image_paths)
    return tuple(_clean_caption(c, nums) for c, nums in zip(captions, numbers, strict=True))


def format_case_info(presentation: str, age: str, gender: str, captions: Sequence[str]) -> str:
    """Build the reference case-info string (docs/algorithm.md: input), no trailing newline."""
    lines = [f"Chief complaint: {presentation}", f"Age: {age}", f"Gender: {gender}"]
    if captions:
        lines.append("Image analysis:")
        lines += [f"Modality {i}: {c}" for i, c in enumerate(captions, start=1)]
    else:
        lines.append("Captions: None")
    return "\n".join(lines)


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """Return (mime, width, height) of image bytes, or raise ValueError saying why not.

    The size is checked against MAX_PIXELS from the header before any pixel is decoded;
    the file is then verified and fully decoded to catch truncation.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fmt, width, height = _decode(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    except _TooLarge as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # Pillow plugins raise many types on corrupt data
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from None
    mime = _MIME_OVERRIDES.get(fmt) or Image.MIME.get(fmt) or f"image/{fmt.lower()}"
    return mime, width, height


# ---------------------------------------------------------------- raw records


def _iter_raw(path: Path, cursor: Cursor) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object or BadField) for each record of the file."""
    if _first_char(path) == b"[":
        if cursor.offset or cursor.index:
            raise ValueError("a JSON-list dataset is read from its start")
        cursor.tracked = False
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path, cursor)


def _first_char(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(3)
        if head != codecs.BOM_UTF8:
            f.seek(0)
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _iter_jsonl(path: Path, cursor: Cursor) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        f.seek(cursor.offset)
        offset = cursor.offset
        for lineno, raw in enumerate(f, start=cursor.line):
            offset += len(raw)
            cursor.offset, cursor.line = offset, lineno + 1
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            yield lineno, _parse_line(raw)


def _parse_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadField("line", f"not valid UTF-8 (bad byte {raw[e.start]:#04x} at byte {e.start})")
    # without its newline: an error at the end of a truncated line is on this line, at the
    # column just past its last character (not "line 2, column 1")
    text = text.rstrip("\r\n")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadField("json", _json_error(e, text))
    except (RecursionError, ValueError) as e:  # absurd nesting, an integer over the digit limit
        return BadField("json", f"unreadable JSON: {type(e).__name__}: {str(e)[:200]}")


def _json_error(e: json.JSONDecodeError, text: str) -> str:
    """``invalid JSON: <what> at column N``, and where a truncated line breaks off."""
    at = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"
    end = len(text.rstrip())
    if e.msg.startswith("Unterminated") or e.pos >= end:
        at += f"; the line breaks off at column {end + 1} (truncated?)"
    return f"invalid JSON: {at}"


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """Parse a top-level JSON list item by item, keeping each item's starting line.

    Undecodable bytes inside one item's strings spoil only that item; a syntax error stops
    the reading (the rest of a broken JSON document cannot be trusted) with one RecordError.
    """
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = _skip_ws(text, text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        yield from _trailing(text, pos + 1, lines)
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}"
            yield e.lineno, BadField("json", f"invalid JSON: {e.msg} ({where})")
            return
        except (RecursionError, ValueError) as e:
            yield lines.at(pos), BadField("json", f"unreadable JSON: {type(e).__name__}: "
                                              f"{str(e)[:200]}")
            return
        yield lines.at(pos), _bad_bytes(text[pos:end]) or obj
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            yield from _trailing(text, pos + 1, lines)
            return
        yield lines.at(pos), BadField("json", "invalid JSON: expected ',' or ']' after list item")
        return


def _trailing(text: str, pos: int, lines: _LineCounter) -> Iterator[tuple[int, Any]]:
    pos = _skip_ws(text, pos)
    if pos < len(text):
        yield lines.at(pos), BadField("json", "invalid JSON: extra data after the closing ']'")


def _bad_bytes(chunk: str) -> BadField | None:
    m = _ESCAPED_BYTE.search(chunk)
    if m is None:
        return None
    return BadField("line", f"not valid UTF-8 (bad byte {ord(m.group(0)) - 0xDC00:#04x})")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _LineCounter:
    """1-based line number of a position, for positions visited in increasing order."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


# ---------------------------------------------------------------- record -> Question


def _adapter(fmt: str) -> tuple[Callable[..., str], Callable[..., Question], str]:
    """(record id reader, record builder, id field name) of a dataset format."""
    if fmt == "chiron":
        return _rid, _build, ID_FIELDS[fmt]
    if fmt == "generic":
        from mics.dataset_generic import build_generic, generic_id  # it imports this module

        return generic_id, build_generic, ID_FIELDS[fmt]
    raise ValueError(f"unknown dataset format {fmt!r}; expected chiron or generic")


def _convert(
    obj: Any, index: int, line: int, root: Path, seen: dict[str, int],
    adapter: tuple[Callable[..., str], Callable[..., Question], str] | None = None,
    skip_images: Callable[[str], bool] | None = None,
) -> Question | RecordError:
    read_id, build, id_field = adapter or _adapter("chiron")
    qid = f"line-{line}"
    try:
        if not isinstance(obj, dict):
            raise BadField("record", f"expected a JSON object, got {json_kind(obj)}")
        qid = read_id(obj)
        if qid in seen:
            raise BadField(id_field,
                           f"duplicate {id_field} {qid!r}; first seen on line {seen[qid]}")
        seen[qid] = line
        return build(obj, qid, index, root, skip_images is None or not skip_images(qid))
    except BadField as e:
        return RecordError(qid, index, line, e.field, e.message, id_field)


def storable(text: str, field: str) -> bytes:
    """Text as UTF-8; a lone surrogate (unpaired \\ud800-\\udfff escape) cannot be stored."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadField(field, "contains an unpaired surrogate escape (not valid Unicode)") from None


def _build(obj: dict[str, Any], qid: str, index: int, root: Path,
           load_images: bool = True) -> Question:
    question = _message(obj, 0, "**Question:**", " ")
    answer = _message(obj, 1, "**Correct Answer:**", "")
    entries = image_entries(obj)
    scalars = [_scalar(obj, k) for k in ("presentation", "age_label", "gender_label")]
    raw_captions = _raw_captions(obj)
    checks = [(question, "messages[0].content"), (answer, "messages[1].content"),
              *((e, f"images[{i}]") for i, e in enumerate(entries)),
              *zip(scalars, ("presentation", "age_label", "gender_label"), strict=True),
              *((c, f"caption[{i}]") for i, c in enumerate(raw_captions))]
    for text, field in checks:
        storable(text, field)
    images = tuple(load_image(e, i, root) for i, e in enumerate(entries)) if load_images else ()
    captions = clean_captions(raw_captions, entries)
    return Question(
        qid=qid,
        index=index,
        question=question,
        gt_answer=answer,
        images=images,
        image_paths=tuple(entries),
        case_info=format_case_info(*scalars, captions),
        captions=captions,
    )


def _rid(obj: dict[str, Any]) -> str:
    if "rid" not in obj:
        raise BadField("rid", "missing rid")
    rid = obj["rid"]
    if isinstance(rid, int) and not isinstance(rid, bool):
        return str(rid)
    if not isinstance(rid, str):
        raise BadField("rid", f"rid must be a string or integer, got {json_kind(rid)}")
    if not rid.strip():
        raise BadField("rid", "rid is empty")
    if "\x00" in rid or len(storable(rid, "rid")) > MAX_RID_BYTES:
        raise BadField("rid", f"rid must be at most {MAX_RID_BYTES} UTF-8 bytes without NUL")
    return rid


def _message(obj: dict[str, Any], i: int, marker: str, replacement: str) -> str:
    if "messages" not in obj:
        raise BadField("messages", "missing field messages (the list of question and answer "
                       "turns)")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise BadField("messages", f"messages must be a list, got {json_kind(messages)}")
    if len(messages) <= i:
        raise BadField("messages",
                       f"messages needs 2 turns (question, answer), got {len(messages)}")
    turn = messages[i]
    if not isinstance(turn, dict):
        raise BadField(f"messages[{i}]", f"expected an object, got {json_kind(turn)}")
    content = turn.get("content")
    field = f"messages[{i}].content"
    if not isinstance(content, str):
        raise BadField(field, f"content must be a string, got {json_kind(content)}")
    text = content.replace(marker, replacement).strip()
    if not text:
        raise BadField(field, "empty question" if i == 0 else "empty answer")
    return text


def image_entries(obj: dict[str, Any]) -> list[str]:
    """The record's `images` list (BadField unless a list of strings)."""
    images = obj.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        raise BadField("images", f"images must be a list of paths, got {json_kind(images)}")
    for i, entry in enumerate(images):
        if not isinstance(entry, str) or not entry.strip():
            raise BadField(f"images[{i}]", f"expected a non-empty path string, got {entry!r}")
    return images


def _scalar(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return NA
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise BadField(key, f"{key} must be a string, got {json_kind(value)}")
    return value.strip() or NA


def _raw_captions(obj: dict[str, Any]) -> list[str]:
    captions = obj.get("caption")
    if captions is None:
        return []
    if not isinstance(captions, list):
        raise BadField("caption", f"caption must be a list of strings, got {json_kind(captions)}")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise BadField(f"caption[{i}]", f"caption must be a string, got {json_kind(c)}")
    return captions


def json_kind(value: Any) -> str:
    """A value's JSON-ish type name for error messages ("null", "str", "list", ...)."""
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------- images


def load_image(entry: str, i: int, root: Path) -> ImageRef:
    """Image entry `i`, resolved against `root`, as an ImageRef (BadField `images[i]`)."""
    field = f"images[{i}]"
    path = _resolve(entry, root, field)
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise BadField(field, f"image {entry!r} is too big ({size} bytes)")
        data = path.read_bytes()
    except OSError as e:
        raise BadField(field, f"cannot read image {entry!r}: {e}") from None
    if not data:
        raise BadField(field, f"image {entry!r} is an empty file ({path})")
    try:
        mime, width, height = inspect_image(data)
    except ValueError as e:
        raise BadField(field, f"image {entry!r} ({path}): {e}") from None
    return ImageRef(str(path), hashlib.sha256(data).hexdigest(), mime, width, height)


def _resolve(entry: str, root: Path, field: str) -> Path:
    try:
        candidate = Path(entry)
        if not candidate.is_absolute():
            candidate = root / candidate
        path = candidate.resolve()
        if not path.is_relative_to(root):
            raise BadField(field, f"image path {entry[:200]!r} escapes the image root {root}")
        if not path.exists():
            raise BadField(field, f"image {entry[:200]!r} not found (looked for {path})")
        if not path.is_file():
            raise BadField(field, f"image {entry[:200]!r} is not a regular file ({path})")
    except (OSError, ValueError) as e:  # NUL bytes, names too long, ...
        raise BadField(field, f"invalid image path {entry[:200]!r}: {e}") from None
    return path


def _decode(data: bytes) -> tuple[str, int, int]:
    with Image.open(io.BytesIO(data)) as im:
        fmt, (width, height) = im.format or "", im.size
        if width * height > MAX_PIXELS:
            raise _TooLarge(
                f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), "
                f"over the {MAX_PIXELS / 1e6:.0f}-megapixel limit"
            )
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    return fmt, width, height


# ---------------------------------------------------------------- captions


def _tag_numbers(tags: list[list[str]], image_paths: Sequence[str]) -> list[list[int]]:
    """1-based image numbers for each caption's tags, in order (see clean_captions)."""
    counts = [len(t) for t in tags]
    groups = image_groups(image_paths)
    if groups is not None:
        everyone = list(range(len(counts)))
        tagged = [i for i, c in enumerate(counts) if c]
        for selection in (everyone, tagged):
            if len(selection) == len(groups) and all(
                counts[i] == len(g) for i, g in zip(selection, groups, strict=True)
            ):
                numbers: list[list[int]] = [[] for _ in counts]
                for i, g in zip(selection, groups, strict=True):
                    numbers[i] = g
                return numbers
    numbers, start = [], 1
    for c in counts:
        numbers.append(list(range(start, start + c)))
        start += c
    return numbers


def image_groups(image_paths: Sequence[str]) -> list[list[int]] | None:
    """Image numbers per ``<modality>_group<k>`` folder, ordered by k; None if any lacks one."""
    keys: list[tuple[int, str]] = []
    for p in image_paths:
        m = _GROUP.search(p.replace("\\", "/"))
        if m is None:
            return None
        keys.append((int(m.group(2)), m.group(1)))
    order = sorted(dict.fromkeys(keys), key=lambda k: k[0])
    return [[n for n, k in enumerate(keys, start=1) if k == g] for g in order]


def _clean_caption(caption: str, numbers: list[int]) -> str:
    text = caption.replace("\r\n", "\n").replace("\r", "\n")
    text = _BR.sub("\n", text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _INLINE_TAG.sub("", text)
    text = _IMAGE_RUN.sub(_Numberer(numbers), text)
    text = html.unescape(text).replace("\xa0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


class _Numberer:
    """re.sub callback: a run of ``<image>`` tags -> ``image 3, image 4`` (+ comma, one space)."""

    def __init__(self, numbers: list[int]) -> None:
        self.numbers = iter(numbers)
        self.extra = max(numbers, default=0)  # tags formed only by HTML removal count on

    def _next(self) -> int:
        number = next(self.numbers, None)
        if number is None:
            self.extra += 1
            number = self.extra
        return number

    def __call__(self, m: re.Match[str]) -> str:
        count = len(_IMAGE_TAG.findall(m.group(0)))
        labels = ", ".join(f"image {self._next()}" for _ in range(count))
        if m.group(1):
            labels += ","
        following = m.string[m.end() : m.end() + 1]
        if not following or following in _NO_SPACE_BEFORE or following.isspace():
            return labels
        return labels + " "
