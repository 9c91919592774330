"""CI never runs the Chiron-based tests without their data: `.ci/run` stops first, clearly,
when ../shared (the demo cases beside the repository) is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from helpers import ROOT


def test_ci_fails_before_testing_when_shared_is_missing(tmp_path: Path) -> None:
    repo = tmp_path / "checkout"  # a checkout with nothing beside it
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "Makefile").write_text("test:\n\t@echo TESTS RAN\n")
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "TESTS RAN" not in proc.stdout
    assert "chiron-demo/demo.jsonl is missing" in proc.stderr
    assert str(tmp_path / "shared") in proc.stderr  # where it looked

    data = tmp_path / "shared" / "data" / "chiron-demo"  # with the data beside it: tests run
    data.mkdir(parents=True)
    (data / "demo.jsonl").write_text("{}\n")
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "TESTS RAN" in proc.stdout, proc.stderr
