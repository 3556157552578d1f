"""The LLM judge's rate limits for a whole Ray actor pool: one limiter actor that every judge
actor takes its requests and tokens from, so ``requests_per_minute`` / ``tokens_per_minute``
hold cluster-wide (``stages/judges/limits.py`` has the sliding window itself and the
``Limiter`` protocol the judge sees). The runner (``pipeline/runner.py``, the only module that
imports Ray) passes its ``ray`` module in; the judge actors get a :class:`_LimiterHandle` through
their constructor arguments and never see Ray.
"""
from __future__ import annotations

import uuid

from stages.adjudicate import AdjudicateStage
from stages.base import Stage
from stages.judges.limits import SlidingWindowLimiter, limiter_settings


class _SharedLimiter:
    """The judge's rate limits (``stages.judges.limits.SlidingWindowLimiter``) in one async Ray
    actor: every judge actor takes its requests and tokens from it, so they hold cluster-wide."""

    def __init__(self, settings: dict):
        self.limiter = SlidingWindowLimiter(**settings)

    async def acquire(self, tokens: float) -> int:
        return await self.limiter.acquire(tokens)

    async def settle(self, ticket: int, tokens: float | None = None) -> None:
        self.limiter.settle(ticket, tokens)


class _LimiterHandle:
    """What a judge actor holds of the shared limiter: the ``Limiter`` protocol over the actor handle."""

    def __init__(self, actor, name: str):
        self.actor, self.name = actor, name

    async def acquire(self, tokens: float) -> int:
        return await self.actor.acquire.remote(tokens)

    def settle(self, ticket: int, tokens: float | None = None) -> None:
        # not waited for: a settle that arrives late only keeps the entry in the window longer
        self.actor.settle.remote(ticket, tokens)


def shared_limiter(ray, stage: Stage) -> _LimiterHandle | None:
    """One limiter actor for a judge pool of several actors with rate limits (else None: a single
    judge keeps its own). It reserves no CPU; the build kills it at the end."""
    settings = limiter_settings(stage.config) if isinstance(stage, AdjudicateStage) else None
    if settings is None or stage.config.judge != "openai" or stage.resources.workers < 2:
        return None
    name = f"lookandlearn-judge-limits-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(_SharedLimiter).options(name=name, num_cpus=0, max_concurrency=1000).remote(settings)
    return _LimiterHandle(actor, name)
