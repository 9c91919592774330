"""The async MICS engine: one explicit tree per question, questions searched concurrently.

Within a depth all mentor calls run concurrently, then every intern sample of every candidate is
submitted together (one batch per intern), then the judge calls run concurrently. Decisions come
from `mics.policy`; every model call goes through the `CallGate`; nodes are stored as each depth
completes, so a replay against a full memo rebuilds the same tree without sending anything.

Scores you can train on: every intern sample is its own call (intern, temperature, sample
number); verdicts are cached per question under `answer_key` (case and whitespace only); with
`on_call_failure = "defer"` (the default) a depth with any call still failed after retries is
not decided: the question is stored "deferred" with its cause and resumed later, so a score
never depends on network luck; a mentor without a candidate has no score (None), never 0.0;
steps that state the answer are flagged, re-asked or rejected (`on_answer_leak`, mics.leaks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from backends.base import Call, ChatModel, RolloutModel, fan_out
from backends.gate import CallGate, StopRequested
from mics import policy
from mics.answers import answer_key
from mics.config import ConfigError, RunConfig
from mics.leaks import leaks_answer
from mics.prompts import intern_prompt, judge_prompt, mentor_prompt, parse_verdict
from mics.records import RunStore
from mics.steps import ParsedChain, count_steps, extract_final_answer, parse_chain
from mics.types import (
    NO_MODEL_STOPS,
    ROOT_TEXT,
    CallFailure,
    Node,
    Outcome,
    Prompt,
    Question,
    RecordError,
    Reply,
    Sample,
    Sampling,
    Text,
)

FINISHED = ("succeeded", "failed")
RETRYABLE = NO_MODEL_STOPS  # infrastructure failures: resume retries
DEFERRED = "deferred"  # status and stop reason of a question left undecided by a failed call
LEAK_REMINDER = ("\n\nReminder: your steps must not state or name the correct answer before "
                 "the final line `### The final answer is:`; reason towards it from the "
                 "findings instead.")


@dataclass
class Models:
    """The models of a run, in config order (the order matters for ties and call order)."""

    mentors: Sequence[ChatModel]
    interns: Sequence[RolloutModel]
    judge: ChatModel

    async def aclose(self) -> None:
        for m in (*self.mentors, *self.interns, self.judge):
            await m.aclose()

    def preflight(self) -> None:
        """Checks that need no call (an SGLang intern's chat template, say), made before a run
        directory is created; raises ConfigError naming the model."""
        for m in (*self.mentors, *self.interns, self.judge):
            check = getattr(m, "preflight", None)
            if check is not None:
                check()
        for role, group in (("mentors", self.mentors), ("interns", self.interns)):
            seen: dict[bytes, str] = {}
            for m in group:
                ident = orjson.dumps(m.identity(), option=orjson.OPT_SORT_KEYS)
                if ident in seen:  # the same memo keys: one model's replies, counted twice
                    raise ConfigError(
                        f"[[{role}]] {seen[ident]!r} and {m.config.name!r} are the same model "
                        "to the call memo (backend, model and reply options), so they would share "
                        "every reply and count each sample twice. Give them different options, "
                        "or ask one model for more samples ([search].samples_per_temperature)")
                seen[ident] = m.config.name


@dataclass
class _Proposal:
    mentor: str
    steps: list[str]
    chain: str
    parsed: ParsedChain
    first: int  # number of the first proposed step
    reused: bool
    usage: dict[str, Any] = field(default_factory=dict)
    reasked: bool = False  # asked again because the first reply leaked the answer


@dataclass
class _Tree:
    """Search state of one question's current attempt."""

    attempt: int
    prefix: str = ROOT_TEXT
    parent_id: str = ""
    author: str | None = None  # mentor of the currently selected node
    chains: dict[str, _Proposal] = field(default_factory=dict)
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # None: no candidate
    previous: list[str] = field(default_factory=list)
    verdicts: dict[str, str] = field(default_factory=dict)  # answer_key(answer) -> verdict
    call_failures: list[dict[str, str]] = field(default_factory=list)  # this depth's failed calls
    judge_errors: list[str] = field(default_factory=list)  # causes of "judge-failed" verdicts
    mentor_errors: dict[str, dict[str, str]] = field(default_factory=dict)  # depth -> mentor


class Engine:
    """Runs MICS over questions against a store; see module docstring."""

    def __init__(
        self,
        config: RunConfig,
        store: RunStore,
        models: Models,
        gate: CallGate,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.cfg = config
        self.search = config.search
        self.store = store
        self.models = models
        self.gate = gate
        self.on_done = on_done or (lambda _o: None)
        self.retry_qids: set[str] = set()  # finished questions to search again (--retry-failed)
        # one Sampling object per setting, shared by all its calls: a call key serializes each
        # object once (backends.keys)
        s = self.search
        self._mentor_sampling = Sampling(temperature=s.mentor_temperature, top_p=s.mentor_top_p,
                                         max_tokens=s.mentor_max_tokens)
        self._judge_sampling = Sampling(temperature=s.judge_temperature,
                                        max_tokens=s.judge_max_tokens)
        self._intern_samplings = tuple(self._intern_sampling(t) for t, _ in s.sample_plan())

    # ---- run level -------------------------------------------------------------------------

    async def run(self, items: Iterable[Question | RecordError], *, collect: bool = True
                  ) -> list[Outcome]:
        """Search every question not already finished; bad records are stored as failed.
        Outcomes are returned when `collect` (the store has them either way)."""
        outcomes: list[Outcome] = []
        slots = anyio.Semaphore(self.search.concurrency)

        async def one(q: Question) -> None:
            try:
                outcome = await self.search_question(q)
                if collect:
                    outcomes.append(outcome)
            except StopRequested:
                pass  # left "running": a resume replays it from the memo
            finally:
                slots.release()

        async with anyio.create_task_group() as tg:
            for item in items:
                if self.gate.stopping:
                    break
                if isinstance(item, RecordError):
                    failed = self._record_failed(item)
                    if collect:
                        outcomes.append(failed)
                    continue
                existing = self.store.get_question(item.qid)
                if (existing and existing["status"] in FINISHED and not existing.get("retryable")
                        and item.qid not in self.retry_qids):
                    continue
                await slots.acquire()
                if self.gate.stopping:
                    slots.release()
                    break
                tg.start_soon(one, item)
        return outcomes

    def _record_failed(self, err: RecordError) -> Outcome:
        outcome = Outcome(
            qid=err.qid, status="failed", stop_reason="bad_record", stage="input",
            error=err.message, details={"line": err.line, "field": err.field},
        )
        # keyed by line too: a bad record must never share a key with a valid question of the
        # same rid (a duplicate rid), or one of the two would hide the other
        record = {"status": "failed", "index": err.index, "stop_reason": "bad_record",
                  "outcome": outcome.to_dict()}
        self.store.put_question(f"{err.qid}@line{err.line}", record)
        self.on_done(outcome)
        return outcome

    # ---- question level --------------------------------------------------------------------

    async def search_question(self, q: Question) -> Outcome:
        """Grow one question's tree (fresh per question, B13) until a stop rule fires."""
        with self.store.transaction():  # one commit: the old tree out, the new one started
            self.store.delete_nodes(q.qid)
            self.store.put_question(q.qid, {"status": "running", "index": q.index,
                                            "question": q.to_dict()})
            self._put_root(q, 0)
        for attempt in range(self.search.restarts + 1):
            outcome, last = await self._attempt(q, attempt)
            if outcome.stop_reason != "all_zero" or attempt == self.search.restarts:
                break
            self.store.put_nodes(q.qid, last)
        outcome.details["attempts"] = attempt + 1
        with self.store.transaction():  # one commit: the deciding depth and the outcome
            self.store.put_nodes(q.qid, last)
            self.store.put_question(q.qid, {
                "status": outcome.status, "index": q.index, "question": q.to_dict(),
                "stop_reason": outcome.stop_reason,
                "retryable": outcome.stop_reason in (*RETRYABLE, DEFERRED),
                "outcome": outcome.to_dict(),
            })
        self.on_done(outcome)
        return outcome

    def _put_root(self, q: Question, attempt: int) -> None:
        root = Node(node_id=f"a{attempt}.root", parent_id=None, attempt=attempt, depth=-1,
                    mentor=None, step=ROOT_TEXT, prefix=ROOT_TEXT, chain=ROOT_TEXT, chosen=True)
        self.store.put_nodes(q.qid, [(root.node_id, root.to_dict())])

    async def _attempt(self, q: Question, attempt: int
                       ) -> tuple[Outcome, list[tuple[str, dict[str, Any]]]]:
        """One search from the root; the outcome and the deciding depth's nodes, which the
        caller stores (with the outcome, in one commit)."""
        rng = policy.question_rng(self.search.seed, q.qid, attempt)
        mentor_names = [m.config.name for m in self.models.mentors]
        tree = _Tree(attempt=attempt, scores={m: [] for m in mentor_names})
        if attempt:  # attempt 0's root is written as the question starts
            self._put_root(q, attempt)
        tree.parent_id = f"a{attempt}.root"
        for depth in range(self.search.max_depth):
            tree.call_failures = []
            nodes, mentor_errors = await self._depth(q, tree, depth)
            self._check_stop()
            if mentor_errors:
                tree.mentor_errors[str(depth + 1)] = mentor_errors
            if tree.call_failures and self.search.on_call_failure == "defer":
                return self._deferred(q, tree, depth), []
            by_mentor = {n.mentor: n for n in nodes}
            for m in mentor_names:
                tree.scores[m].append(by_mentor[m].score if m in by_mentor else None)
            scored = [policy.Scored(n.mentor or "", n.correct, n.total) for n in nodes]
            decision = policy.decide(scored, depth=depth, max_depth=self.search.max_depth,
                                     previous=tree.previous, past_scores=tree.scores, rng=rng)
            if decision.chosen:
                by_mentor[decision.chosen].chosen = True
            rows = [(n.node_id, n.to_dict()) for n in nodes]
            outcome = self._outcome(q, tree, depth, decision, by_mentor, mentor_errors)
            if outcome is not None:
                if tree.mentor_errors:  # mentors skipped along the way, with their causes
                    outcome.details["mentor_errors_by_depth"] = tree.mentor_errors
                return outcome, rows
            self.store.put_nodes(q.qid, rows)
            chosen = by_mentor[decision.chosen]  # type: ignore[index]
            tree.previous.append(chosen.mentor or "")
            tree.prefix, tree.parent_id, tree.author = chosen.prefix, chosen.node_id, chosen.mentor
        raise AssertionError("unreachable: the last depth always decides")

    async def _depth(self, q: Question, tree: _Tree, depth: int
                     ) -> tuple[list[Node], dict[str, str]]:
        """Propose and evaluate one depth's candidates: all mentors at once, then every
        intern sample of every candidate together, then the judge."""
        proposals, errors = await self._propose(q, tree, depth)
        self._check_stop()
        nodes = [self._node(q, tree, depth, p) for p in proposals]
        await self._evaluate(q, nodes, tree)
        return nodes, errors

    def _check_stop(self) -> None:
        """After a phase (no call of this question in flight): abandon it if stopping."""
        if self.gate.stopping:
            raise StopRequested

    def _outcome(self, q: Question, tree: _Tree, depth: int, decision: policy.Decision,
                 by_mentor: dict[str | None, Node], mentor_errors: dict[str, str]
                 ) -> Outcome | None:
        scores = {m: list(s) for m, s in tree.scores.items()}
        if decision.kind in ("full_score", "max_depth"):
            best = by_mentor[decision.chosen]
            return Outcome(
                qid=q.qid, status="succeeded", stop_reason=decision.kind, reasoning=best.chain,
                scores=scores, final_depth=depth + 1,
                generated_by=[*tree.previous, decision.chosen or ""],
                search_id="1" if decision.kind == "full_score" else "0",
                details={"node": best.node_id},
            )
        if decision.kind == "all_zero" and (cause := self._infra_cause(tree, by_mentor, depth)):
            cause.qid, cause.scores = q.qid, scores
            return cause
        if decision.kind == "all_zero":
            return Outcome(qid=q.qid, status="failed", stop_reason="all_zero", stage="search",
                           error="All mentor scores are zero.", scores=scores,
                           final_depth=depth + 1, details={"depth": depth})
        if decision.kind == "no_candidates":
            return Outcome(qid=q.qid, status="failed", stop_reason="no_mentor", stage="mentor",
                           error=f"no mentor produced a valid step at depth {depth + 1}",
                           scores=scores, final_depth=depth + 1,
                           details={"depth": depth, "mentor_errors": mentor_errors})
        return None

    @staticmethod
    def _deferred(q: Question, tree: _Tree, depth: int) -> Outcome:
        """Undecided: calls of this depth still failed after retries; `mics resume` sends
        exactly those (every other call of the depth is in the memo)."""
        failures = tree.call_failures
        models = sorted({f["model"] for f in failures})
        first = failures[0]
        return Outcome(
            qid=q.qid, status=DEFERRED, stop_reason=DEFERRED, stage=first["role"],
            error=f"{len(failures)} call(s) to {', '.join(models)} failed at depth {depth + 1}: "
                  f"{first['error']}",
            scores={m: list(s) for m, s in tree.scores.items()}, final_depth=depth + 1,
            details={"depth": depth, "endpoints": models, "failures": failures[:20]})

    def _infra_cause(self, tree: _Tree, by_mentor: dict[str | None, Node], depth: int
                     ) -> Outcome | None:
        """All-zero only because every intern call or every judge call failed: say which."""
        samples = [s for n in by_mentor.values() for s in n.samples]
        verdicts = {s.verdict for s in samples}
        if verdicts == {"call-failed"}:
            errors = {s.intern: s.usage.get("error", "") for s in samples}
            return Outcome(qid="", status="failed", stop_reason="no_intern", stage="intern",
                           error=f"every intern call failed at depth {depth + 1}",
                           final_depth=depth + 1, details={"depth": depth, "errors": errors})
        judge_failed = {"judge-failed", "unparsable"}
        if verdicts & judge_failed and verdicts <= {*judge_failed, "call-failed", "no-answer"}:
            return Outcome(qid="", status="failed", stop_reason="no_judge", stage="judge",
                           error=f"the judge ({self.models.judge.config.name}) failed at depth "
                                 f"{depth + 1}", final_depth=depth + 1,
                           details={"depth": depth, "errors": sorted(set(tree.judge_errors))})
        return None

    # ---- mentors ---------------------------------------------------------------------------

    async def _propose(self, q: Question, tree: _Tree, depth: int
                       ) -> tuple[list[_Proposal], dict[str, str]]:
        """Every mentor proposes the next step(s) concurrently; results in mentor order."""
        results: list[_Proposal | str | None] = [None] * len(self.models.mentors)

        prompt = mentor_prompt(q, tree.prefix, self.cfg.prompts)  # the same for every mentor

        async def one(i: int, mentor: ChatModel) -> None:
            results[i] = await self._propose_one(q, tree, depth, mentor, prompt)

        await fan_out([one(i, mentor) for i, mentor in enumerate(self.models.mentors)])
        proposals = [r for r in results if isinstance(r, _Proposal)]
        errors = {m.config.name: r for m, r in zip(self.models.mentors, results, strict=True)
                  if isinstance(r, str)}
        for p in proposals:
            tree.chains[p.mentor] = p
        return proposals, errors

    async def _propose_one(self, q: Question, tree: _Tree, depth: int, mentor: ChatModel,
                           prompt: Prompt) -> _Proposal | str:
        name = mentor.config.name
        first = count_steps(tree.prefix) + 1
        need = policy.root_step_count(depth, self.search.root_steps)
        cached = tree.chains.get(name)
        leak_rule = self.search.on_answer_leak
        if (self.search.reuse_cached_step and depth > 0 and name == tree.author
                and cached is not None):
            steps = cached.parsed.run(first, need)
            # a real next "### Step", never the final line (B3); a leaking cached step is asked
            # afresh unless leaks are only flagged
            if steps is not None and (leak_rule == "flag" or not self._leaks(q, steps)):
                return _Proposal(name, steps, cached.chain, cached.parsed, first, reused=True)
        sampling = self._mentor_sampling
        tries = self.search.mentor_malformed_retries + 1
        error = ""
        for k in range(tries):
            index = tree.attempt * tries + k
            reply = await self.gate.chat(mentor, Call(prompt, sampling, index), role="mentor",
                                         qid=q.qid)
            if isinstance(reply, CallFailure):
                return self._call_failed(tree, "mentor", name, reply)
            if reply.finish_reason == "length":  # cut off: a half-written step, no answer
                error = ("reply cut off at the output limit (finish \"length\"): raise "
                         "[search].mentor_max_tokens or the model's options.max_tokens")
                continue
            parsed = parse_chain(reply.text)
            steps = parsed.run(first, need)  # echoed earlier steps are ignored (B4)
            if steps is None:
                error = f"reply has no '### Step {first}'" + (
                    f" to '### Step {first + need - 1}'" if need > 1 else "")
                continue
            reasked = False
            if leak_rule == "reask" and self._leaks(q, steps):
                again = Prompt(prompt.system, (*prompt.parts, Text(LEAK_REMINDER)))
                retry = await self.gate.chat(mentor, Call(again, sampling, index),
                                             role="mentor", qid=q.qid)
                if isinstance(retry, CallFailure):
                    return self._call_failed(tree, "mentor", name, retry)
                reparsed = parse_chain(retry.text)
                resteps = None if retry.finish_reason == "length" else reparsed.run(first, need)
                if resteps is not None:
                    reply, parsed, steps, reasked = retry, reparsed, resteps, True
            if leak_rule == "reject" and self._leaks(q, steps):
                error = f"'### Step {first}' states the correct answer (on_answer_leak = reject)"
                continue
            chain = f"{tree.prefix}{self.search.joiner}{parsed.continuation(first)}"
            return _Proposal(name, steps, chain, parsed, first, reused=False,
                             usage=_usage(reply), reasked=reasked)
        return f"malformed after {tries} tries: {error}"

    @staticmethod
    def _leaks(q: Question, steps: list[str]) -> bool:
        return any(leaks_answer(s, q.gt_answer) for s in steps)

    @staticmethod
    def _call_failed(tree: _Tree, role: str, model: str, failure: CallFailure) -> str:
        """Record a call that still failed after retries; the mentor error text."""
        tree.call_failures.append({"role": role, "model": model, "error": failure.error})
        return f"call failed after {failure.attempts} attempt(s): {failure.error}"

    def _node(self, q: Question, tree: _Tree, depth: int, p: _Proposal) -> Node:
        step = "\n\n".join(p.steps)  # two root steps: a blank line, as the reference
        return Node(
            node_id=f"a{tree.attempt}.d{depth}.{p.mentor}", parent_id=tree.parent_id,
            attempt=tree.attempt, depth=depth, mentor=p.mentor, step=step,
            prefix=f"{tree.prefix}{self.search.joiner}{step}", chain=p.chain, reused=p.reused,
            usage={"mentor": p.usage} if p.usage else {},
            leaks_answer=self._leaks(q, p.steps),
            reasked=p.reasked,
        )

    # ---- interns and judge -----------------------------------------------------------------

    async def _evaluate(self, q: Question, nodes: list[Node], tree: _Tree) -> None:
        """All intern samples of all candidates at once, then the judge, then the scores."""
        verdicts = tree.verdicts
        plan = self.search.sample_plan()
        replies: dict[tuple[int, int, int], Reply | CallFailure] = {}

        # one immutable prompt per candidate, the same for every intern (B9: nothing is
        # spliced into a shared question)
        prompts = [intern_prompt(q, node.prefix, self.cfg.prompts) for node in nodes]

        async def intern_batch(j: int, intern: RolloutModel) -> None:
            calls, slots = [], []
            for n_i, prompt in enumerate(prompts):
                for t_i, (_temp, number) in enumerate(plan):
                    calls.append(Call(prompt, self._intern_samplings[t_i], number))
                    slots.append((n_i, j, t_i))
            got = await self.gate.rollouts(intern, calls, qid=q.qid) if calls else []
            replies.update(zip(slots, got, strict=True))

        await fan_out([intern_batch(j, intern) for j, intern in enumerate(self.models.interns)])

        answers = await self._judge_all(q, replies, tree)
        for n_i, node in enumerate(nodes):
            for j, intern in enumerate(self.models.interns):
                for t_i, (temp, number) in enumerate(plan):
                    slot = (n_i, j, t_i)
                    reply = replies[slot]
                    self._note_failure(tree, intern.config.name, reply)
                    node.samples.append(self._sample(intern.config.name, temp, reply, verdicts,
                                                     number, answers.get(slot)))
        self._tally(nodes, tree)

    @staticmethod
    def _note_failure(tree: _Tree, intern: str, reply: Reply | CallFailure) -> None:
        if isinstance(reply, CallFailure):
            tree.call_failures.append({"role": "intern", "model": intern, "error": reply.error})

    @staticmethod
    def _tally(nodes: list[Node], tree: _Tree) -> None:
        for node in nodes:
            node.total = len(node.samples)
            node.correct = sum(s.correct for s in node.samples)
        for norm in [n for n, v in tree.verdicts.items() if v in ("judge-failed", "unparsable")]:
            del tree.verdicts[norm]  # a failed judge call is tried again later

    def _intern_sampling(self, temp: float) -> Sampling:
        return Sampling(temperature=temp, top_p=self.search.intern_top_p,
                        top_k=self.search.intern_top_k, max_tokens=self.search.intern_max_tokens)

    async def _judge_all(self, q: Question, replies: dict[Any, Reply | CallFailure],
                         tree: _Tree) -> dict[Any, tuple[str, str]]:
        """Judge each distinct answer once per question: the cache is keyed by the question
        (and so the ground truth) and `answer_key` (case and whitespace only), so two answers a
        judge could tell apart never share a verdict. Of answers sharing a key, the smallest
        string is the one judged, whatever order the replies came in. Fills `tree.verdicts`;
        returns each reply's (final answer, answer_key) by slot (none: no final answer)."""
        verdicts = tree.verdicts
        answers: dict[str, str] = {}
        parsed: dict[Any, tuple[str, str]] = {}
        for slot, reply in replies.items():
            if isinstance(reply, Reply):
                ans = extract_final_answer(reply.text)
                if ans is None:
                    continue
                key = parsed[slot] = (ans, answer_key(ans))
                if key[1] not in verdicts:
                    answers[key[1]] = min(answers.get(key[1], ans), ans)

        async def judge_one(norm: str, ans: str) -> None:
            verdicts[norm], error = await self._judge(q, ans)
            if error:
                tree.judge_errors.append(error)
                tree.call_failures.append({"role": "judge", "model": self.models.judge.config.name,
                                           "error": error})

        await fan_out([judge_one(norm, answers[norm]) for norm in sorted(answers)])
        return parsed

    async def _judge(self, q: Question, answer: str) -> tuple[str, str | None]:
        """Yes/no from the first word (B11); judge usage is accounted from the call log."""
        sampling = self._judge_sampling
        prompt = judge_prompt(q, answer, self.cfg.prompts)
        text = ""
        for index in range(2):  # an unparsable verdict is asked once more
            reply = await self.gate.chat(self.models.judge, Call(prompt, sampling, index),
                                         role="judge", qid=q.qid)
            if isinstance(reply, CallFailure):
                return "judge-failed", reply.error
            verdict = parse_verdict(reply.text)
            if verdict is not None:
                return ("yes" if verdict else "no"), None
            text = reply.text
        # no verdict is not a "no": the judge failed, and the depth waits (on_call_failure)
        return "unparsable", (f"the judge's reply is neither Yes nor No (asked twice): "
                              f"{' '.join(text.split())[:80]!r}")

    @staticmethod
    def _sample(intern: str, temp: float, reply: Reply | CallFailure,
                verdicts: dict[str, str], number: int = 0,
                parsed: tuple[str, str] | None = None) -> Sample:
        """One intern sample; `parsed` is the reply's (final answer, answer_key), None when it
        has no final answer (as `_judge_all` found)."""
        if isinstance(reply, CallFailure):
            return Sample(intern, temp, None, None, False, "call-failed",
                          {"error": reply.error}, number)
        usage = {"intern": _usage(reply)}
        if parsed is None:
            return Sample(intern, temp, None, reply.text, False, "no-answer", usage, number)
        answer, key = parsed
        verdict = verdicts[key]
        return Sample(intern, temp, answer, reply.text, verdict == "yes", verdict, usage, number)


def _usage(reply: Reply) -> dict[str, Any]:
    u = reply.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens, "latency_s": u.latency_s}
