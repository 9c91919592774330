"""Interns behind the real `sglang-router` (Rust binary, runs on CPU) in front of loopback SGLang
workers: mode detection, one request per rollout, cache-aware placement, exports identical to a
single-server run, a worker killed mid-run, and `mics doctor` naming the workers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import httpx
import pytest
from helpers import ROOT, make_questions

from backends.registry import build_rollout
from backends.sglang_router import Router, parse_workers, split_batch
from bench.loopback import LoopbackServer
from mics.config import ConfigError, ModelConfig, load_config
from mics.dataset import read_dataset
from mics.doctor import doctor
from mics.prompts import intern_prompt
from store import RunStore

CHAT_MODELS = {"m0": {"role": "mentor", "quality": 0.6}, "m1": {"role": "mentor", "quality": 0.45},
               "judge": "judge"}
INTERNS = {"i0": {"role": "intern", "skill": 0.9}, "i1": {"role": "intern", "skill": 0.8}}
WORKERS = {"i0": 3, "i1": 2}  # loopback SGLang workers behind each intern's router


@pytest.fixture(scope="module")
def router_bin() -> list[str]:
    """The command that launches the real router; skips (saying why) when it is missing."""
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        pytest.skip("the sglang-router package is not installed (pip install -e '.[router]'); "
                    "the router tests need its Rust binary")
    return [sys.executable, "-m", "sglang_router.launch_router"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sglang_router(cmd: list[str], workers: Sequence[str], log: Path) -> Iterator[str]:
    """`launch_router --policy cache_aware` in front of `workers`; yields its URL once
    /readiness reports every worker healthy. Health checks every second, one failure drops a
    worker, so a killed worker leaves the rotation quickly."""
    port = free_port()
    args = [*cmd, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
            "--policy", "cache_aware", "--prometheus-port", str(free_port()),
            "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
            "--log-level", "warn"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sglang-router exited ({proc.returncode}): {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                ready = httpx.get(f"{url}/readiness", timeout=2)
                if ready.status_code == 200 and ready.json().get("healthy_workers") == len(
                        workers):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"sglang-router not ready after 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def router_workers(url: str) -> list[dict]:
    workers = parse_workers(httpx.get(f"{url}/workers", timeout=5).json())
    assert workers is not None
    return workers


def generate_bodies(srv: LoopbackServer) -> list[dict]:
    return [b for path, b in srv.bodies if path == "/generate"]


# ---------------------------------------------------------------- no router needed


def test_mode_is_validated(tokenizer_dir):
    cfg = ModelConfig(name="i0", backend="sglang", model="i0", base_url="http://127.0.0.1:9",
                      options={"tokenizer": str(tokenizer_dir), "mode": "cluster"})
    with pytest.raises(ConfigError, match="options.mode must be one of auto, server, router"):
        build_rollout(cfg)


def test_split_batch_gives_one_string_prompt_per_request():
    body = {"text": ["a", "b"], "sampling_params": [{"temperature": 1.2}, {"temperature": 0.2}],
            "image_data": [["data:x"], ["data:x"]]}
    assert split_batch(body) == [
        {"text": "a", "sampling_params": {"temperature": 1.2}, "image_data": ["data:x"]},
        {"text": "b", "sampling_params": {"temperature": 0.2}, "image_data": ["data:x"]}]
    assert split_batch({"text": ["a"], "sampling_params": [{}]}) == [
        {"text": "a", "sampling_params": {}}]


def test_a_plain_server_is_not_taken_for_a_router(tokenizer_dir):
    with LoopbackServer({"i0": "intern"}, keep_bodies=True) as srv:
        url = srv.url_for("i0")
        model = build_rollout(ModelConfig(name="i0", backend="sglang", model="i0", base_url=url,
                                          options={"tokenizer": str(tokenizer_dir)}))
        calls = _calls(make_questions(1)[0])
        anyio.run(model.rollout, calls)
        bodies = generate_bodies(srv)
    assert model.routers == {url: None}
    assert isinstance(bodies[-1]["text"], list) and len(bodies[-1]["text"]) == len(calls)
    assert model.requests_for(calls) == 1  # what the gate charges to requests_per_minute


def test_a_router_whose_model_info_is_not_an_object_fails_cleanly(tokenizer_dir):
    """A 200 from /get_model_info that is not a JSON object is a BackendError naming the
    router (retried like any malformed reply), never an AttributeError that ends the run."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from backends.base import TransientError

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            body = {"/health": b"{}", "/get_model_info": json.dumps([1, 2]).encode()}.get(
                self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    model = build_rollout(ModelConfig(name="i0", backend="sglang", model="i0", base_url=url,
                                      options={"tokenizer": str(tokenizer_dir),
                                               "mode": "router"}))

    async def check() -> None:
        try:
            await model.check(url)
        finally:
            await model.aclose()

    try:
        with pytest.raises(TransientError, match="get_model_info is not a JSON object"):
            anyio.run(check)
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the real router


def _calls(q, prefixes=("Let's think.\n\n### Step 1: Look.", "Let's think.\n\n### Step 1: X.")):
    from backends.base import Call
    from mics.types import Sampling

    return [Call(intern_prompt(q, p), Sampling(temperature=t, top_p=0.9, top_k=20,
                                               max_tokens=64))
            for p in prefixes for t in (1.2, 0.2)]


def test_rollouts_through_the_router_match_a_single_server(router_bin, tokenizer_dir, tmp_path):
    questions = make_questions(4)
    workers = [LoopbackServer({"i0": INTERNS["i0"]}, keep_bodies=True).start() for _ in range(2)]
    try:
        with LoopbackServer({"i0": INTERNS["i0"]}) as single, sglang_router(
                router_bin, [w.url for w in workers], tmp_path / "router.log") as url:
            results, charged = {}, {}
            for where, mode in ((url, "auto"), (single.url, "server")):
                model = build_rollout(ModelConfig(
                    name="i0", backend="sglang", model="i0", base_url=where,
                    options={"tokenizer": str(tokenizer_dir), "mode": mode}))

                async def run_all(model=model):
                    out = []
                    for q in questions:
                        out.append(await model.rollout(_calls(q)))
                    await model.aclose()
                    return out

                results[mode] = anyio.run(run_all)
                charged[mode] = model.requests_for(_calls(questions[0]))
                if mode == "auto":
                    router = model.routers[url]
        assert isinstance(router, Router)
        assert charged == {"auto": 4, "server": 1}  # requests_per_minute: one per request sent
        assert sorted(w["url"] for w in router.workers) == sorted(w.url for w in workers)
        assert [[r.text for r in rs] for rs in results["auto"]] == [
            [r.text for r in rs] for rs in results["server"]]
        assert all(r.usage.prompt_tokens > 0 for rs in results["auto"] for r in rs)
        bodies = [(k, b) for k, w in enumerate(workers) for b in generate_bodies(w)]
        assert all(isinstance(b["text"], str) for _, b in bodies)  # one prompt per request
        for q in questions:  # warm-ups and rollouts of one question: one worker
            assert len({k for k, b in bodies if q.question in b["text"]}) == 1
    finally:
        for w in workers:
            w.stop()


@pytest.mark.parametrize("version, placeholder", [("0.5.9", "<image>"),
                                                  ("0.5.6", "<IMG_CONTEXT>")])
def test_internvl_behind_a_router_takes_the_placeholder_of_its_workers_version(
        router_bin, tokenizer_dir, tmp_path, version, placeholder):
    """The router reports no SGLang version, and InternVL's image placeholder depends on it:
    it is read from the workers the router lists, so no options.image_placeholder is needed
    (before, every rollout failed: 'the placeholder ... is not known yet')."""
    import hashlib
    from dataclasses import replace

    from PIL import Image as PILImage

    from mics.types import ImageRef

    img = tmp_path / "scan.png"
    PILImage.new("RGB", (32, 24), (10, 200, 30)).save(img)
    ref = ImageRef(str(img), hashlib.sha256(img.read_bytes()).hexdigest(), "image/png", 32, 24)
    q = replace(make_questions(1)[0], images=(ref,))
    spec = {"i0": {"role": "intern", "skill": 0.9, "target": "sglang", "version": version,
                   "family": "internvl", "model_path": "/models/InternVL3-8B"}}
    workers = [LoopbackServer(spec, keep_bodies=True).start() for _ in range(2)]
    try:
        with sglang_router(router_bin, [w.url for w in workers], tmp_path / "r.log") as url:
            model = build_rollout(ModelConfig(
                name="i0", backend="sglang", model="OpenGVLab/InternVL3-8B", base_url=url,
                options={"tokenizer": str(tokenizer_dir), "family": "internvl"}))

            async def go():
                try:
                    return await model.rollout(_calls(q))
                finally:
                    await model.aclose()

            replies = anyio.run(go)
        texts = [b["text"] for w in workers for b in generate_bodies(w)]
    finally:
        for w in workers:
            w.stop()
    assert all(not isinstance(r, Exception) for r in replies), replies
    assert texts and all(t.count(placeholder) == 1 for t in texts)


# ---------------------------------------------------------------- whole searches


def search_config(chat: LoopbackServer, tok: Path, intern_urls: dict[str, str]) -> str:
    """2 openai mentors and an openai judge on `chat`, 2 sglang interns at `intern_urls`."""
    lines = ["[search]", "seed = 0", "concurrency = 4", ""]
    for name in ("m0", "m1"):
        lines += ["[[mentors]]", f'name = "{name}"', 'backend = "openai"', f'model = "{name}"',
                  f'base_url = "{chat.url}/v1"', "max_retries = 6", "backoff_s = 0.01", ""]
    for name, url in intern_urls.items():
        # retries outlast the router's health check dropping a killed worker (about a second)
        lines += ["[[interns]]", f'name = "{name}"', 'backend = "sglang"', f'model = "{name}"',
                  f'base_url = "{url}"', "max_retries = 8", "backoff_s = 0.2",
                  "max_backoff_s = 2.0", "timeout_s = 10.0",
                  f'options = {{ tokenizer = "{tok}" }}', ""]
    lines += ["[judge]", 'name = "judge"', 'backend = "openai"', 'model = "judge"',
              f'base_url = "{chat.url}/v1"', "max_retries = 6", "backoff_s = 0.01"]
    return "\n".join(lines) + "\n"


def mics(*args: object, wait: bool = True):
    env = {**os.environ, "COLUMNS": "250"}
    cmd = [sys.executable, "-m", "cli.app", *map(str, args)]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=600)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def search_args(chiron: Path, cfg: Path, run: Path) -> list[object]:
    return ["search", chiron / "demo.jsonl", "--image-root", chiron / "images", "--config", cfg,
            "--run", run]


