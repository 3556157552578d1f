"""Asking the LLM one question: the ``openai`` client, its HTTP retries and the reply retries.

HTTP faults (timeouts, connection errors, 429, 5xx) are retried by the openai client itself,
built with ``max_retries`` and ``timeout_s`` (per attempt). It is subclassed only to hook into
its retry loop, through four of its (private) methods:

* ``_calculate_retry_timeout``: how long to wait before a retry. The manifest decides, as before:
  the server's ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date) when it is at most
  ``max_retry_after_s``, else ``backoff_s`` doubling per attempt (up to ``max_backoff_s``, minus
  up to 25% jitter). The failed attempt's kind is recorded here (from the error being handled);
* ``_prepare_request``: runs before every HTTP attempt, retries included: each takes one request
  and its estimated tokens from the limiter (:mod:`stages.judges.limits`) and is counted;
* ``_send_request``: the attempt itself; when it is over (a reply, or an error) its limiter ticket
  is settled (also in ``_calculate_retry_timeout`` and after the last attempt, for openai
  versions without this method);
* ``_should_retry``: the client's rule (408, 409, 429, 5xx, its ``x-should-retry`` header), and
  also a 429/5xx whose ``Retry-After`` is longer than the client would wait (after the backoff).

A reply that arrives but is no valid answer (malformed JSON, wrong ids, empty, cut at
``max_tokens``, a refusal) is asked again by :meth:`Asker.ask`, after the same backoff and from
the same budget: at most ``max_retries + 1`` HTTP requests per question in all.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from email.utils import mktime_tz, parsedate_tz
from functools import lru_cache

from stages.judges.limits import Limiter
from stages.judges.reply import ReplyError, parse_reply

log = logging.getLogger("lookandlearn.judge")

# Faults of a reply that did arrive: asked again by Asker.ask (HTTP faults are the client's).
REPLY_RETRYABLE = ("malformed_json", "invalid_reply", "truncated", "refusal", "empty_reply")


@dataclass
class Outcome:
    """What asking one question gave: a parsed reply, or the error after the last attempt."""
    parsed: dict[int, dict] | None = None
    raw: str = ""
    error_kind: str = ""
    error: str = ""
    attempts: int = 0                                        # HTTP requests sent, the client's retries included
    attempt_errors: list[str] = field(default_factory=list)  # the kind of each failed one, in order
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cached: bool = False


class AttemptError(Exception):
    def __init__(self, kind: str, message: str, raw: str = "", usage: tuple[int, int] = (0, 0)):
        super().__init__(message)
        self.kind = kind
        self.raw = raw
        self.usage = usage


@dataclass
class _Question:
    """The question being asked in this asyncio task (a context variable): what the client's hooks see."""
    config: object
    limiter: Limiter
    estimate: float
    attempts: int = 0
    ticket: int | None = None  # the limiter's ticket of the latest attempt
    errors: list[str] = field(default_factory=list)


_ASKING: ContextVar[_Question | None] = ContextVar("lookandlearn_judge_question", default=None)


