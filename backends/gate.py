"""The one call gate every model call goes through.

key = hash(model identity, full prompt, image hashes, sampling, sample index)
  -> stored reply if the memo has it (resume and dedup for free)
  -> else join an identical call already in flight
  -> else wait for the endpoint's limiter, send, retry with bounded backoff
     (unless the endpoint's circuit breaker is open: then it fails at once)
  -> write the reply to the memo (committed) -> return it.
A call that still fails is recorded in the store and returned as a CallFailure, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio

from backends.base import (
    BackendError,
    Call,
    ChatModel,
    FatalError,
    RolloutModel,
    TransientError,
    http_requests,
)
from backends.keys import call_key
from backends.limits import CircuitBreaker, EndpointLimiter
from backends.memo_writer import MemoWriter
from mics.errors import RunError, Stopped
from mics.types import CallFailure, Reply

if TYPE_CHECKING:
    from mics.config import ModelConfig
    from mics.records import RunStore

    Model = ChatModel | RolloutModel  # what the gate calls: mentors and the judge, or interns


class StopRequested(Stopped):
    """A graceful stop was asked for: no new calls are sent; stored replies still answer."""


LOG = logging.getLogger("mics")
STOPPED = CallFailure(error="not sent: stopping", attempts=0, retryable=True)


class RunAborted(RunError):
    """An endpoint failed in a way no retry can fix (e.g. HTTP 401); the run stops, work kept."""


class CallGate:
    """Memoised, deduplicated, rate-limited, retried model calls backed by the run store."""

    def __init__(self, store: RunStore, *, session: str = "") -> None:
        self.store = store
        self.session = session
        self.counts: Counter[str] = Counter()  # sent / memo_hits / joined / failed / retries
        self.tokens = 0  # prompt + completion tokens of the replies stored by this session
        self._inflight: dict[str, asyncio.Event | None] = {}  # an Event once someone joins
        self._memo = MemoWriter(store)  # replies arriving together: one commit
        self._failures: dict[str, CallFailure] = {}
        self._endpoints: dict[int, _Endpoint] = {}  # id(model) -> what the gate keeps for it
        self.breakers_opened: list[str] = []  # endpoint names, in the order they opened
        self.on_breaker: Callable[[str, str], None] = _announce_breaker
        self.stopping = False

    @property
    def memo_commits(self) -> int:
        """Write transactions that stored this gate's replies (several replies can share one)."""
        return self._memo.commits

    @property
    def in_flight(self) -> Mapping[str, asyncio.Event | None]:
        """Call keys being sent now; the Event is made only once another caller joins."""
        return MappingProxyType(self._inflight)

    def stop(self) -> None:
        """Send no new calls from now on; calls in flight finish and are stored."""
        self.stopping = True

    def _endpoint(self, model: Model) -> _Endpoint:
        ep = self._endpoints.get(id(model))
        if ep is None or ep.model is not model:  # made on first use (it holds the model, so
            ep = self._endpoints[id(model)] = _Endpoint(model)  # the id is not reused)
        return ep

    def limiter(self, model: Model) -> EndpointLimiter:
        """The limiter that paces `model`'s endpoint (made on first use)."""
        return self._endpoint(model).limiter

    async def chat(
        self, model: ChatModel, call: Call, *, role: str, qid: str
    ) -> Reply | CallFailure:
        """One chat call (mentor or judge)."""
        [result] = await self._gated(model, [call], role=role, qid=qid)
        return result

    async def rollouts(
        self, model: RolloutModel, calls: Sequence[Call], *, qid: str
    ) -> list[Reply | CallFailure]:
        """A batch of intern rollouts; only calls not already stored are sent, as one batch."""
        return await self._gated(model, list(calls), role="intern", qid=qid)

    @staticmethod
    async def _send(model: Model, calls: list[Call], role: str) -> list[Reply | BackendError]:
        """Interns get one batch; chat models one call. Items may be per-call errors."""
        if role == "intern":
            return list(await model.rollout(calls))  # type: ignore[union-attr]  # an intern
        return [await model.complete(calls[0])]  # type: ignore[union-attr]  # a chat model

    async def _gated(
        self,
        model: Model,
        calls: list[Call],
        *,
        role: str,
        qid: str,
    ) -> list[Reply | CallFailure]:
        ep = self._endpoint(model)
        keys = [call_key(ep.identity, c) for c in calls]
        results: list[Reply | CallFailure | None] = [None] * len(calls)
        mine: list[int] = []
        waits: list[tuple[int, asyncio.Event]] = []
        for i, (key, stored) in enumerate(zip(keys, self.store.memo_get_many(keys),
                                              strict=True)):
            if stored is not None:
                results[i] = Reply.from_dict(stored)
                self.counts["memo_hits"] += 1
            elif key in self._inflight:
                event = self._inflight[key]
                if event is None:
                    event = self._inflight[key] = asyncio.Event()  # anyio runs on asyncio
                waits.append((i, event))
                self.counts["joined"] += 1
            elif self.stopping:
                results[i] = STOPPED  # the engine notices the stop and discards this depth
            else:
                self._inflight[key] = None
                mine.append(i)
        if mine:
            done = await self._send_with_retries(
                model, ep, [calls[i] for i in mine], [keys[i] for i in mine],
                role=role, qid=qid,
            )
            for i in mine:
                results[i] = done[keys[i]]
        for i, event in waits:
            await event.wait()
            stored = self.store.memo_get(keys[i])
            results[i] = (Reply.from_dict(stored) if stored is not None
                          else self._failures.get(keys[i], CallFailure("cancelled", 0, True)))
        return results  # type: ignore[return-value]

    async def _send_with_retries(
        self,
        model: Model,
        ep: _Endpoint,
        calls: list[Call],
        keys: list[str],
        *,
        role: str,
        qid: str,
    ) -> dict[str, Reply | CallFailure]:
        cfg = model.config
        done: dict[str, Reply | CallFailure] = {}
        history: dict[str, list[str]] = {key: [] for key in keys}
        pending = list(range(len(calls)))
        attempt = 0
        limiter, breaker = ep.limiter, ep.breaker
        try:
            while pending:
                if not breaker.allow():
                    error = (f"circuit open: endpoint {cfg.name} unreachable "
                             f"({breaker.failures} consecutive failures; last: "
                             f"{breaker.last_error})")
                    for i in pending:
                        history[keys[i]].append(error)
                        done[keys[i]] = self._fail(model, [keys[i]], role=role, qid=qid,
                                                   attempts=attempt, retryable=True,
                                                   history=history[keys[i]])
                    break
                attempt += 1
                outcome = await self._attempt_batch(model, limiter, [calls[i] for i in pending],
                                                    role)
                self._watch_health(model, breaker, outcome)
                failed: list[tuple[int, BackendError]] = []
                delivered: list[tuple[str, dict, dict]] = []
                for i, result in zip(pending, outcome, strict=True):
                    if isinstance(result, BackendError):
                        history[keys[i]].append(f"{type(result).__name__}: {result}")
                        failed.append((i, result))
                    else:  # delivered replies are stored now; only the failed ones go again
                        delivered.append(self._memo_entry(model, keys[i], result, role=role,
                                                          qid=qid, attempts=attempt,
                                                          errors=history[keys[i]]))
                        done[keys[i]] = result
                await self._store_replies(delivered)
                pending = []
                for i, e in failed:
                    if e.status == 429:
                        limiter.cool_down(self.backoff_delay(cfg, attempt, e.retry_after))
                    if isinstance(e, FatalError):
                        self._fail(model, [keys[i]], role=role, qid=qid, attempts=attempt,
                                   retryable=False, history=history[keys[i]])
                        raise RunAborted.from_error(e) from None
                    if not e.retryable or attempt > cfg.max_retries:
                        done[keys[i]] = self._fail(model, [keys[i]], role=role, qid=qid,
                                                   attempts=attempt, retryable=e.retryable,
                                                   history=history[keys[i]])
                    else:
                        pending.append(i)
                if pending:
                    self.counts["retries"] += len(pending)
                    wait = max((e.retry_after or 0.0 for _, e in failed), default=0.0) or None
                    await anyio.sleep(self.backoff_delay(cfg, attempt, wait))
            return done
        finally:
            for key in keys:
                event = self._inflight.pop(key)
                if event is not None:
                    event.set()

    async def _attempt_batch(self, model: Model, limiter: EndpointLimiter, calls: list[Call],
                             role: str) -> list[Reply | BackendError]:
        """One try: a Reply or the BackendError for each call (a raised error fails them all)."""
        try:
            async with limiter.slots:
                paced = role == "intern" and limiter.requests is not None  # a budget to keep
                await limiter.wait_turn(http_requests(model, calls) if paced else 1)
                self.counts["sent"] += len(calls)
                results = await self._send(model, calls, role)
            if len(results) != len(calls):
                raise TransientError(
                    f"{model.config.name}: {len(results)} replies for {len(calls)} calls")
        except BackendError as e:
            return [e] * len(calls)
        limiter.spend_tokens(sum(r.usage.prompt_tokens + r.usage.completion_tokens
                                 for r in results if isinstance(r, Reply)))
        return results

    def _watch_health(self, model: Model, breaker: CircuitBreaker,
                      outcome: list[Reply | BackendError]) -> None:
        """Feed the breaker: any reply closes it; connection failures and 5xx count."""
        if any(isinstance(r, Reply) for r in outcome):
            breaker.success()
            return
        seen: set[int] = set()
        for e in outcome:
            if not isinstance(e, BackendError) or id(e) in seen:
                continue
            seen.add(id(e))
            counts = e.retryable and (e.status is None or e.status >= 500)
            if counts and breaker.failure(f"{type(e).__name__}: {e}"):
                self.breakers_opened.append(model.config.name)
                self.on_breaker(model.config.name, breaker.last_error)

    @staticmethod
    def backoff_delay(cfg: ModelConfig, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt `attempt + 1`: jittered exponential backoff capped
        by max_backoff_s, or the server's Retry-After capped by max_rate_limit_wait_s."""
        delay = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter only affects timing, never decisions
        if retry_after is not None:  # the server's own wait may exceed max_backoff_s
            delay = max(delay, min(retry_after, cfg.max_rate_limit_wait_s))
        return delay

    def _memo_entry(self, model: Model, key: str, reply: Reply, *, role: str, qid: str,
                    attempts: int, errors: list[str]) -> tuple[str, dict, dict]:
        log = {"role": role, "model": model.config.name, "qid": qid, "session": self.session,
               "attempts": attempts, "errors": errors, "t": round(time.time(), 3)}
        self.tokens += reply.usage.prompt_tokens + reply.usage.completion_tokens
        return key, reply.to_dict(), log

    async def _store_replies(self, entries: list[tuple[str, dict, dict]]) -> None:
        """Commit delivered replies (grouped with others arriving now) before anyone uses them."""
        await self._memo.put(entries)

    def _fail(self, model: Model, keys: list[str], *, role: str, qid: str, attempts: int,
              retryable: bool, history: list[str]) -> CallFailure:
        error = history[-1]
        self.counts["failed"] += len(keys)
        self.store.add_failure({
            "kind": "call", "role": role, "model": model.config.name, "qid": qid,
            "keys": keys, "error": error, "attempts": attempts, "errors": history,
            "session": self.session, "t": round(time.time(), 3),
        })
        failure = CallFailure(error=error, attempts=attempts, retryable=retryable)
        for key in keys:
            self._failures[key] = failure
        return failure


class _Endpoint:
    """What the gate keeps per model: its identity (fixed once the model is built), the limiter
    that paces its endpoint and its circuit breaker."""

    __slots__ = ("breaker", "identity", "limiter", "model")

    def __init__(self, model: Model) -> None:
        self.model = model
        self.identity: dict[str, Any] = model.identity()
        self.limiter = EndpointLimiter(model.config)
        self.breaker = CircuitBreaker(model.config)


def _announce_breaker(name: str, last_error: str) -> None:
    """A warning on the "mics" logger: a library prints nothing itself (with no logging set
    up, Python's last-resort handler still writes it to stderr, as the CLI wants)."""
    LOG.warning("CIRCUIT BREAKER OPEN: endpoint %s is unreachable (last error: %s); no more "
                "calls go to it until a probe succeeds. Questions that need it are deferred.",
                name, last_error)
