"""The import-linter contracts in pyproject.toml: kept by the code, and able to fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGES = ("mics", "backends", "store", "cli", "bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the packages under `root` (they shadow the installed ones)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_tree(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def inject(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    head, sep, rest = text.partition("from __future__ import annotations\n")
    assert sep, f"{path} has no __future__ import to inject after"
    path.write_text(head + sep + line + "\n" + rest, encoding="utf-8")


def reports(out: str, source: str, target: str) -> bool:
    """Whether lint-imports named the import `source -> target` as breaking a contract."""
    return re.search(rf"^-\s+{re.escape(source)} -> {re.escape(target)} \(l\.\d+\)", out,
                     re.MULTILINE) is not None


def test_the_code_keeps_its_layers() -> None:
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_the_copy_is_linted_not_the_installed_tree(tmp_path: Path) -> None:
    """The control for the tests below: an untouched copy passes too."""
    proc = lint_imports(copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_core_module_importing_the_store_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    inject(root / "mics" / "policy.py", "import store  # noqa: F401")
    proc = lint_imports(root)
    assert proc.returncode != 0
    assert reports(proc.stdout, "mics.policy", "store"), proc.stdout


def test_a_backend_importing_the_engine_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    inject(root / "backends" / "exact.py", "from mics import engine  # noqa: F401")
    proc = lint_imports(root)
    assert proc.returncode != 0
    assert reports(proc.stdout, "backends.exact", "mics.engine"), proc.stdout


def test_the_core_importing_an_io_library_fails(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    inject(root / "mics" / "steps.py", "import anyio  # noqa: F401")
    proc = lint_imports(root)
    assert proc.returncode != 0
    assert reports(proc.stdout, "mics.steps", "anyio"), proc.stdout
