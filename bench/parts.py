"""`mics bench parts`: our own CPU per call, old way and new way, in one run (issue 15, goal 3).

Three items, each measured before and after issue 15 in the same process, interleaved, best of
`repeats` (so the ratios hold under other load); CPU is `time.process_time`:

1. **Storing replies.** The replies and call-log entries of a real search (the loop's
   paper-shaped cast as zero-latency in-process simulated models), stored into fresh LMDB run
   stores: *old*, one `store.memo_put` (one commit) per reply; *new*, `MemoWriter.put` from
   concurrent tasks. Each gate call delivers its replies in one put (an intern batch several,
   a mentor or judge call one); `puts_per_turn` of them arrive per event-loop turn. The
   default, 1.77, was measured on the loop workload (`--preset fast --cap 16`, 200 questions:
   4,108 HTTP requests, 11,134 replies, 2,322 commits, i.e. 1.77 puts and 4.8 replies per
   commit, 0.57 commits per request). The worst case, one reply per turn, is measured too.
   Both paths run in the same harness (one task per put); the harness alone (tasks that store
   nothing) is measured and subtracted. The two stores must hold the same memo and call log.
2. **Gate primitives.** T tasks, N calls each, per call: *old*, an `anyio.CapacityLimiter`
   acquire/release and one `anyio.Event` made and set (the gate before issue 15); *new*, the
   `EndpointLimiter` slots (an `asyncio.Semaphore`; anyio's `Semaphore(fast_acquire=True)`
   when measured for BENCHMARKS.md) and the lazy in-flight entry (an Event only when a second
   caller joins). Both wait their turn (`wait_turn`). The call is `await
   anyio.lowlevel.checkpoint()`, measured alone and subtracted.
3. **Prompt rendering.** The intern prompts of that search, per prompt: *old*, the model
   folder's Jinja chat template (`backends.template_source`, what `apply_chat_template`
   renders); *new*, `backends.chat_templates.render_prompt`; every pair of strings is checked
   equal. Text-only with the loop's tokenizer folder, and with images for the qwen2-vl and
   internvl families (their templates as published). For the text prompts also transformers'
   own `apply_chat_template`: what the sglang backend called before issue 15 (and what the
   issue measured); the total is given with either as the old renderer.

The total adds the three per-call figures (text prompts); issue 15 measured 0.115 + 0.074 +
0.053 = 0.242 ms before the change, and its goal is half of that.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.lowlevel import checkpoint

from backends.limits import EndpointLimiter
from backends.memo_writer import MemoWriter
from bench.common import write_questions
from bench.overhead import sim_config
from mics.config import ModelConfig, parse_config
from mics.prompts import intern_prompt
from mics.run import search_run, start_run
from mics.types import Image, ImageRef, Prompt, Question
from store import RunStore

Entry = tuple[str, dict, dict]  # memo key, reply, call-log entry (as the gate stores them)
Put = list[Entry]  # the replies one gate call delivers together

ISSUE_MS = {"storing": 0.115, "gate": 0.074, "render": 0.053}  # issue 15, before the change
ISSUE_TOTAL_MS = 0.242
GOAL_MS = ISSUE_TOTAL_MS / 2
MEASURED_PUTS_PER_TURN = 1.77  # see the module docstring

# Published chat templates (tokenizer_config.json of Qwen/Qwen2-VL-2B-Instruct, and of
# OpenGVLab/InternVL2's InternLM2 chat models).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PartsSettings:
    """What `mics bench parts` measures."""

    replies: int = 4000  # replies stored per path
    puts_per_turn: float = MEASURED_PUTS_PER_TURN  # gate calls whose replies arrive per turn
    calls: int = 500  # calls per task through the gate primitives
    tasks: tuple[int, ...] = (16, 64)  # concurrent tasks through the gate primitives
    cap: int = 16  # the endpoint's max_concurrency
    prompts: int = 1000  # intern prompts rendered per family
    repeats: int = 3  # best of
    seed: int = 0


@dataclass
class Workload:
    """A real search's replies (grouped as the gate delivers them) and intern prompts."""

    puts: list[Put]
    prompts: list[Prompt]
    questions: int


