"""A small SYNTHETIC dataset in the Chiron / MMRP schema, for demos and tests.

Everything here is made up: the cases, ages, findings and answers are fictional teaching-style
vignettes, and the "scans" are grey Pillow drawings of ellipses and blobs. No real patient data
and no real images are involved. The output is deterministic for a given seed: two builds are
byte-identical (fixed PNG/JPEG encoder settings, no timestamps, a seeded RNG).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128


@dataclass(frozen=True)
class _Group:
    modality: str  # folder name prefix, e.g. "ct" -> "<rid>/ct_group<k>/"
    k: int
    shapes: tuple[str, ...]  # one drawing per image in this group
    ext: str  # "png" or "jpeg"
    finding: str  # caption text after "According to the <image>\n..., "


@dataclass(frozen=True)
class DemoCase:
    complaint: str
    sex: str
    question: str  # "{age}" and "{sex}" are filled in
    answer: str
    groups: tuple[_Group, ...]
    image_order: tuple[int, ...] = ()  # list the groups' images in this order (captions: by k)


DEMO_CASES: tuple[DemoCase, ...] = (
    DemoCase(
        "Cough for three weeks, no fever.",
        "male",
        "Given this {age}-year-old {sex} with a three-week cough and a single round, smoothly "
        "marginated, calcified opacity in the right upper zone, what is the most likely diagnosis?",
        "Calcified granuloma (benign, healed infection).",
        (
            _Group(
                "x-ray",
                1,
                ("nodule",),
                "png",
                "a 9 mm calcified nodule, right upper zone.<br/>No effusion or lymphadenopathy.",
            ),
        ),
    ),
    DemoCase(
        "Fall from standing height, now drowsy.",
        "female",
        "Given this {age}-year-old {sex} who became drowsy after a fall, with a crescent-shaped "
        "hyperdense extra-axial collection over the left convexity, what is the most likely "
        "diagnosis?",
        "Acute subdural haematoma.",
        (
            _Group(
                "ct",
                1,
                ("crescent", "crescent"),
                "jpeg",
                "a crescentic hyperdense collection over the left convexity, mild midline shift.",
            ),
        ),
    ),
    DemoCase(
        "Shortness of breath on exertion.",
        "male",
        "Given this {age}-year-old {sex} with exertional dyspnoea, blunting of the right "
        "costophrenic angle on the radiograph and anechoic fluid above the diaphragm on "
        "ultrasound, what is the most likely diagnosis?",
        "Right-sided pleural effusion.",
        (
            _Group(
                "x-ray",
                1,
                ("effusion",),
                "png",
                "homogeneous opacity at the right base with a meniscus sign.",
            ),
            _Group(
                "ultrasound", 2, ("cyst",), "jpeg", "anechoic fluid above the right hemidiaphragm."
            ),
        ),
    ),
    DemoCase(
        "Tiredness and pale skin for two months.",
        "female",
        "Given this {age}-year-old {sex} with two months of fatigue, pallor, a low haemoglobin "
        "and a low mean corpuscular volume, what is the most likely diagnosis?",
        "Iron deficiency anaemia.",
        (),
    ),
    DemoCase(
        "Incidental finding on an abdominal scan.",
        "male",
        "Given this {age}-year-old {sex} with an incidental, round, thin-walled, anechoic renal "
        "lesion with posterior acoustic enhancement, what is the most likely diagnosis?",
        "Simple renal cyst (Bosniak I).",
        (
            _Group(
                "ultrasound",
                1,
                ("cyst", "cyst"),
                "png",
                "a round anechoic lesion, imperceptible wall, posterior acoustic enhancement.",
            ),
        ),
    ),
    DemoCase(
        "Right lower abdominal pain since yesterday.",
        "female",
        "Given this {age}-year-old {sex} with right iliac fossa pain and a dilated, "
        "non-compressible tubular structure with surrounding fat stranding, what is the most "
        "likely diagnosis?",
        "Acute appendicitis.",
        (
            _Group(
                "ultrasound",
                1,
                ("ring",),
                "jpeg",
                "a non-compressible blind-ending tubular structure, 9 mm across.",
            ),
            _Group(
                "ct",
                2,
                ("ring", "ring"),
                "png",
                "a dilated appendix with periappendiceal fat stranding.<p>No free gas.</p>",
            ),
        ),
        image_order=(1, 0),  # "images" lists group 2 first: tags must map per group (B22)
    ),
    DemoCase(
        "Fall on an outstretched hand.",
        "female",
        "Given this {age}-year-old {sex} with wrist pain after a fall on an outstretched hand "
        "and a transverse lucent line through the distal radius with dorsal angulation, what is "
        "the most likely diagnosis?",
        "Distal radius fracture (Colles type).",
        (
            _Group(
                "x-ray",
                1,
                ("fracture", "fracture"),
                "jpeg",
                "a transverse distal radius fracture with dorsal angulation of the fragment.",
            ),
        ),
    ),
    DemoCase(
        "Recurrent upper abdominal pain after fatty meals.",
        "female",
        "Given this {age}-year-old {sex} with postprandial right upper quadrant pain and "
        "mobile echogenic foci with posterior acoustic shadowing in the gallbladder, what is "
        "the most likely diagnosis?",
        "Cholelithiasis (gallstones).",
        (
            _Group(
                "ultrasound",
                1,
                ("stones",),
                "png",
                "several mobile echogenic foci with posterior shadowing in the gallbladder lumen.",
            ),
        ),
    ),
    DemoCase(
        "Headache and fever for one week.",
        "male",
        "Given this {age}-year-old {sex} with headache and fever and a ring-enhancing lesion "
        "with a smooth thin wall and surrounding oedema, what is the most likely diagnosis?",
        "Cerebral abscess.",
        (
            _Group(
                "mri",
                1,
                ("ring",),
                "jpeg",
                "a ring-enhancing lesion with a thin smooth wall and vasogenic oedema.",
            ),
        ),
    ),
    DemoCase(
        "Sudden pleuritic chest pain while at rest.",
        "male",
        "Given this {age}-year-old tall, thin {sex} with sudden pleuritic chest pain, a visible "
        "visceral pleural line and absent lung markings peripheral to it, what is the most "
        "likely diagnosis?",
        "Primary spontaneous pneumothorax.",
        (
            _Group(
                "x-ray",
                1,
                ("pleural-line",),
                "png",
                "a visceral pleural line with no lung markings beyond it.",
            ),
            _Group(
                "ct",
                2,
                ("pleural-line", "pleural-line"),
                "jpeg",
                "a left apical pneumothorax with small apical blebs.",
            ),
        ),
    ),
    DemoCase(
        "Painless mobile breast lump.",
        "female",
        "Given this {age}-year-old {sex} with a painless mobile lump and an oval, "
        "circumscribed, isodense mass without calcification, what is the most likely diagnosis?",
        "Fibroadenoma.",
        (
            _Group(
                "mammography",
                1,
                ("nodule",),
                "png",
                "an oval circumscribed isodense mass without calcification or distortion.",
            ),
        ),
    ),
    DemoCase(
        "Knee gave way while playing football.",
        "male",
        "Given this {age}-year-old {sex} whose knee gave way during a pivoting movement, with "
        "discontinuity of a central ligament and a joint effusion, what is the most likely "
        "diagnosis?",
        "Complete anterior cruciate ligament tear.",
        (
            _Group(
                "mri",
                1,
                ("fracture",),
                "jpeg",
                "discontinuity of the anterior cruciate ligament fibres with a joint effusion.",
            ),
        ),
    ),
)


def write_demo_dataset(out_dir: str | Path, n: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` synthetic cases (``demo.jsonl`` + ``images/``) and return both paths.

    Cases cycle through the built-in vignettes; the same (n, seed) gives byte-identical files.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    image_root = out / "images"
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        record, images = _make_case(i, rng)
        for rel, data in images:
            target = image_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        lines.append(json.dumps(record, ensure_ascii=False))
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "demo.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl, image_root


def _make_case(i: int, rng: random.Random) -> tuple[dict, list[tuple[str, bytes]]]:
    case = DEMO_CASES[i % len(DEMO_CASES)]
    rid = f"synthetic-{i + 1:03d}"
    age = rng.randint(18, 85)
    paths: dict[int, list[str]] = {}
    images: list[tuple[str, bytes]] = []
    for g_index, group in enumerate(case.groups):
        paths[g_index] = []
        for n, shape in enumerate(group.shapes):
            rel = f"{rid}/{group.modality}_group{group.k}/{n}.{group.ext}"
            paths[g_index].append(rel)
            images.append((rel, _encode(_draw(shape, rng), group.ext)))
    image_order = case.image_order or tuple(range(len(case.groups)))
    record = {
        "rid": rid,
        "messages": [
            {
                "role": "user",
                "content": "**Question:** " + case.question.format(age=age, sex=case.sex),
            },
            {"role": "assistant", "content": "**Correct Answer:** " + case.answer},
        ],
        "images": [p for g in image_order for p in paths[g]],
        "title": f"Synthetic case: {case.answer}",
        "certainty": "Synthetic (fictional)",
        "presentation": case.complaint,
        "age_label": f"{age} years",
        "gender_label": case.sex.capitalize(),
        "caption": [_caption(g) for g in case.groups],
    }
    return record, images


def _caption(group: _Group) -> str:
    return "According to the " + "<image>\n" * len(group.shapes) + ", " + group.finding


def _draw(shape: str, rng: random.Random) -> Image.Image:
    """A 128x128 grey 'scan': noisy background, a body outline and one drawn finding."""
    noise = Image.frombytes("L", (SIZE, SIZE), rng.randbytes(SIZE * SIZE))
    img = Image.eval(noise, lambda v: v // 8)
    d = ImageDraw.Draw(img)
    m = rng.randint(6, 14)
    d.ellipse((m, m + 4, SIZE - m, SIZE - m - 4), fill=70, outline=140, width=3)
    cx, cy, r = rng.randint(44, 84), rng.randint(44, 84), rng.randint(7, 14)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "nodule":
        d.ellipse(box, fill=230)
    elif shape == "cyst":
        d.ellipse(box, fill=5, outline=120)
    elif shape == "ring":
        d.ellipse(box, outline=235, width=3)
    elif shape == "crescent":
        d.arc((m + 4, m + 8, SIZE - m - 4, SIZE - m - 8), 120, 240, fill=220, width=6)
    elif shape == "effusion":
        d.rectangle((m + 10, cy + 10, SIZE - m - 10, SIZE - m - 10), fill=200)
    elif shape == "fracture":
        d.rectangle((cx - 8, m + 10, cx + 8, SIZE - m - 10), fill=210)
        d.line((cx - 10, cy, cx + 10, cy + 4), fill=20, width=2)
    elif shape == "stones":
        for _ in range(3):
            x, y = rng.randint(40, 88), rng.randint(40, 88)
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=250)
    elif shape == "pleural-line":
        d.arc((cx - 40, m + 8, cx + 20, SIZE - m - 8), 270, 90, fill=200, width=2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def _encode(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=85, optimize=False, progressive=False)
    return buf.getvalue()
