"""The LLM judge's requests-per-minute and tokens-per-minute limits: a sliding window, exact.

Every HTTP attempt takes one request and its estimated tokens (:func:`estimate_tokens`: the
prompt's size plus ``max_tokens``, an upper bound of what the reply can use) from a
:class:`Limiter` before it is sent (``acquire``), and gives back its ticket once the attempt is
over (``settle``), with the tokens the server reported using when it did (the estimate is then
replaced by them). The limiter keeps a log of these entries; an entry counts against the limits
while its request is in flight and for ``window_s`` after it ended. The server receives a request
between its ``acquire`` and its ``settle``, so two requests it receives less than ``window_s``
apart both counted in the log at the later one's ``acquire``: the server never sees more than
the limits within any window (a sliding window, not a token bucket, which lets a full bucket
and its refill through in one window). Waiters are served in order (FIFO). For tokens this is
exact when the estimate is at least what the server counts (the fake judge server counts as
:func:`estimate_prompt_tokens` does); a server whose tokenizer counts more than characters / 4
can see a window go over by that difference until the replies' usage corrects the log.

The limit holds for everything that takes from one limiter: under the local executor that is
the one judge in the process; under Ray with several judge actors the runner puts one
:class:`SlidingWindowLimiter` in a Ray actor (``pipeline/shared_limits.py``) and hands each
judge an object with the same two methods that calls it, so the limits hold for all actors
together. This module never imports Ray.

Limits below one request or below the largest request's tokens per window cannot be kept
exactly: such a request is let through when nothing else is in the window.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

# The "minute" of requests_per_minute / tokens_per_minute, in seconds: the limits count within any
# window this long. Tests shorten it (read when a limiter is made).
WINDOW_S = 60.0
# Tokens counted for each image in a request (a high-detail 512x512 tile is 255 tokens in OpenAI's
# accounting; a 1024 px image, four tiles and a base of 85: 1105; 750 is the estimate used here).
IMAGE_TOKENS = 750


def estimate_prompt_tokens(messages: list) -> int:
    """Prompt tokens of Chat Completions ``messages``: their text's characters / 4 (rounded up)
    plus :data:`IMAGE_TOKENS` per image part."""
    chars, images = 0, 0
    for message in messages or []:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                chars += len(part.get("text") or "")
            elif part.get("type") == "image_url":
                images += 1
    return math.ceil(chars / 4) + IMAGE_TOKENS * images


def estimate_tokens(messages: list, max_tokens: int) -> int:
    """What one request may use at most: its prompt (:func:`estimate_prompt_tokens`) and a
    reply of ``max_tokens``. Counted before the request is sent."""
    return estimate_prompt_tokens(messages) + int(max_tokens)


class Limiter(Protocol):
    """What the judge takes its requests and tokens from (local, or shared through Ray)."""

    async def acquire(self, tokens: float) -> int:
        """Wait until one request of ``tokens`` fits in the limits; returns its ticket."""

    def settle(self, ticket: int, tokens: float | None = None) -> None:
        """The request of ``ticket`` is over (the first call says when); ``tokens``: what it used."""


class Unlimited:
    """The :class:`Limiter` without limits."""

    async def acquire(self, tokens: float) -> int:
        return 0

    def settle(self, ticket: int, tokens: float | None = None) -> None:
        pass


def local_limiter(config) -> Limiter:
    """The limiter of one judge on its own (the local executor, or a single Ray actor)."""
    settings = limiter_settings(config)
    return SlidingWindowLimiter(**settings) if settings else Unlimited()


def limiter_settings(config) -> dict | None:
    """The :class:`SlidingWindowLimiter` arguments for an ``adjudicate`` config; None without limits."""
    rpm, tpm = config.requests_per_minute, config.tokens_per_minute
    if not rpm and not tpm:
        return None
    return {"requests": rpm or None, "tokens": tpm or None, "window_s": float(WINDOW_S),
            "hold_s": max(60.0, 2 * float(config.timeout_s))}


@dataclass
class _Entry:
    ticket: int
    start: float
    tokens: float
    end: float | None = None   # None: in flight


class SlidingWindowLimiter:
    """At most ``requests`` requests and ``tokens`` tokens within any ``window_s`` seconds (None:
    no limit of that kind); see the module doc. An entry still in flight after ``hold_s`` (its
    ticket was never settled: a worker died) is taken as ended then. ``clock``: for tests."""

    def __init__(self, requests: float | None = None, tokens: float | None = None, window_s: float = 60.0,
                 hold_s: float = 600.0, clock=time.monotonic):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.requests, self.tokens = requests, tokens
        self.window_s, self.hold_s = float(window_s), float(hold_s)
        self.clock = clock
        self._log: deque[_Entry] = deque()
        self._by_ticket: dict[int, _Entry] = {}
        self._next = 0
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self._loop = None

    def _expires(self, entry: _Entry) -> float:
        end = entry.end if entry.end is not None else entry.start + self.hold_s
        return end + self.window_s

    def _prune(self, now: float) -> None:
        if any(self._expires(e) <= now for e in self._log):
            for entry in [e for e in self._log if self._expires(e) <= now]:
                self._by_ticket.pop(entry.ticket, None)
            self._log = deque(e for e in self._log if self._expires(e) > now)

    def used(self) -> tuple[int, float]:
        """Requests and tokens counted now."""
        self._prune(self.clock())
        return len(self._log), sum(e.tokens for e in self._log)

    def reserve(self, tokens: float) -> tuple[int | None, float]:
        """Take one request of ``tokens`` now if it fits: ``(ticket, 0.0)``; else ``(None, wait)``,
        ``wait`` the seconds until an entry expires (a settle may free room sooner)."""
        now = self.clock()
        self._prune(now)
        used_requests, used_tokens = len(self._log), sum(e.tokens for e in self._log)
        fits = ((self.requests is None or used_requests + 1 <= self.requests + 1e-9)
                and (self.tokens is None or used_tokens + tokens <= self.tokens + 1e-9))
        if fits or not self._log:  # an empty window lets even an oversized request through
            self._next += 1
            entry = _Entry(self._next, now, float(tokens))
            self._log.append(entry)
            self._by_ticket[entry.ticket] = entry
            return entry.ticket, 0.0
        return None, max(min(self._expires(e) for e in self._log) - now, 0.0)

    def settle(self, ticket: int, tokens: float | None = None) -> None:
        entry = self._by_ticket.get(ticket)
        if entry is None:
            return
        if entry.end is None:
            entry.end = self.clock()
        if tokens:
            entry.tokens = float(tokens)
        if self._changed is not None:
            self._changed.set()

    async def acquire(self, tokens: float) -> int:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives belong to one loop
            self._loop, self._lock, self._changed = loop, asyncio.Lock(), asyncio.Event()
        async with self._lock:  # FIFO: the first waiter is served first
            while True:
                self._changed.clear()
                ticket, wait = self.reserve(tokens)
                if ticket is not None:
                    return ticket
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=wait + 1e-3)
                except asyncio.TimeoutError:
                    pass
