"""Reliability: every command on a damaged store exits 2 with one clear line (issue 7)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest
from helpers import EXAMPLE

from mics.config import load_config
from mics.demo_data import write_demo_dataset
from mics.run import search_run, start_run
from store import RunStore


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small finished simulated run (searched in-process)."""
    work = tmp_path_factory.mktemp("finished")
    data, images = write_demo_dataset(work / "data", n=3)
    start_run(work / "run", load_config(EXAMPLE), data, images, None)
    anyio.run(lambda: search_run(work / "run"))
    return work / "run"


def _damage(run: Path, how: str) -> str:
    """Damage a copy of a run; returns what the error message must say."""
    data = run / "store" / "data.mdb"
    if how == "truncated":
        os.truncate(data, data.stat().st_size // 2)
        return "truncated"
    if how == "not-lmdb":
        with data.open("r+b") as f:
            f.write(b"\x00garbage" * 1000)
        return "corrupt"
    if how == "corrupt-record":  # every copy of every question record (LMDB has no checksums)
        raw = data.read_bytes()
        assert raw.count(b'{"status":"') > 0
        data.write_bytes(raw.replace(b'{"status":"', b"\xff" * 11))
        return "corrupt record"
    with RunStore.open(run) as store:
        store.put_meta("schema_version", 99)
    return "newer mics"


@pytest.mark.parametrize("command", ["status", "export", "inspect", "resume"])
@pytest.mark.parametrize("how", ["truncated", "not-lmdb", "corrupt-record", "newer-schema"])
def test_damaged_store_gives_a_clear_error(request: pytest.FixtureRequest, tmp_path: Path,
                                           finished_run: Path, how: str, command: str) -> None:
    """Every command on a damaged store: exit 2 and one clear line, never a traceback."""
    from typer.testing import CliRunner

    from cli.app import app

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    expected = _damage(run, how)
    args = {"status": ["status", run], "export": ["export", run, "--out", tmp_path / "O"],
            "inspect": ["inspect", run, "--json"], "resume": ["resume", run]}[command]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    if how == "corrupt-record" and command == "resume":
        # A resume of a finished run reads none of its finished records (resume point, kept
        # counts), so it finishes; the commands that read them report the damage.
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, ["status", str(run)])
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())
