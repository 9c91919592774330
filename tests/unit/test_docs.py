"""The documentation in docs/ stays true to the repository: every B-number is there, every test
it cites exists, and no code points at files that are not in the repository."""

from __future__ import annotations

import ast
import re

from helpers import ROOT

ALGORITHM = ROOT / "docs" / "algorithm.md"
CITED = re.compile(r"`(test_\w+\.py)::(test_\w+)`")


def test_every_reference_bug_has_a_paragraph() -> None:
    text = ALGORITHM.read_text(encoding="utf-8")
    found = [int(n) for n in re.findall(r"^\*\*B(\d+)\.\*\*", text, re.MULTILINE)]
    assert found == list(range(1, 25))


def test_every_cited_test_exists() -> None:
    cited = CITED.findall(ALGORITHM.read_text(encoding="utf-8"))
    assert len(cited) > 30
    missing = []
    files = {p.name: p for p in (ROOT / "tests").rglob("test_*.py")}  # unit/, integration/, ...
    for file, name in cited:
        path = files.get(file)
        tree = ast.parse(path.read_text(encoding="utf-8")) if path else None
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)} if tree else ()
        if name not in names:
            missing.append(f"{file}::{name}")
    assert missing == []


def test_the_readme_points_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/algorithm.md" in readme and "docs/architecture.md" in readme
    assert "documented in the docstrings" not in readme


def test_no_code_cites_a_spec_that_is_not_in_the_repository() -> None:
    bad = re.compile(r"spec/\w+\.md|\bspec \d|feasibility §")
    hits = [f"{p.relative_to(ROOT)}:{i}" for d in ("mics", "backends", "store", "cli", "bench")
            for p in (ROOT / d).rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if bad.search(line)]
    assert hits == []
