"""The benchmark's own seams: the chaos script's kill-after-N store wrapper (a real SIGKILL of a
real process over a real LMDB store) and the one simulator role table both simulators read."""

from __future__ import annotations

import signal
import subprocess
import sys

import anyio
import httpx
import pytest
from helpers import ROOT

from backends.base import Call
from backends.simulated import SimulatedModel, render_text
from bench.loopback import LoopbackServer
from mics.config import ModelConfig
from mics.types import Prompt, Sampling, Text
from store import RunStore

KILLED_WRITER = """
import sys
from bench.crash_store import KillAfterCalls
from store import RunStore

store = KillAfterCalls(RunStore.open(sys.argv[1], write=True, create=True), limit=3)
with store.transaction():  # replies 1 and 2: one commit, below the limit
    store.memo_put("k1", {"text": "a"}, {"n": 1})
    store.memo_put("k2", {"text": "b"}, {"n": 2})
print("first commit survived", flush=True)
with store.transaction():  # replies 3 and 4: the kill lands after this commit, not inside it
    store.memo_put("k3", {"text": "c"}, {"n": 3})
    store.memo_put("k4", {"text": "d"}, {"n": 4})
print("not reached", flush=True)
"""


def test_kill_after_calls_sigkills_right_after_the_commit_holding_the_nth_reply(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == ["first commit survived"]
    with RunStore.open(run, write=False) as store:  # the whole second commit is stored
        assert [store.memo_get(k) for k in ("k1", "k2", "k3", "k4")] == [
            {"text": "a"}, {"text": "b"}, {"text": "c"}, {"text": "d"}]
        assert store.call_count() == 4


def test_crash_store_entry_point_is_the_mics_command_without_the_variable(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.crash_store", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "search" in out.stdout and "resume" in out.stdout


@pytest.mark.parametrize("leak_rate", [0.0, 0.4])
def test_loopback_mentor_honours_leak_rate_like_the_in_process_simulator(leak_rate):
    options = {"quality": 0.9, "leak_rate": leak_rate}
    cfg = ModelConfig(name="m", backend="simulated", model="m", options=options)
    local = SimulatedModel(cfg, "mentor")
    prompt = Prompt(system="You are a clinician.",
                    parts=(Text("Correct answer: Pneumonia\n\nReasoning prefix:\n"),))
    with LoopbackServer(models={"m": {"role": "mentor", **options}}) as srv, \
            httpx.Client(base_url=srv.url) as c:
        for sample in range(6):
            want = anyio.run(local.complete, Call(prompt, Sampling(temperature=0.7), sample)).text
            r = c.post("/v1/chat/completions", headers={"X-Mics-Sample": str(sample)}, json={
                "model": "m", "temperature": 0.7, "messages": [
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": render_text(prompt).split("\n", 1)[1]}]})
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == want
