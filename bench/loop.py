"""`mics bench loop`: one MICS workload run twice, in Chiron-o1's order and by the engine.

Workload: N synthetic text-only questions; three simulated mentors, three interns and a judge
served over real HTTP by the loopback server (mentors and judge: OpenAI chat; interns: SGLang
`/generate`, one request per batch, or OpenAI chat with `interns="openai"`), so the client, the
call gate's retries and the store all count. Each request is delayed by a latency drawn per role
from a uniform range; each endpoint is capped at `cap` concurrent requests. The server runs in
its own process, so its work does not share an interpreter with the client's.

(a) The engine (`mics.run.search_run`) on all N questions.
(b) Reference order: a faithful sequential baseline, the same engine in the reference order
    (`bench.reference_engine`) and one question at a time: per depth, for each mentor in order its
    call (or cached step), then for each intern in order the T1 then the T2 sample, each judged
    at once, one call at a time, as the Chiron-o1 code issues them. Same rules, backends, gate
    and store, so its decisions and exports are the engine's. Its memo and verdict cache answer
    a repeated judge question, which the Chiron code would send again: the baseline is, if
    anything, fast.
    Sequential runs take minutes, so it runs on a few questions picked at evenly spaced
    quantiles of their sequential work (known from the engine's trees); the whole set's
    reference time is also modelled, as a cross-check of the extrapolation.
(c) Reference order, sharded: the same sequential order with `cap` questions at once, which is
    what a user of the Chiron-o1 runner gets by starting it `cap` ways on `get_chunk` shards
    (each shard one call at a time). Measured on 2 x cap representative questions; a static
    `get_chunk` split of all N questions is also modelled. `speedup_vs_sharded` is the fair
    baseline; efficiency against the bound stays the headline.

Schedule bound: no schedule can beat max(the slowest question's critical path, sum of each
endpoint's latencies / its cap). Latencies are the ones the server drew (recorded server side);
a question's critical path follows MICS's dependencies: per depth, the longest chain
mentor call -> intern sample -> judge call of a new answer. Efficiency = bound / engine time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from backends.gate import CallGate
from backends.http import client_kind
from backends.simulated import render_text
from bench.common import sim_models, write_questions
from bench.loopback import LoopbackServer, sim_text_from_generate
from bench.reference_engine import ReferenceEngine
from mics.config import RunConfig, parse_config
from mics.dataset import read_dataset
from mics.export import export_reference
from mics.gc_quiet import quiet_gc
from mics.prompts import intern_prompt, judge_prompt, mentor_prompt
from mics.run import build_models, search_run, start_run
from mics.steps import normalize_answer
from mics.types import (
    Prompt,
    Question,
)
from store import RunStore

Latency = tuple[float, float]
ROOT = Path(__file__).resolve().parents[1]

# Named latency presets for `mics bench loop --preset`: (mentor, intern, judge) seconds.
PRESETS: dict[str, tuple[Latency, Latency, Latency]] = {
    "default": ((1.0, 2.0), (0.25, 0.5), (0.1, 0.2)),
    "fast": ((0.1, 0.2), (0.025, 0.05), (0.01, 0.02)),  # CPU-bound unless each call is cheap
}


@dataclass(frozen=True)
class LoopSettings:
    """What `mics bench loop` runs; latencies are uniform (low, high) seconds per call."""

    questions: int = 200
    cap: int = 16
    # Paper-shaped (API mentors >> batched 7B interns > a chat judge), scaled down ~10x
    # (`--preset fast`: 100x). 200 questions make ~4,000 requests; at under 1 ms of engine CPU
    # each, the fast preset is still near CPU-bound on a busy 2-core machine.
    mentor_latency: Latency = (1.0, 2.0)
    intern_latency: Latency = (0.25, 0.5)
    judge_latency: Latency = (0.1, 0.2)
    reference_questions: int = 3
    # The reference order sharded `cap` ways (questions at once), as its own runner's
    # `get_chunk` lets a user run it; measured on this many questions (0: 2 x cap).
    sharded_questions: int = 0
    concurrency: int = 0  # questions the engine searches at once; 0: all of them
    interns: str = "sglang"  # "sglang": batched /generate (the paper's setup), or "openai"
    seed: int = 0

    def latency(self) -> dict[str, Latency]:
        return {"mentor": self.mentor_latency, "intern": self.intern_latency,
                "judge": self.judge_latency}


# ---------------------------------------------------------------- the timed server


def served_key(model: str, text: str, temperature: float, sample: int) -> str:
    """What identifies one request's reply: model, the text a simulator reads, sampling."""
    raw = f"{model}\x00{float(temperature)!r}\x00{int(sample)}\x00{text}"
    return hashlib.sha1(raw.encode()).hexdigest()


