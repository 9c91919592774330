"""The bundled math/chart example: a synthetic dataset drawn with Pillow, in the generic schema,
searched with the math pack by SIMULATED models, through the CLI and in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import orjson
import pytest
from helpers import ROOT
from PIL import Image

from backends.gate import CallGate
from backends.simulated import SimulatedModel
from mics.chart_data import write_chart_dataset
from mics.config import load_config
from mics.dataset import read_dataset
from mics.engine import Engine, Models
from mics.types import Question
from store import RunStore

EXAMPLE = ROOT / "examples" / "math.toml"


class Recording(SimulatedModel):
    """A simulated model that keeps every call it receives (a real backend, not a patch)."""

    def __init__(self, config, role):
        super().__init__(config, role)
        self.calls: list = []

    async def complete(self, call):
        self.calls.append(call)
        return await super().complete(call)

    async def rollout(self, calls):
        self.calls.extend(calls)
        return await super().rollout(calls)


@pytest.fixture(scope="module")
def charts(tmp_path_factory) -> tuple[Path, Path]:
    return write_chart_dataset(tmp_path_factory.mktemp("charts"), n=10)


def test_dataset_is_deterministic_and_reads_cleanly(charts, tmp_path):
    jsonl, images = charts
    again, again_images = write_chart_dataset(tmp_path / "again", n=10)
    assert again.read_bytes() == jsonl.read_bytes()
    assert {p.name: p.read_bytes() for p in again_images.iterdir()} == \
        {p.name: p.read_bytes() for p in images.iterdir()}
    items = list(read_dataset(jsonl, images, fmt="generic"))
    assert len(items) == 10 and all(isinstance(q, Question) for q in items)
    with_images = [q for q in items if q.images]
    assert 0 < len(with_images) < len(items)  # charts plus text-only word problems
    for q in with_images:
        with Image.open(q.images[0].path) as im:
            assert im.size == (240, 180) and len(im.getcolors(1 << 16) or ()) > 3  # drawn
    words = [q for q in items if not q.images]
    for q in words:  # the answer is computed from the numbers in the question
        boxes, per_box, eaten = (int(w) for w in q.question.split() if w.isdigit())
        assert q.gt_answer == str(boxes * per_box - eaten)


def test_example_config_searches_the_charts_through_the_cli(charts, tmp_path):
    jsonl, images = charts

    def mics(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.app", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "COLUMNS": "200"})

    run = tmp_path / "run"
    proc = mics("search", jsonl, "--image-root", images, "--config", EXAMPLE, "--run", run)
    assert proc.returncode == 0, proc.stderr
    with RunStore.open(run, write=False) as store:
        statuses = [s for _q, s, _r in store.question_statuses()]
        assert len(statuses) == 10 and "succeeded" in statuses
        assert set(statuses) <= {"succeeded", "failed"}
        assert store.get_meta("config")["prompts"]["pack"] == "math"
    out = tmp_path / "out"
    assert mics("export", run, "--out", out).returncode == 0
    results = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert results and all(r["reasoning"].startswith("Let's think") for r in results)
    answers = {r["rid"]: r["gt_answer"] for r in results}
    assert all(f"### The final answer is: {answers[r['rid']]}" in r["reasoning"]
               for r in results)


def test_math_pack_prompts_reach_the_models(charts, tmp_path):
    """In process: what each role was sent comes from the math pack, interns see no context."""
    jsonl, images = charts
    cfg = load_config(EXAMPLE)
    questions = [q for q in read_dataset(jsonl, images, fmt="generic")][:5]
    models = Models(mentors=[Recording(m, "mentor") for m in cfg.mentors],
                    interns=[Recording(i, "intern") for i in cfg.interns],
                    judge=Recording(cfg.judge, "judge"))
    with RunStore.open(tmp_path / "r", write=True, create=True) as store:
        gate = CallGate(store, session="t")
        anyio.run(lambda: Engine(cfg, store, models, gate).run(questions))
    sent = {"mentor": [c for m in models.mentors for c in m.calls],
            "intern": [c for m in models.interns for c in m.calls], "judge": models.judge.calls}
    assert all(sent.values())
    by_qid = {q.qid: q for q in questions}
    for call in sent["mentor"]:
        assert call.prompt.system == cfg.prompts.system("mentor")
        assert "Additional information:\n" in call.prompt.user_text()
    for call in sent["intern"]:
        text = call.prompt.user_text()
        assert call.prompt.system == cfg.prompts.system("intern")
        assert "Give exact values" in text and "Additional information" not in text
        assert not any(q.case_info in text for q in by_qid.values() if q.images)
    for call in sent["judge"]:
        assert "mathematically equivalent" in call.prompt.user_text()
