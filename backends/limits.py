"""Per-endpoint limits: concurrency, requests and tokens per minute, and a 429 cool-down."""

from __future__ import annotations

import asyncio
import time

import anyio

from mics.config import ModelConfig


class _Bucket:
    """A token bucket refilled continuously at `per_minute`; may go negative (debt)."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, need: float) -> float:
        self._refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class EndpointLimiter:
    """Everything that paces calls to one configured endpoint."""

    def __init__(self, cfg: ModelConfig) -> None:
        # asyncio's own (anyio runs on its asyncio backend here): about half the CPU of anyio's
        # Semaphore (issue 15), and no checkpoint when a slot is free. Like its gate, a limiter
        # serves one event loop.
        self.slots = asyncio.Semaphore(cfg.max_concurrency)
        self.requests = _Bucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self.tokens = _Bucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self.cool_until = 0.0

    async def wait_turn(self, requests: int = 1) -> None:
        """Sleep through a cool-down and until the request and token budgets allow a call that
        sends `requests` HTTP requests (a batch sent one request per call counts each one; a
        batch larger than a minute's budget waits for the full budget and runs into debt)."""
        while True:
            delay = self.cool_until - time.monotonic()
            if self.requests:
                need = min(float(requests), self.requests.capacity)
                delay = max(delay, self.requests.wait_time(need))
            if self.tokens:
                delay = max(delay, self.tokens.wait_time(0.0))
            if delay <= 0:
                if self.requests:
                    self.requests.take(float(requests))
                return
            await anyio.sleep(min(delay, 5.0))

    def spend_tokens(self, n: int) -> None:
        if self.tokens:
            self.tokens.take(float(n))

    def cool_down(self, seconds: float) -> None:
        """After a 429, pause the whole endpoint, not just the call that saw it."""
        self.cool_until = max(self.cool_until, time.monotonic() + seconds)


class CircuitBreaker:
    """Per endpoint: after `breaker_after` consecutive connection failures or 5xx, stop sending.

    While open, calls fail at once (the engine defers their questions); after
    `breaker_cooldown_s` one probe call is let through, and a success closes the breaker.
    `breaker_after = 0` turns it off."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.threshold = cfg.breaker_after
        self.cooldown = cfg.breaker_cooldown_s
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False
        self.last_error = ""
        self.opened = 0  # how many times it opened this session

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def allow(self) -> bool:
        """Whether a call may be sent now (a probe when the cool-down is over)."""
        if self.open_until is None:
            return True
        if not self.probing and time.monotonic() >= self.open_until:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.open_until, self.probing = 0, None, False

    def failure(self, error: str) -> bool:
        """Count a connection failure or 5xx; True when this one opened the breaker."""
        self.last_error = error
        self.failures += 1
        was_open = self.open_until is not None
        if self.threshold and (self.failures >= self.threshold or self.probing):
            self.open_until = time.monotonic() + self.cooldown
            self.probing = False
            if not was_open:
                self.opened += 1
                return True
        return False