# ---------------------------------------------------------------- the workload


def _search(run_dir: Path, questions: int, seed: int) -> None:
    data = write_questions(run_dir.parent / f"{run_dir.name}.jsonl", questions, seed)
    start_run(run_dir, parse_config(sim_config(16, seed)), data, None, None)
    anyio.run(search_run, run_dir)


def group_puts(entries: Sequence[Entry]) -> list[Put]:
    """Call-log order back into the gate's puts: an intern batch (consecutive entries of one
    question and intern) is one put; a mentor or judge call is one put of its own."""
    puts: list[Put] = []
    last: tuple[str, str] | None = None
    for key, reply, log in entries:
        batch = (log["qid"], log["model"]) if log["role"] == "intern" else None
        if batch is not None and batch == last:
            puts[-1].append((key, reply, log))
        else:
            puts.append([(key, reply, log)])
        last = batch
    return puts


def loop_workload(work_dir: Path, replies: int, prompts: int, seed: int = 0) -> Workload:
    """Search enough synthetic questions with zero-latency simulated models; read back every
    stored reply with its call-log entry, and the intern prompt of every candidate node."""
    questions = max(2, math.ceil(replies / 40))
    run_dir = work_dir / "search"
    _search(run_dir, questions, seed)
    templates = parse_config(sim_config(16, seed)).prompts
    entries: list[Entry] = []
    found: list[Prompt] = []
    with RunStore.open(run_dir, write=False) as store:
        for call in store.iter_calls():
            reply = store.memo_get(call["key"])
            log = {k: v for k, v in call.items() if k not in ("key", "seq")}
            entries.append((call["key"], reply, log))
        seen: set[Prompt] = set()
        for qid, rec in store.iter_questions():
            q = Question.from_dict(rec["question"])
            for node in store.get_nodes(qid):
                if node["depth"] < 0:  # the root: no intern sees it
                    continue
                prompt = intern_prompt(q, node["prefix"], templates)
                if prompt not in seen:
                    seen.add(prompt)
                    found.append(prompt)
    if not entries or not found:
        raise RuntimeError("the search stored no replies or no candidate nodes")
    # More replies than one search gave: the same replies again under other keys.
    more = [(f"{key}~{n}", reply, log) for n in range(1, math.ceil(replies / len(entries)))
            for key, reply, log in entries]
    return Workload(_first(group_puts(entries + more), replies),
                    [found[i % len(found)] for i in range(prompts)], questions)


def _first(puts: list[Put], n: int) -> list[Put]:
    """The first `n` replies, the last put cut short if need be."""
    out: list[Put] = []
    for put in puts:
        if n <= 0:
            break
        out.append(put[:n])
        n -= len(out[-1])
    return out


# ---------------------------------------------------------------- 1. storing replies


def turns(puts: list[Put], per_turn: float) -> list[list[Put]]:
    """Puts dealt out to loop turns, `per_turn` on average (turn k gets
    floor((k+1) r) - floor(k r) of them, at least one)."""
    out: list[list[Put]] = []
    i = k = 0
    while i < len(puts):
        n = max(1, math.floor((k + 1) * per_turn) - math.floor(k * per_turn))
        out.append(puts[i:i + n])
        i, k = i + n, k + 1
    return out


def one_per_turn(puts: list[Put]) -> list[list[Put]]:
    """The worst case for grouping: every reply on its own, one per turn."""
    return [[[entry]] for put in puts for entry in put]


async def _deliver(rounds: list[list[Put]], store_put: Callable[[Put], Awaitable[None]]
                   ) -> float:
    """Each turn's puts from concurrent tasks; the next turn once they are stored. CPU s."""
    t0 = time.process_time()
    for rnd in rounds:
        async with anyio.create_task_group() as tg:
            for put in rnd:
                tg.start_soon(store_put, put)
    return time.process_time() - t0


