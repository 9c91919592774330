"""Reliability: sentinel API keys grepped from every file and output, including keys a
server echoes back in its errors (issue 7, see RELIABILITY.md)."""

from __future__ import annotations

import json
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ok

from bench.chaos import (
    MODELS,
    QuietLoopbackServer,
    Session,
    run_mics,
)
from mics.demo_data import write_demo_dataset
from store import RunStore


def _sentinel(name: str) -> str:
    return f"sk-SENTINEL-{name}-7f3a9c1e5b"


class EchoingServer:
    """A real HTTP proxy in front of a loopback server: it answers every third model call
    (POST) with a retryable 503 that echoes the Authorization header back, as a badly written
    proxy might, and forwards everything else."""

    def __init__(self, models: dict[str, Any], api_key: str) -> None:
        self.upstream = QuietLoopbackServer(models, api_key=api_key)
        self.posts = 0
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    def start(self) -> EchoingServer:
        self.upstream.start()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return None

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                self.forward(b"")

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.posts += 1
                    echo = proxy.posts % 3 == 1
                if echo:
                    sent = self.headers.get("Authorization")
                    self.reply(503, json.dumps({"error": {
                        "message": f"overloaded; you sent {sent}"}}).encode())
                else:
                    self.forward(body)

            def forward(self, body: bytes) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                resp = httpx.request(self.command, proxy.upstream.url + self.path,
                                     headers=headers, content=body, timeout=30)
                self.reply(resp.status_code, resp.content)

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def counts(self) -> dict[str, Any]:
        return self.upstream.counts()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        self.upstream.stop()


def _per_model_config(servers: dict[str, QuietLoopbackServer], tokenizer: Path | None) -> str:
    """One endpoint and one key variable per model; interns over sglang when a tokenizer."""
    lines = ["[search]", "seed = 0", "concurrency = 4", ""]
    for table, names in (("mentors", ("m0", "m1", "m2")), ("interns", ("i0", "i1", "i2")),
                         ("judge", ("judge",))):
        for name in names:
            srv = servers[name]
            sglang = table == "interns" and tokenizer is not None
            lines += ["[judge]" if table == "judge" else f"[[{table}]]", f'name = "{name}"',
                      f'backend = "{"sglang" if sglang else "openai"}"', f'model = "{name}"',
                      f'base_url = "{srv.url if sglang else srv.url + "/v1"}"',
                      f'api_key_env = "MICS_KEY_{name.upper()}"', "max_retries = 6",
                      "backoff_s = 0.01", "timeout_s = 10.0"]
            if sglang:
                lines.append(f'options = {{ tokenizer = "{tokenizer}" }}')
            lines.append("")
    return "\n".join(lines)



def _secret_search(tmp_path: Path, tokenizer: Path | None, server_cls: type,
                   echo: set[str], read_side: bool = True, n: int = 4) -> list[Session]:
    """A full search with a sentinel key per endpoint, then status and (`read_side`) every
    other read-side command."""
    data, imgs = write_demo_dataset(tmp_path / "data", n=n)
    env = {f"MICS_KEY_{m.upper()}": _sentinel(m) for m in MODELS}
    servers = {m: (server_cls if m in echo else QuietLoopbackServer)(
        {m: MODELS[m]}, api_key=_sentinel(m)) for m in MODELS}
    for srv in servers.values():
        srv.start()
    try:
        cfg = tmp_path / "secret.toml"
        cfg.write_text(_per_model_config(servers, tokenizer))
        run, out = tmp_path / "R", tmp_path / "O"
        sessions = [run_mics(["search", data, "--image-root", imgs, "--config", cfg,
                              "--run", run], env=env)]
        assert sessions[0].rc == 0, sessions[0].stderr
        assert all(srv.counts()["by_status"].get(401, 0) == 0 for srv in servers.values())
        qid = "synthetic-001"
        commands: list[list[str | Path]] = [
            ["status", run], ["inspect", run, "--json"], ["inspect", run, qid, "--json"],
            ["export", run, "--out", out, "--format", "all"],
            ["viz", run, "--all", "--out", tmp_path / "viz"], ["doctor", cfg]]
        for args in commands if read_side else commands[:1]:
            sessions.append(ok(cli(args, env)))
    finally:
        for srv in servers.values():
            srv.stop()
    return sessions


def cli(args: list[str | Path], env: dict[str, str]) -> Session:
    """A read-side command in-process (no interpreter start-up); output and any traceback."""
    from typer.testing import CliRunner

    from cli.app import app

    argv, start = [str(a) for a in args], time.time()
    result = CliRunner().invoke(app, argv, env=env)
    exc = result.exception
    trace = "".join(traceback.format_exception(exc)) if exc and not isinstance(
        exc, SystemExit) else ""
    return Session(argv[0], argv, start, time.time(), result.exit_code, stdout=result.output,
                   stderr=trace)


def _assert_no_sentinel(tmp_path: Path, sessions: list[Session]) -> None:
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "data.mdb" for p in files)
    for m in MODELS:
        key = _sentinel(m).encode()
        leaks = [str(p) for p in files if key in p.read_bytes()]
        assert leaks == [], f"key of {m} found in {leaks}"
        for s in sessions:
            assert key.decode() not in s.stdout + s.stderr, f"key of {m} printed by {s.args}"


def test_secrets_never_reach_store_exports_or_output(tmp_path: Path,
                                                     tokenizer_dir: Path) -> None:
    """Sentinel keys (one per endpoint, from the environment only): grep every file under the
    run, export and viz directories, and the output of search, status, inspect (tables and
    --json), export, viz and doctor."""
    sessions = _secret_search(tmp_path, tokenizer_dir, QuietLoopbackServer, echo=set())
    assert len(list((tmp_path / "viz").glob("*.html"))) > 1
    assert (tmp_path / "O" / "sft.jsonl").is_file()
    cfg_text = (tmp_path / "secret.toml").read_text()
    assert "SENTINEL" not in cfg_text  # keys come from the environment only
    with RunStore.open(tmp_path / "R", write=False) as store:
        stored = json.dumps(store.get_meta("config"))
    assert "MICS_KEY_M0" in stored  # the variable's name is kept, never its value
    summary = json.loads(sessions[2].stdout)
    assert summary["totals"]["calls"] > 0
    _assert_no_sentinel(tmp_path, sessions)


@pytest.mark.parametrize("echo", [
    pytest.param({"m0", "i0", "judge"}, id="openai"),
    pytest.param({"i1"}, id="sglang"),
])
def test_a_key_echoed_by_the_server_is_redacted(request: pytest.FixtureRequest, tmp_path: Path,
                                                echo: set[str]) -> None:
    """A server that echoes the key in a retryable error: the key still reaches nothing."""
    sglang = "i1" in echo  # interns over sglang (needs a tokenizer), else all openai
    tokenizer = request.getfixturevalue("tokenizer_dir") if sglang else None
    sessions = _secret_search(tmp_path, tokenizer, EchoingServer, echo=echo, read_side=False,
                              n=2)
    with RunStore.open(tmp_path / "R", write=False) as store:
        errors = [e for c in store.iter_calls() for e in c["errors"]]
    assert any("you sent" in e for e in errors)  # the echoing errors were recorded
    _assert_no_sentinel(tmp_path, sessions)
