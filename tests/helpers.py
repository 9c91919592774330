"""Shared test helpers imported as a normal module (`from helpers import ...`; tests/ is on
sys.path through pytest's `pythonpath`): paths, config and question builders, small readers.
Fixtures live in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from mics.config import ModelConfig
from mics.types import Question

if TYPE_CHECKING:
    from bench.chaos import Session

ROOT = Path(__file__).resolve().parents[1]  # the repository (tests/ is one level down)
CHIRON = ROOT.parent / "shared" / "data" / "chiron-demo"  # the demo cases, beside the repo
EXAMPLE = ROOT / "examples" / "simulated.toml"


def sim_config(**search: Any) -> dict[str, Any]:
    """A simulated config as a mapping (3 mentors, 3 interns, judge)."""
    return {
        "search": {"seed": 0, **search},
        "mentors": [
            {"name": f"m{i}", "backend": "simulated", "model": f"m{i}",
             "options": {"quality": q}}
            for i, q in enumerate((0.6, 0.45, 0.35))
        ],
        "interns": [
            {"name": f"i{i}", "backend": "simulated", "model": f"i{i}", "options": {"skill": s}}
            for i, s in enumerate((0.95, 0.85, 0.75))
        ],
        "judge": {"name": "judge", "backend": "simulated", "model": "judge"},
    }


def make_questions(n: int = 6) -> list[Question]:
    """`n` text-only questions q0, q1, ... (answers cycle through six diagnoses)."""
    answers = ["Pneumothorax", "Aortic dissection", "Pacemaker lead fracture",
               "Sudden cardiac death", "Renal cell carcinoma", "Appendicitis"]
    return [
        Question(qid=f"q{i}", index=i, question=f"What is the diagnosis in case {i}?",
                 gt_answer=answers[i % len(answers)], images=(), image_paths=(),
                 case_info=f"Chief complaint: pain {i}\nAge: 40 years\nGender: Male\n"
                           "Image analysis:\nCaptions: None")
        for i in range(n)
    ]


def local_rollout(path: Path, **options: Any):  # noqa: ANN201 - LocalRollout, imported lazily
    """The local backend on a model folder (no weights load until the first rollout)."""
    from backends.local import LocalRollout

    return LocalRollout(ModelConfig(name="tiny", backend="local", model=str(path),
                                    options=options))



def ok(session: Session) -> Session:
    """The session, after asserting that its `mics` command exited 0 (stderr shown if not)."""
    assert session.rc == 0, f"mics {session.args} exited {session.rc}:\n{session.stderr[-3000:]}"
    return session


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (blank lines skipped)."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


# A `mics` command run in a fresh interpreter that reports, on its last line, which heavy
# modules it imported (the lean paths must import neither torch nor transformers).
_IMPORTS_SCRIPT = """
import json, sys
from cli.app import main
sys.argv = ["mics", *{args!r}]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("MICS-IMPORTS", json.dumps({{"heavy": heavy, "code": code,
                                  "jinja": "jinja2" in sys.modules}}))
"""


@dataclass(frozen=True)
class Imports:
    """What one `mics` command imported: its torch/transformers modules, its exit code and
    whether jinja2 was loaded."""

    heavy: list[str]
    code: int | str | None
    jinja: bool


def command_imports(*args: object, timeout: float = 300) -> Imports:
    """Run `mics ARGS` in a fresh interpreter (from the repository) and report its imports."""
    script = _IMPORTS_SCRIPT.format(args=[str(a) for a in args])
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("MICS-IMPORTS "), \
        proc.stdout[-2000:] + proc.stderr[-2000:]
    report = Imports(**json.loads(lines[-1].removeprefix("MICS-IMPORTS ")))
    assert report.code == 0, f"mics {args} exited {report.code}:\n{proc.stderr[-3000:]}"
    return report