Served = tuple[str, list[str], float, float]  # model, served_key per item, delay, arrival


class TimedLoopback(LoopbackServer):
    """The loopback server, recording the latency it served for every answered model call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # model, (model, text, temperature, sample) per item, delay, arrival: hashed into
        # served keys when read, outside the timed run (the server's CPU competes with it)
        self._served: list[tuple[str, list[tuple[str, str, float, int]], float, float]] = []

    @property
    def served(self) -> list[Served]:
        """(model, served_key per item, delay, arrival) of every answered model call."""
        with self._lock:
            raw = list(self._served)
        return [(model, [served_key(*item) for item in items], delay, arrival)
                for model, items, delay, arrival in raw]

    def _model_reply(self, path: str, headers: Any, body: dict[str, Any], model: str) -> Any:
        arrival = time.time()
        resp = super()._model_reply(path, headers, body, model)
        if resp.status != 200:
            return resp
        if path == "/generate":  # one batch: one delay for every item
            texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
            params = body.get("sampling_params") or {}
            params = params if isinstance(params, list) else [params] * len(texts)
            items = [(model, sim_text_from_generate(t), float(sp.get("temperature", 1.0)),
                      int((sp.get("custom_params") or {}).get("sample_index", 0)))
                     for t, sp in zip(texts, params, strict=True)]
        else:
            model = body.get("model", model)
            system = "".join(m["content"] for m in body["messages"] if m["role"] == "system")
            rest = "".join(m["content"] for m in body["messages"] if m["role"] != "system")
            sample = int(headers.get("X-Mics-Sample") or 0)
            items = [(model, f"{system}\n{rest}", float(body.get("temperature", 1.0)), sample)]
        with self._lock:
            self._served.append((model, items, resp.delay_s, arrival))
        return resp


def serve(spec: dict[str, Any]) -> None:
    """Server process: print the URL, then answer `served` / `stop` lines on stdin. The
    garbage collector skips what exists before serving (as `search_run` does for the engine):
    the server's CPU competes with the engine it times."""
    latency = {role: tuple(v) for role, v in spec["latency"].items()}
    srv = TimedLoopback(spec["models"], latency=latency, seed=spec["seed"]).start()
    print(srv.url, flush=True)
    try:
        with quiet_gc():
            for line in sys.stdin:
                if line.strip() != "served":
                    break
                print(json.dumps(srv.served), flush=True)
    finally:
        srv.stop()


class ServerProcess:
    """A TimedLoopback in a child process (its own interpreter and GIL)."""

    def __init__(self, models: dict[str, Any], latency: dict[str, Latency], seed: int) -> None:
        spec = json.dumps({"models": models, "latency": latency, "seed": seed})
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.loop", "--serve", spec],
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._in, self._out = self._proc.stdin, self._proc.stdout
        url = self._out.readline().strip()
        if not url.startswith("http"):
            self.close()
            raise RuntimeError("the loopback server process did not start")
        self.url = url

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (Linux /proc; 0 elsewhere)."""
        try:
            with open(f"/proc/{self._proc.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def served(self) -> list[Served]:
        self._in.write("served\n")
        self._in.flush()
        return [(m, keys, d, t) for m, keys, d, t in json.loads(self._out.readline())]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._in.write("stop\n")
            self._in.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def write_chat_tokenizer(out: Path) -> Path:
    """A minimal model folder whose only job is the ChatML chat template the sglang backend
    renders prompts with: a `tokenizer_config.json` with the template and its special tokens
    (what `backends.template_source` reads; no transformers, no tokenizer files)."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": "[UNK]", "model_max_length": 32768}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def loop_config(url: str, cap: int, concurrency: int, seed: int,
                tokenizer: Path | None = None) -> RunConfig:
    """The paper-shaped cast on the server: OpenAI-compatible mentors and judge; interns on
    SGLang's /generate (one request per batch) given a tokenizer, else OpenAI chat too."""
    models = sim_models()
    common = {"max_concurrency": cap, "timeout_s": 60.0, "max_retries": 4, "backoff_s": 0.05}

    def chat(name: str) -> dict[str, Any]:
        return {"name": name, "model": name, "backend": "openai", "base_url": f"{url}/v1",
                **common}

    def intern(name: str) -> dict[str, Any]:
        if tokenizer is None:
            return chat(name)
        return {"name": name, "model": name, "backend": "sglang",
                "base_url": f"{url}/m/{name}", **common,
                "options": {"tokenizer": str(tokenizer), "family": "text", "warmup": False}}

    return parse_config({
        "search": {"seed": seed, "concurrency": concurrency},
        "mentors": [chat(n) for n, m in models.items() if m["role"] == "mentor"],
        "interns": [intern(n) for n, m in models.items() if m["role"] == "intern"],
        "judge": chat("judge"),
    })


