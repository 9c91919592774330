"""Per-endpoint limits: concurrency, requests and tokens per minute, and a 429 cool-down."""

from __future__ import annotations

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
        self.slots = anyio.Semaphore(cfg.max_concurrency, fast_acquire=True)  # lighter than a
        # CapacityLimiter (no borrower tracking); fast_acquire: no checkpoint when a slot is free
        self.requests = _Bucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self.tokens = _Bucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self.cool_until = 0.0

    async def wait_turn(self) -> None:
        """Sleep through a cool-down and until the request and token budgets allow a call."""
        while True:
            delay = self.cool_until - time.monotonic()
            if self.requests:
                delay = max(delay, self.requests.wait_time(1.0))
            if self.tokens:
                delay = max(delay, self.tokens.wait_time(0.0))
            if delay <= 0:
                if self.requests:
                    self.requests.take(1.0)
                return
            await anyio.sleep(min(delay, 5.0))

    def spend_tokens(self, n: int) -> None:
        if self.tokens:
            self.tokens.take(float(n))

    def cool_down(self, seconds: float) -> None:
        """After a 429, pause the whole endpoint, not just the call that saw it."""
        self.cool_until = max(self.cool_until, time.monotonic() + seconds)
