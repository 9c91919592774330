"""A small SYNTHETIC math and chart-reading dataset in the generic schema (docs/datasets.md).

Bar charts are drawn with Pillow at run time from a seeded RNG; each record asks one question
about its chart (read a value, compare, add, subtract), and every few records is a text-only
arithmetic word problem. The answers are computed from the drawn values, so they are right by
construction. Pair it with the "math" prompt pack (examples/math.toml). Deterministic: the same
(n, seed) gives byte-identical files with the same Pillow version.

    python -m mics.chart_data OUT_DIR [--n 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 240, 180
_TOPICS = (
    ("books read by five students in one month", "Ana Ben Cai Dev Eli", "books"),
    ("apples sold at a market stall on each weekday", "Mon Tue Wed Thu Fri", "apples"),
    ("goals scored by four teams in a season", "Reds Blues Greens Golds", "goals"),
    ("rainy days in each of the first four months", "Jan Feb Mar Apr", "days"),
)
_KINDS = ("value", "max", "sum", "difference", "words")


def write_chart_dataset(out_dir: str | Path, n: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` records (``charts.jsonl`` + ``images/``) and return both paths."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    image_root = out / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        record, png = _make_record(i, rng)
        if png is not None:
            (image_root / record["images"][0]).write_bytes(png)
        lines.append(json.dumps(record, ensure_ascii=False))
    jsonl = out / "charts.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl, image_root


def _make_record(i: int, rng: random.Random) -> tuple[dict[str, Any], bytes | None]:
    rid = f"chart-{i + 1:03d}"
    kind = _KINDS[i % len(_KINDS)]
    if kind == "words":
        return _word_problem(rid, rng), None
    topic, names, unit = _TOPICS[i % len(_TOPICS)]
    labels = names.split()
    values = _distinct_values(rng, len(labels))
    a, b = rng.sample(range(len(labels)), 2)
    if kind == "value":
        question = f"According to the bar chart, how many {unit} does {labels[a]} have?"
        answer = str(values[a])
    elif kind == "max":
        question = "According to the bar chart, which bar is the tallest?"
        answer = labels[values.index(max(values))]
    elif kind == "sum":
        question = (f"According to the bar chart, what is the total number of {unit} of "
                    f"{labels[a]} and {labels[b]} together?")
        answer = str(values[a] + values[b])
    else:
        question = (f"According to the bar chart, how many more {unit} does the tallest bar "
                    f"show than the shortest bar?")
        answer = str(max(values) - min(values))
    record = {"id": rid, "question": question, "answer": answer, "images": [f"{rid}.png"],
              "context": f"The bar chart shows the {topic}. Every bar starts at 0; the grid "
                         "lines are 2 units apart."}
    return record, _encode(_draw_chart(labels, values, rng))


def _distinct_values(rng: random.Random, k: int) -> list[int]:
    return rng.sample(range(1, 15), k)  # distinct, so "tallest" has one answer


def _word_problem(rid: str, rng: random.Random) -> dict[str, Any]:
    boxes, per_box, eaten = rng.randint(3, 9), rng.randint(4, 12), rng.randint(1, 9)
    question = (f"A baker fills {boxes} boxes with {per_box} muffins each, then {eaten} muffins "
                "are eaten. How many muffins are left?")
    return {"id": rid, "question": question, "answer": boxes * per_box - eaten,
            "meta": {"kind": "word problem, no image"}}


def _draw_chart(labels: list[str], values: list[int], rng: random.Random) -> Image.Image:
    """A white bar chart with a y axis from 0 to 16, grid lines every 2 units, labelled bars."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 28, WIDTH - 8, 10, HEIGHT - 22
    scale = (bottom - top) / 16
    for tick in range(0, 17, 2):
        y = round(bottom - tick * scale)
        d.line((left, y, right, y), fill=(220, 220, 220))
        d.text((4, y - 6), f"{tick:>2}", fill="black", font=font)
    d.line((left, top, left, bottom), fill="black")
    d.line((left, bottom, right, bottom), fill="black")
    slot = (right - left) / len(labels)
    color = tuple(rng.randint(40, 180) for _ in range(3))
    for k, (label, value) in enumerate(zip(labels, values, strict=True)):
        x0 = round(left + k * slot + slot * 0.2)
        x1 = round(left + (k + 1) * slot - slot * 0.2)
        d.rectangle((x0, round(bottom - value * scale), x1, bottom), fill=color)
        d.text((x0, bottom + 4), label, fill="black", font=font)
    return img


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Command line: write the dataset and print where it went."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    jsonl, images = write_chart_dataset(args.out_dir, args.n, args.seed)
    print(f"wrote {jsonl} (images under {images})")


if __name__ == "__main__":
    main()