def exports(run: Path) -> tuple[bytes, bytes]:
    out = run.parent / f"{run.name}-export"
    proc = mics("export", run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return (out / "results.jsonl").read_bytes(), (out / "failed.jsonl").read_bytes()


@pytest.fixture(scope="module")
def single_server_run(tmp_path_factory, tokenizer_dir) -> dict:
    """The reference: the same search with each intern on one SGLang server (batched)."""
    from helpers import CHIRON

    if not (CHIRON / "demo.jsonl").is_file():
        pytest.fail("../shared/data/chiron-demo is missing: CI always has it beside the checkout")
    tmp = tmp_path_factory.mktemp("single")
    with LoopbackServer({**CHAT_MODELS, **INTERNS}) as srv:
        cfg = tmp / "single.toml"
        cfg.write_text(search_config(srv, tokenizer_dir, {n: srv.url_for(n) for n in INTERNS}))
        proc = mics(*search_args(CHIRON, cfg, tmp / "R"))
        assert proc.returncode == 0, proc.stderr
        items = sum(1 for e in srv.log if e.path == "/generate" and e.model in INTERNS)
    results, failed = exports(tmp / "R")
    assert results.count(b"\n") >= 5  # enough questions succeed for the comparison to matter
    return {"results": results, "failed": failed, "intern_items": items}


@contextlib.contextmanager
def routed_interns(cmd: list[str], tmp: Path) -> Iterator[tuple[dict, dict]]:
    """Each intern behind its own router with WORKERS[name] loopback workers (request bodies
    kept, so the test reads where each question's rollouts went)."""
    workers = {n: [LoopbackServer({n: INTERNS[n]}, keep_bodies=True).start()
                   for _ in range(k)] for n, k in WORKERS.items()}
    try:
        with contextlib.ExitStack() as stack:
            urls = {n: stack.enter_context(sglang_router(cmd, [w.url for w in ws],
                                                         tmp / f"router-{n}.log"))
                    for n, ws in workers.items()}
            yield urls, workers
    finally:
        for ws in workers.values():
            for w in ws:
                w.stop()


def questions_by_worker(workers: list[LoopbackServer], questions: list[str]) -> dict[str, set]:
    """question -> the workers (by index) whose own logs show any of its /generate requests."""
    seen: dict[str, set] = {q: set() for q in questions}
    for k, w in enumerate(workers):
        for body in generate_bodies(w):
            assert isinstance(body["text"], str)  # the router took one prompt per request
            for q in questions:
                if q in body["text"]:
                    seen[q].add(k)
    return seen


def demo_questions(chiron: Path) -> list[str]:
    return [q.question for q in read_dataset(chiron / "demo.jsonl", chiron / "images")
            if hasattr(q, "question")]


def test_search_through_routers_equals_single_server_and_keeps_questions_on_one_worker(
        router_bin, single_server_run, chiron, tokenizer_dir, tmp_path):
    with LoopbackServer(CHAT_MODELS) as chat, routed_interns(router_bin, tmp_path) as (
            urls, workers):
        cfg = tmp_path / "routed.toml"
        cfg.write_text(search_config(chat, tokenizer_dir, urls))
        proc = mics(*search_args(chiron, cfg, tmp_path / "R"))
        assert proc.returncode == 0, proc.stderr
        checks = anyio.run(doctor, load_config(cfg))
        worker_urls = {name: [w.url for w in ws] for name, ws in workers.items()}
    assert exports(tmp_path / "R") == (single_server_run["results"], single_server_run["failed"])
    questions = demo_questions(chiron)
    for name, ws in workers.items():
        placed = questions_by_worker(ws, questions)
        assert all(len(ks) == 1 for ks in placed.values()), (name, placed)  # cache_aware
        served = [len(generate_bodies(w)) for w in ws]
        assert sum(served) >= single_server_run["intern_items"] // len(INTERNS) // 2
        assert sum(1 for n in served if n) >= 2  # ... and new questions spread over workers
    # doctor goes through the router and names the workers it routes to
    assert all(c.ok for c in checks), [c.message for c in checks if not c.ok]
    for name, wurls in worker_urls.items():
        [check] = [c for c in checks if c.name == name]
        assert f"via {urls[name]}: router, {len(wurls)} workers ({len(wurls)} healthy)" in (
            check.message)
        assert all(u in check.message for u in wurls)
    assert all(c.message.startswith("ok") and "via" not in c.message
               for c in checks if c.role != "intern")


def test_a_worker_killed_mid_run_loses_no_question(router_bin, single_server_run, chiron,
                                                   tokenizer_dir, tmp_path):
    with LoopbackServer(CHAT_MODELS) as chat, routed_interns(router_bin, tmp_path) as (
            urls, workers):
        cfg = tmp_path / "routed.toml"
        cfg.write_text(search_config(chat, tokenizer_dir, urls))
        proc = mics(*search_args(chiron, cfg, tmp_path / "R"), wait=False)
        ws = workers["i0"]
        target = single_server_run["intern_items"] // len(INTERNS) // 3
        deadline = time.monotonic() + 300
        while sum(len(generate_bodies(w)) for w in ws) < target:  # a third of i0's rollouts
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        victim = max(ws, key=lambda w: len(generate_bodies(w)))
        victim_url = victim.url
        victim.stop()
        before = {id(w): len(generate_bodies(w)) for w in ws}
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        deadline = time.monotonic() + 15  # the router dropped it: removed or unhealthy
        while {w["url"]: w["is_healthy"] for w in router_workers(urls["i0"])}.get(victim_url):
            assert time.monotonic() < deadline, router_workers(urls["i0"])
            time.sleep(0.2)
    assert before[id(victim)] > 0  # it was serving this run when it died
    survivors = [w for w in ws if w is not victim]
    assert sum(len(generate_bodies(w)) - before[id(w)] for w in survivors) > 0  # work went on
    assert exports(tmp_path / "R") == (single_server_run["results"], single_server_run["failed"])
    with RunStore.open(tmp_path / "R", write=False) as store:
        assert store.iter_failures() == []  # no call gave up, nothing deferred for resume
