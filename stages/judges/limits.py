"""Token buckets for the LLM judge's requests-per-minute and tokens-per-minute limits."""
from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """Token bucket: ``per_minute`` units per minute, bursts of up to ``burst`` (default one
    second's worth). ``acquire`` waits for its share; ``debit`` corrects an estimate afterwards
    (the level may go below zero, and later requests then wait longer)."""

    def __init__(self, per_minute: float | None, burst: float | None = None):
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = burst if burst else max(1.0, self.rate or 1.0)
        self.level = self.capacity
        self.updated = time.monotonic()
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float = 1.0) -> float:
        if self.rate is None:
            return 0.0
        if self._lock is None:
            self._lock = asyncio.Lock()
        waited = 0.0
        need = min(amount, self.capacity)  # a request bigger than a burst waits for a full bucket
        async with self._lock:  # FIFO: waiters are served in order
            while True:
                self._refill()
                if self.level >= need:
                    self.level -= amount
                    return waited
                delay = (need - self.level) / self.rate
                waited += delay
                await asyncio.sleep(delay)

    def debit(self, amount: float) -> None:
        if self.rate is not None and amount:
            self._refill()
            self.level -= amount