# ---------------------------------------------------------------- the reference order


async def run_reference(run_dir: Path, config: RunConfig, questions: Sequence[Question],
                        shards: int = 1) -> dict[str, Any]:
    """The reference order over `questions` in its own run store, `shards` questions at once
    (1: one at a time; k: a user running the reference k ways); wall time and call counts."""
    t0 = time.perf_counter()
    with RunStore.open(run_dir, write=True, create=True) as store:
        store.put_meta("config", config.to_dict())
        models = build_models(config)
        gate = CallGate(store, session=f"reference-{uuid.uuid4().hex[:8]}")
        sharded = replace(config, search=replace(config.search, concurrency=shards))
        try:
            await ReferenceEngine(sharded, store, models, gate).run(questions)
        finally:
            await models.aclose()
    return {"seconds": time.perf_counter() - t0, "calls": dict(gate.counts)}


# ---------------------------------------------------------------- the schedule bound


def _delay_map(served: Iterable[Served]) -> dict[str, float]:
    """served_key -> the latency its call waited (a batch's delay for each of its items)."""
    out: dict[str, float] = defaultdict(float)
    for _model, keys, delay, _t in served:
        for key in keys:
            out[key] += delay
    return dict(out)


def endpoint_loads(served: Iterable[Served], caps: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per endpoint: requests, items, summed latency, cap, and summed latency / cap."""
    calls: dict[str, int] = defaultdict(int)
    items: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for model, keys, delay, _t in served:
        calls[model] += 1
        items[model] += len(keys)
        total[model] += delay
    return {m: {"calls": calls[m], "items": items[m], "latency_s": round(total[m], 3),
                "cap": caps[m], "load_s": round(total[m] / caps[m], 3)} for m in sorted(calls)}


class _Lookup:
    """Served latency of a call the engine made, found by the text the simulator read."""

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.misses = 0

    def __call__(self, model: str, prompt: Prompt, temperature: float, sample: int = 0,
                 *, required: bool = True) -> float:
        got = self.delays.get(served_key(model, render_text(prompt), temperature, sample))
        if got is None:
            self.misses += required
            return 0.0
        return got


def utilisation(served: Iterable[Served], model: str, t0: float, t1: float, slices: int = 10
                ) -> list[float]:
    """Mean requests in flight at `model` in each of `slices` equal slices of [t0, t1]."""
    spans = [(t, t + d) for m, _k, d, t in served if m == model]
    width = (t1 - t0) / slices
    out = []
    for i in range(slices):
        a0, a1 = t0 + i * width, t0 + (i + 1) * width
        busy = sum(max(0.0, min(b, a1) - max(a, a0)) for a, b in spans)
        out.append(round(busy / width, 1) if width > 0 else 0.0)
    return out


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def critical_paths(store: RunStore, config: RunConfig, delays: dict[str, float]
                   ) -> tuple[dict[str, float], int]:
    """Per question, the longest dependency chain of served latencies; and lookup misses.

    Per depth: max over candidates of (its mentor call(s), 0 for a cached step) + max over its
    samples of (the intern call + the judge call of an answer not judged before in the
    question). Depths, then attempts, add up.
    """
    s = config.search
    model_of = {m.name: m.model for m in (*config.mentors, *config.interns, config.judge)}
    judge = config.judge.model
    tries = s.mentor_malformed_retries + 1
    look = _Lookup(delays)
    out: dict[str, float] = {}
    for qid, rec in store.iter_questions():
        if "question" not in rec:
            continue
        q = Question.from_dict(rec["question"])
        nodes = store.get_nodes(qid)
        prefix_of = {n["node_id"]: n["prefix"] for n in nodes}
        layers: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for n in nodes:
            if n["depth"] >= 0:
                layers[(n["attempt"], n["depth"])].append(n)
        judged: set[str] = set()
        total = 0.0
        for key in sorted(layers):
            new: dict[str, float] = {}
            for n in layers[key]:
                for smp in n["samples"]:
                    ans = smp["answer"]
                    if ans is None or normalize_answer(ans) in judged:
                        continue
                    prompt = judge_prompt(q, ans)
                    lat = look(judge, prompt, s.judge_temperature, 0, required=False)
                    lat += look(judge, prompt, s.judge_temperature, 1, required=False)
                    norm = normalize_answer(ans)
                    new[norm] = max(new.get(norm, 0.0), lat)
            worst = 0.0
            for n in layers[key]:
                mentor = 0.0
                if not n["reused"]:
                    prompt = mentor_prompt(q, prefix_of[n["parent_id"]])
                    base = n["attempt"] * tries
                    mentor = sum(look(model_of[n["mentor"]], prompt, s.mentor_temperature,
                                      base + k, required=k == 0) for k in range(tries))
                tail = 0.0
                for smp in n["samples"]:
                    intern = look(model_of[smp["intern"]], intern_prompt(q, n["prefix"]),
                                  smp["temperature"])
                    ans = smp["answer"]
                    jud = new.get(normalize_answer(ans), 0.0) if ans is not None else 0.0
                    tail = max(tail, intern + jud)
                worst = max(worst, mentor + tail)
            judged.update(new)
            total += worst
        out[qid] = total
    return out, look.misses


# ---------------------------------------------------------------- exports


def _export_lines(store_dir: Path, out: Path, keep: set[str] | None = None
                  ) -> dict[str, list[bytes]]:
    with RunStore.open(store_dir, write=False) as store:
        export_reference(store, out)
    lines = {}
    for name in ("results.jsonl", "failed.jsonl"):
        rows = (out / name).read_bytes().splitlines()
        lines[name] = [r for r in rows if keep is None or json.loads(r)["rid"] in keep]
    return lines


# ---------------------------------------------------------------- the bench


def sequential_work(store: RunStore, latency: dict[str, Latency]) -> dict[str, float]:
    """Per question, the latency the reference order would wait, from the engine's tree: its
    mentor calls, one call per intern sample, one judge call per new answer; mean latencies."""
    mean = {role: (lo + hi) / 2 for role, (lo, hi) in latency.items()}
    out: dict[str, float] = {}
    for qid, rec in store.iter_questions():
        if "question" not in rec:
            continue
        nodes = [n for n in store.get_nodes(qid) if n["depth"] >= 0]
        mentors = sum(not n["reused"] for n in nodes)
        samples = [smp for n in nodes for smp in n["samples"]]
        answers = {smp["answer"] for smp in samples if smp["answer"] is not None}
        out[qid] = (mentors * mean["mentor"] + len(samples) * mean["intern"]
                    + len(answers) * mean["judge"])
    return out


def chunked_time(per_question_s: Sequence[float], shards: int) -> float:
    """Wall time of the reference sharded as its runner's `get_chunk` does: the dataset cut
    into `shards` contiguous chunks of ceil(n / shards) questions, each run sequentially in
    its own process; the slowest chunk sets the time."""
    if not per_question_s:
        return 0.0
    size = -(-len(per_question_s) // max(1, shards))
    return max(sum(per_question_s[i:i + size]) for i in range(0, len(per_question_s), size))


def representative(work: dict[str, float], k: int) -> list[str]:
    """k questions at evenly spaced quantiles of their sequential work (a stratified sample,
    so the reference's questions/hour on them stands for the whole set)."""
    ranked = sorted(work, key=lambda q: (work[q], q))
    k = max(1, min(k, len(ranked)))
    return sorted({ranked[int((i + 0.5) * len(ranked) / k)] for i in range(k)})


def run_loop(settings: LoopSettings, work_dir: Path | None = None,
             progress: Any = None) -> dict[str, Any]:
    """Run both orders on the same workload and return the `loop` section of the report."""
    say = progress or (lambda _msg: None)
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="mics-bench-loop-")
        work_dir = Path(tmp)
    try:
        return _run_loop(settings, Path(work_dir), say)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_loop(st: LoopSettings, work: Path, say: Any) -> dict[str, Any]:
    n = st.questions
    data = write_questions(work / "questions.jsonl", n, st.seed)
    models = sim_models()
    concurrency = st.concurrency or n
    if st.interns not in ("sglang", "openai"):
        raise ValueError(f"interns must be 'sglang' or 'openai', got {st.interns!r}")
    tok = write_chat_tokenizer(work / "tokenizer") if st.interns == "sglang" else None

    # The HTTP backends' one-time imports (aiohttp, httpx: ~0.25 s of CPU; jinja2, which the
    # SGLang intern's chat template is checked against once: ~0.05 s) happen here, before either
    # timed phase, so per-request CPU is per request and both orders start equal.
    for module in ("backends.openai_chat", "backends.sglang", "jinja2.sandbox", "jinja2.ext"):
        importlib.import_module(module)
    say(f"engine: {n} questions, {concurrency} at a time, cap {st.cap} per endpoint")
    with ServerProcess(models, st.latency(), st.seed) as srv:
        srv_url = srv.url
        config = loop_config(srv.url, st.cap, concurrency, st.seed, tok)
        start_run(work / "engine", config, data, None, None)
        cpu0, srv_cpu0, wall0 = _cpu_self(), srv.cpu_s(), time.time()
        t0 = time.perf_counter()
        summary = anyio.run(search_run, work / "engine")
        engine_s = time.perf_counter() - t0
        engine_cpu, server_cpu = _cpu_self() - cpu0, srv.cpu_s() - srv_cpu0
        eng_served = srv.served()

    with RunStore.open(work / "engine", write=False) as store:
        work_by_q = sequential_work(store, st.latency())
    picked = set(representative(work_by_q, st.reference_questions))
    ref_questions = [q for q in read_dataset(data) if isinstance(q, Question) and q.qid in picked]
    say(f"reference order: {len(ref_questions)} of {n} questions (spread over the engine's "
        "per-question work), one call at a time")
    with ServerProcess(models, st.latency(), st.seed) as srv:
        config = loop_config(srv.url, st.cap, concurrency, st.seed, tok)
        ref = anyio.run(run_reference, work / "reference", config, ref_questions)
        ref_served = srv.served()

    n_sharded = min(n, st.sharded_questions or 2 * st.cap)
    sharded_picked = set(representative(work_by_q, n_sharded))
    sharded_questions = [q for q in read_dataset(data)
                         if isinstance(q, Question) and q.qid in sharded_picked]
    say(f"reference order sharded {st.cap} ways: {len(sharded_questions)} questions, "
        f"{st.cap} at a time")
    with ServerProcess(models, st.latency(), st.seed) as srv:
        config = loop_config(srv.url, st.cap, concurrency, st.seed, tok)
        sharded = anyio.run(run_reference, work / "reference-sharded", config,
                            sharded_questions, st.cap)

    say("bound and exports")
    caps = {m.model: m.max_concurrency for m in (*config.mentors, *config.interns, config.judge)}
    loads = endpoint_loads(eng_served, caps)
    with RunStore.open(work / "engine", write=False) as store:
        cps, misses = critical_paths(store, config, _delay_map(eng_served))
    cp_max = max(cps.values(), default=0.0)
    load_max = max((v["load_s"] for v in loads.values()), default=0.0)
    bound = max(cp_max, load_max)
    bottleneck = max(loads, key=lambda m: loads[m]["load_s"]) if loads else ""
    keep = {q.qid for q in ref_questions}
    ref_lines = _export_lines(work / "reference", work / "export-reference")
    eng_lines = _export_lines(work / "engine", work / "export-engine", keep)
    identical = ref_lines == eng_lines and sum(map(len, ref_lines.values())) == len(keep)
    sharded_keep = {q.qid for q in sharded_questions}
    sharded_identical = (_export_lines(work / "reference-sharded", work / "export-sharded")
                         == _export_lines(work / "engine", work / "export-engine-sharded",
                                          sharded_keep))

    ref_s = ref["seconds"]
    ref_latency = sum(d for _m, _k, d, _t in ref_served)
    ref_calls = len(ref_served)
    per_call = (ref_s - ref_latency) / ref_calls if ref_calls else 0.0
    # The reference order over all n questions: its latency (modelled per question from the
    # engine's trees, scaled by what the measured subset really waited) + per-call overhead.
    eng_latency = sum(d for _m, _k, d, _t in eng_served)
    modelled = sum(work_by_q[q.qid] for q in ref_questions)
    scale = ref_latency / modelled if modelled else 1.0
    full_calls = ref_calls * sum(work_by_q.values()) / modelled if modelled else 0.0
    full_estimate = scale * sum(work_by_q.values()) + per_call * full_calls
    engine_qph = n / engine_s * 3600
    reference_qph = len(ref_questions) / ref_s * 3600
    sharded_qph = len(sharded_questions) / sharded["seconds"] * 3600
    order = [q.qid for q in read_dataset(data) if isinstance(q, Question)]
    total_work = sum(work_by_q.values())
    per_q = [full_estimate * work_by_q.get(q, 0.0) / total_work if total_work else 0.0
             for q in order]
    chunked_s = chunked_time(per_q, st.cap)
    return {
        "speedup": round(engine_qph / reference_qph, 2),
        "efficiency": round(bound / engine_s, 3),
        "engine_qph": round(engine_qph, 1),
        "reference_qph": round(reference_qph, 1),
        "speedup_vs_sharded": round(engine_qph / sharded_qph, 2),
        "reference_sharded_qph": round(sharded_qph, 1),
        "reference_sharded_s": round(sharded["seconds"], 3),
        "reference_sharded_questions": len(sharded_questions),
        "reference_sharded_shards": st.cap,
        "reference_sharded_gate": sharded["calls"],
        "reference_sharded_exports_identical": sharded_identical,
        "reference_sharded_qph_full_estimate": (round(n / chunked_s * 3600, 1)
                                                if chunked_s else None),
        "exports_identical": identical,
        "questions": n,
        "reference_questions": len(ref_questions),
        "reference_rids": sorted(keep),
        "engine_s": round(engine_s, 3),
        "reference_s": round(ref_s, 3),
        "bound_s": round(bound, 3),
        "bound_by": "critical_path" if cp_max >= load_max else bottleneck,
        "critical_path_max_s": round(cp_max, 3),
        "critical_path_mean_s": round(sum(cps.values()) / len(cps), 3) if cps else 0.0,
        "critical_path_lookup_misses": misses,
        "endpoint_load_max_s": round(load_max, 3),
        "endpoints": loads,
        "bottleneck": bottleneck,
        "bottleneck_in_flight_by_tenth": utilisation(eng_served, bottleneck, wall0,
                                                     wall0 + engine_s) if bottleneck else [],
        "engine_cpu_s": round(engine_cpu, 2),
        "engine_cpu_ms_per_request": round(engine_cpu / max(1, len(eng_served)) * 1000, 2),
        "http_client": client_kind(srv_url),  # what make_client gave the endpoints
        "server_cpu_s": round(server_cpu, 2),
        "engine_calls": len(eng_served),
        "engine_latency_sum_s": round(eng_latency, 3),
        "engine_succeeded": summary.succeeded,
        "engine_failed": summary.failed,
        "engine_gate": summary.calls,
        "reference_calls": ref_calls,
        "reference_latency_sum_s": round(ref_latency, 3),
        "reference_overhead_per_call_ms": round(per_call * 1000, 3),
        "reference_gate": ref["calls"],
        "reference_full_estimate_s": round(full_estimate, 1),
        "reference_qph_full_estimate": (round(n / full_estimate * 3600, 1)
                                        if full_estimate else None),
        "settings": {**asdict(st), "concurrency": concurrency,
                     "backends": {"mentors": "openai", "judge": "openai",
                                  "interns": st.interns},
                     "server": "bench.loopback in its own process"},
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m bench.loop --serve SPEC_JSON (use `mics bench loop`)")
