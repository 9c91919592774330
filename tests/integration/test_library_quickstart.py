"""examples/library_quickstart.py runs as a plain script, and what it builds is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

import mics

SCRIPT = ROOT / "examples" / "library_quickstart.py"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_quickstart_builds_a_training_set_of_full_score_chains(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    with mics.open_run(tmp_path / "run") as run:
        full = {o.qid: o for o in run.outcomes("full_score")}
        assert counts["questions"] == run.summary().questions == 8
    assert 0 < len(full) < 8  # the filter really filters
    train = jsonl(tmp_path / "train.jsonl")
    assert counts["train"] == len(train) == len(full)
    for rec in train:
        outcome = full[rec["id"]]
        assert rec["chain"] == outcome.reasoning
        assert rec["generated_by"] == outcome.generated_by
    sft = jsonl(tmp_path / "export" / "sft.jsonl")
    reference = jsonl(tmp_path / "export" / "results.jsonl")
    assert [r["id"] for r in sft] == [r["id"] for r in train] == [r["rid"] for r in reference]