def _store_once(path: Path, rounds: list[list[Put]], mode: str) -> tuple[float, int]:
    """Store `rounds` into a fresh run store at `path` the `mode` way; (CPU s, commits)."""
    with RunStore.open(path, write=True, create=True) as store:
        writer = MemoWriter(store)

        async def nothing(put: Put) -> None:
            return None

        async def one_commit_each(put: Put) -> None:  # the gate before issue 15
            for key, reply, log in put:
                store.memo_put(key, reply, log)

        fn = {"harness": nothing, "old": one_commit_each, "new": writer.put}[mode]
        commits0 = store.commit_count()
        gc.collect()
        cpu = anyio.run(_deliver, rounds, fn)
        return cpu, store.commit_count() - commits0


def store_contents(path: Path) -> tuple[list[dict], list[tuple[str, dict | None]]]:
    """A run store's call log and its memo (for every key the log names)."""
    with RunStore.open(path, write=False) as store:
        calls = store.iter_calls()
        return calls, [(c["key"], store.memo_get(c["key"])) for c in calls]


def measure_storing(work_dir: Path, puts: list[Put], per_turn: float, repeats: int
                    ) -> dict[str, Any]:
    """Old (a commit per reply) and new (MemoWriter) at `per_turn` puts per turn and at one
    reply per turn, interleaved, best of `repeats`; stores compared at the end."""
    replies = sum(len(p) for p in puts)
    patterns = {"measured": turns(puts, per_turn), "one_per_turn": one_per_turn(puts)}
    best: dict[tuple[str, str], float] = {}
    commits: dict[tuple[str, str], int] = {}
    for rep in range(repeats):
        for name, rounds in patterns.items():
            for mode in ("harness", "old", "new"):
                path = work_dir / f"store-{name}-{mode}-{rep}"
                cpu, n = _store_once(path, rounds, mode)
                best[name, mode] = min(cpu, best.get((name, mode), math.inf))
                commits[name, mode] = n
                if rep < repeats - 1 or mode == "harness":
                    shutil.rmtree(path)
    last = repeats - 1
    old = store_contents(work_dir / f"store-measured-old-{last}")
    identical = all(store_contents(work_dir / f"store-{name}-{mode}-{last}") == old
                    for name in patterns for mode in ("old", "new"))

    def ms(name: str, mode: str) -> float:
        return max(0.0, best[name, mode] - best[name, "harness"]) / replies * 1e3

    out: dict[str, Any] = {
        "replies": replies, "puts": len(puts), "puts_per_turn": per_turn,
        "stores_identical": identical,
        "harness_ms_per_reply": best["measured", "harness"] / replies * 1e3,
    }
    for name, rounds in patterns.items():
        old_ms, new_ms = ms(name, "old"), ms(name, "new")
        out[name] = {
            "turns": len(rounds), "old_ms": old_ms, "new_ms": new_ms,
            "ratio": new_ms / old_ms if old_ms else None,
            "old_commits": commits[name, "old"], "new_commits": commits[name, "new"],
            "old_commits_per_reply": commits[name, "old"] / replies,
            "new_commits_per_reply": commits[name, "new"] / replies,
            "commits_match_turns": commits[name, "new"] == len(rounds),
        }
    return out


# ---------------------------------------------------------------- 2. gate primitives


async def _gate_run(mode: str, tasks: int, calls: int, cap: int) -> float:
    """`tasks` tasks x `calls` calls through the `mode` primitives; CPU seconds."""
    limiter = EndpointLimiter(ModelConfig(name="bench", backend="simulated", model="bench",
                                          max_concurrency=cap))
    if mode == "old":
        limiter.slots = anyio.CapacityLimiter(cap)  # type: ignore[assignment]
    inflight: dict[int, anyio.Event | None] = {}

    async def call_only(base: int) -> None:
        for _ in range(base, base + calls):
            await checkpoint()

    async def old(base: int) -> None:  # the gate before issue 15
        for i in range(base, base + calls):
            inflight[i] = anyio.Event()
            async with limiter.slots:
                await limiter.wait_turn()
                await checkpoint()
            inflight.pop(i).set()

    async def new(base: int) -> None:  # backends/gate.py now: an Event only once one joins
        for i in range(base, base + calls):
            inflight[i] = None
            async with limiter.slots:
                await limiter.wait_turn()
                await checkpoint()
            event = inflight.pop(i)
            if event is not None:
                event.set()

    worker = {"call": call_only, "old": old, "new": new}[mode]
    gc.collect()
    t0 = time.process_time()
    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(worker, t * calls)
    return time.process_time() - t0