def backoff(config, attempt: int, retry_after: float | None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
    if retry_after is not None and retry_after <= config.max_retry_after_s:
        return retry_after
    base = min(config.backoff_s * (2 ** attempt), config.max_backoff_s)
    return base * (1 - 0.25 * random.random())


def retry_after_seconds(headers) -> float | None:
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = parsedate_tz(value) if divisor == 1.0 else None
            if parsed is None:
                continue
            seconds = mktime_tz(parsed) - time.time()
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def status_kind(status: int) -> str:
    return ("rate_limit" if status == 429 else "server_error" if status >= 500 or status in (408, 409)
            else "auth" if status in (401, 403) else "bad_request")


def _failed_attempt_kind(exc: BaseException | None) -> str:
    """The kind of an HTTP attempt the client is about to retry, from the error it is handling
    (an httpx/httpx2 status error, timeout or other transport error)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status_kind(status)
    if exc is not None and any(c.__name__ in ("TimeoutException", "TimeoutError") for c in type(exc).__mro__):
        return "timeout"
    return "connection"


@lru_cache(maxsize=None)
def _client_class():
    from openai import AsyncOpenAI

    class JudgeClient(AsyncOpenAI):
        """``AsyncOpenAI`` whose retries wait as the manifest says and are recorded (module doc)."""

        async def _prepare_request(self, request) -> None:
            await super()._prepare_request(request)
            question = _ASKING.get()
            if question is not None:
                _settle(question)  # the previous attempt (if any) is over
                question.ticket = await question.limiter.acquire(question.estimate)
                question.attempts += 1

        async def _send_request(self, request, **kwargs):
            try:
                return await super()._send_request(request, **kwargs)
            finally:  # the server has had the request by now, or never will
                question = _ASKING.get()
                if question is not None:
                    _settle(question)

        def _should_retry(self, response) -> bool:
            if super()._should_retry(response):
                return True
            # the client gives up when a Retry-After is over its own limit (2 minutes in openai 3.x);
            # the judge retries such a 429/5xx after its normal backoff instead (max_retry_after_s)
            return (_ASKING.get() is not None and response.headers.get("x-should-retry") != "false"
                    and status_kind(response.status_code) in ("rate_limit", "server_error"))

        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
            question = _ASKING.get()
            if question is None:
                return super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            _settle(question)
            kind = _failed_attempt_kind(sys.exc_info()[1])
            question.errors.append(kind)
            delay = backoff(question.config, question.attempts - 1, retry_after_seconds(response_headers))
            log.debug("judge: %s (attempt %d), retrying in %.2fs", kind, question.attempts, delay)
            return delay

    return JudgeClient


def _settle(question: _Question, tokens: float | None = None) -> None:
    """Tell the limiter the latest attempt is over (the first call says when; later ones can only
    give the tokens the server reported)."""
    if question.ticket is not None:
        question.limiter.settle(question.ticket, tokens)


class Asker:
    """One openai client (its connections reused) and the asking of one question with it."""

    def __init__(self, config, limiter: Limiter):
        self.config = config
        self.limiter = limiter
        self.secret = os.environ.get(config.api_key_env) or "EMPTY"  # vLLM/SGLang accept any key
        if self.secret == "EMPTY":
            log.warning("judge: $%s is not set; sending a dummy API key (fine for a vLLM/SGLang server "
                        "started without --api-key)", config.api_key_env)
        self.client = _client_class()(api_key=self.secret, base_url=config.base_url,
                                      max_retries=config.max_retries, timeout=config.timeout_s)
        # copies with a smaller retry budget (after a bad reply) share the client's connections
        self._by_budget = {config.max_retries: self.client}

    def scrub(self, text) -> str:
        text = str(text)
        if self.secret != "EMPTY":
            text = text.replace(self.secret, "***")
        return text

    async def close(self) -> None:
        await self.client.close()

    def _client_for(self, retries: int):
        if retries not in self._by_budget:
            self._by_budget[retries] = self.client.with_options(max_retries=retries)
        return self._by_budget[retries]

    async def ask(self, kwargs: dict, shown: dict[int, list[int]], estimate: float) -> Outcome:
        """Ask until a valid reply or the budget is spent; never raises for a fault of the server."""
        c = self.config
        outcome = Outcome()
        question = _Question(c, self.limiter, estimate)
        context = _ASKING.set(question)
        started = time.perf_counter()
        tries = 0
        try:
            while True:
                tries += 1
                try:
                    try:
                        raw, usage = await self._request(self._client_for(c.max_retries - question.attempts), kwargs)
                    except AttemptError as exc:
                        _settle(question, sum(exc.usage))
                        raise
                    _settle(question, sum(usage))  # the estimate is replaced by what the server counted
                    outcome.prompt_tokens += usage[0]
                    outcome.completion_tokens += usage[1]
                    outcome.raw = raw
                    try:
                        outcome.parsed = parse_reply(raw, shown)
                    except ReplyError as exc:
                        raise AttemptError(exc.kind, exc.detail, raw=raw) from None
                    outcome.error_kind = outcome.error = ""
                    break
                except AttemptError as exc:
                    outcome.prompt_tokens += exc.usage[0]
                    outcome.completion_tokens += exc.usage[1]
                    question.errors.append(exc.kind)
                    outcome.error_kind, outcome.error = exc.kind, self.scrub(exc)[:500]
                    if exc.raw:
                        outcome.raw = self.scrub(exc.raw)
                    if exc.kind not in REPLY_RETRYABLE or max(question.attempts, tries) > c.max_retries:
                        break
                    delay = backoff(c, question.attempts - 1, None)
                    log.debug("judge: %s (attempt %d), retrying in %.2fs", exc.kind, question.attempts, delay)
                    await asyncio.sleep(delay)
        finally:
            _ASKING.reset(context)
        outcome.latency_ms = (time.perf_counter() - started) * 1000
        outcome.attempts, outcome.attempt_errors = question.attempts, question.errors
        if outcome.parsed is None:
            log.warning("judge: giving up after %d attempts: %s: %s", outcome.attempts, outcome.error_kind, outcome.error)
        return outcome

    async def _request(self, client, kwargs: dict) -> tuple[str, tuple[int, int]]:
        """One ``chat.completions.create`` (the client's own retries inside): the reply text and
        token usage, or :class:`AttemptError` with the kind of the last failure."""
        import openai

        try:
            response = await client.chat.completions.create(**kwargs)
        except openai.APITimeoutError:
            raise AttemptError("timeout", f"no reply within {self.config.timeout_s}s") from None
        except openai.APIConnectionError as exc:
            raise AttemptError("connection", self.scrub(f"{type(exc).__name__}: {exc}")) from None
        except openai.APIStatusError as exc:
            raise AttemptError(status_kind(exc.status_code),
                               self.scrub(f"HTTP {exc.status_code}: {exc.message}")[:300]) from None
        except openai.APIResponseValidationError as exc:
            raise AttemptError("malformed_json", self.scrub(exc)) from None
        except ValueError as exc:  # a 200 whose body is not JSON (a proxy's HTML page, ...)
            raise AttemptError("malformed_json", f"response body: {self.scrub(exc)}"[:300]) from None
        usage = response.usage
        tokens = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
        if not response.choices:
            raise AttemptError("empty_reply", "no choices", usage=tokens)
        choice = response.choices[0]
        message = choice.message
        if getattr(message, "refusal", None):
            raise AttemptError("refusal", self.scrub(message.refusal)[:300], usage=tokens)
        if choice.finish_reason == "length":
            raise AttemptError("truncated", f"reply cut at max_tokens={self.config.max_tokens}",
                               raw=message.content or "", usage=tokens)
        return message.content or "", tokens