def measure_gate(tasks: int, calls: int, cap: int, repeats: int) -> dict[str, Any]:
    """Old vs new gate primitives per call, the call itself subtracted; best of `repeats`."""
    best: dict[str, float] = {}
    for _ in range(repeats):
        for mode in ("call", "old", "new"):
            cpu = anyio.run(_gate_run, mode, tasks, calls, cap)
            best[mode] = min(cpu, best.get(mode, math.inf))
    n = tasks * calls
    old_ms = max(0.0, best["old"] - best["call"]) / n * 1e3
    new_ms = max(0.0, best["new"] - best["call"]) / n * 1e3
    return {"tasks": tasks, "calls": n, "cap": cap, "call_ms": best["call"] / n * 1e3,
            "old_ms": old_ms, "new_ms": new_ms, "ratio": new_ms / old_ms if old_ms else None}


# ---------------------------------------------------------------- 3. prompt rendering


def write_transformers_tokenizer(out: Path) -> Path:
    """The loop's ChatML template in a folder transformers' AutoTokenizer can load too (a
    WordLevel tokenizer; no training, no download): what the sglang backend rendered with
    before issue 15, kept as this bench's baseline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bench.loop import CHATML

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", unk_token="[UNK]")
    wrapped.chat_template = CHATML
    wrapped.save_pretrained(out)
    return out


def template_folders(work_dir: Path) -> dict[str, Path]:
    """A tokenizer folder per family: the loop's ChatML (text; loadable by transformers when
    it is installed) and the published VL templates."""
    from bench.loop import write_chat_tokenizer

    try:
        text = write_transformers_tokenizer(work_dir / "tok-text")
    except ImportError:  # the Jinja and fast paths need only the template
        text = write_chat_tokenizer(work_dir / "tok-text")
    folders = {"text": text}
    for family, config in (("qwen2-vl", {"chat_template": QWEN2_VL_TEMPLATE}),
                           ("internvl", {"chat_template": INTERNVL_TEMPLATE,
                                         "bos_token": "<s>", "eos_token": "<|im_end|>"})):
        folder = work_dir / f"tok-{family}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer_config.json").write_bytes(orjson.dumps(config))
        folders[family] = folder
    return folders


def with_images(prompts: list[Prompt]) -> list[Prompt]:
    """The same intern prompts with one or two images first (as `intern_prompt` places them)."""
    out = []
    for i, p in enumerate(prompts):
        refs = [ImageRef(path=f"/images/{i}-{k}.jpg", sha256=f"{i:032x}{k:032x}",
                         mime="image/jpeg", width=1024, height=768) for k in range(1 + i % 2)]
        out.append(replace(p, parts=(*(Image(r) for r in refs), *p.parts)))
    return out


def measure_render(folder: Path, family: str, prompts: list[Prompt], repeats: int,
                   transformers: bool = False) -> dict[str, Any]:
    """Jinja (the model folder's template) vs `render_prompt`, per prompt; strings checked
    equal, or a RuntimeError. `transformers`: also the folder's transformers tokenizer (the
    path before issue 15, which it measured)."""
    from backends.chat_templates import render_prompt
    from backends.messages import INTERNVL_IMAGE
    from backends.messages import family_messages as messages
    from backends.template_source import load_chat_template

    tok = load_chat_template(str(folder), f"bench {family}")
    paths: dict[str, Callable[[Prompt], str]] = {}

    def image() -> str:
        return INTERNVL_IMAGE

    def old(p: Prompt) -> str:  # backends/sglang.py's Jinja path
        return tok.apply_chat_template(messages(p, family, image), tokenize=False,
                                       add_generation_prompt=True)

    def new(p: Prompt) -> str:
        out = render_prompt(tok, family, p, image)
        if out is None:
            raise RuntimeError(f"{family}: render_prompt could not compile the template")
        return out

    paths.update(old=old, new=new)
    if transformers:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)

        def via_transformers(p: Prompt) -> str:  # backends/sglang.py before issue 15
            return hf.apply_chat_template(messages(p, family, image), tokenize=False,
                                          add_generation_prompt=True)

        paths["transformers"] = via_transformers
    for name, fn in paths.items():  # every path's string equal; compiles each before timing
        unequal = sum(fn(p) != old(p) for p in prompts)
        if unequal:
            raise RuntimeError(f"{family}: {unequal} of {len(prompts)} prompts rendered "
                               f"differently by {name}")
    best = dict.fromkeys(paths, math.inf)
    for _ in range(repeats):
        for mode, fn in paths.items():
            gc.collect()
            t0 = time.process_time()
            for p in prompts:
                fn(p)
            best[mode] = min(best[mode], time.process_time() - t0)
    ms = {mode: cpu / len(prompts) * 1e3 for mode, cpu in best.items()}
    images = sum(isinstance(part, Image) for p in prompts for part in p.parts)
    out = {"family": family, "prompts": len(prompts), "images": images, "equal": True,
           "old_ms": ms["old"], "new_ms": ms["new"],
           "ratio": ms["new"] / ms["old"] if ms["old"] else None}
    if transformers:
        out["transformers_ms"] = ms["transformers"]
        out["ratio_vs_transformers"] = ms["new"] / ms["transformers"]
    return out


# ---------------------------------------------------------------- the bench


def run_parts(settings: PartsSettings, work_dir: Path | None = None,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure the three items old and new; their figures, totals and the issue's figures."""
    with tempfile.TemporaryDirectory(prefix="mics-bench-parts-") as tmp:
        where = Path(work_dir) if work_dir is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        progress("searching the loop workload with zero-latency simulated models")
        work = loop_workload(where, settings.replies, settings.prompts, settings.seed)
        progress(f"storing {settings.replies:,} replies, old and new")
        storing = measure_storing(where, work.puts, settings.puts_per_turn, settings.repeats)
        progress("gate primitives")
        gate = {str(t): measure_gate(t, settings.calls, settings.cap, settings.repeats)
                for t in settings.tasks}
        progress("rendering intern prompts")
        folders = template_folders(where)
        render = {"text": measure_render(folders["text"], "text", work.prompts,
                                         settings.repeats, transformers=True)}
        for family in ("qwen2-vl", "internvl"):
            render[family] = measure_render(folders[family], family,
                                            with_images(work.prompts), settings.repeats)
    store_row = storing["measured"]
    totals = {}
    for t, g in gate.items():
        old = store_row["old_ms"] + g["old_ms"] + render["text"]["old_ms"]
        new = store_row["new_ms"] + g["new_ms"] + render["text"]["new_ms"]
        # the same with the pre-issue-15 renderer (transformers) as the old one
        old_hf = old - render["text"]["old_ms"] + render["text"]["transformers_ms"]
        totals[t] = {"old_ms": old, "new_ms": new, "ratio": new / old if old else None,
                     "halved": new <= old / 2, "within_issue_goal": new <= GOAL_MS,
                     "old_transformers_ms": old_hf, "ratio_vs_transformers": new / old_hf}
    return {
        "settings": {**asdict(settings), "tasks": list(settings.tasks)},
        "search_questions": work.questions,
        "storing": storing,
        "gate": gate,
        "render": render,
        "total": totals,
        "issue_ms": {**ISSUE_MS, "total": ISSUE_TOTAL_MS},
        "goal_ms": GOAL_MS,
    }
