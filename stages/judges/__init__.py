"""The judges: who decides whether a candidate region shows its phrase.

A judge is anything with the :class:`Judge` protocol; ``stages/adjudicate.py`` (the stage)
owns the bookkeeping around it. Two exist:

* ``rules`` (:mod:`stages.judges.rules`): deterministic thresholds, no model;
* ``openai`` (:mod:`stages.judges.llm`): an LLM over any OpenAI-compatible endpoint, a whole
  batch at once (``judge_many``: one request per sample, many in flight). Its parts: the prompt
  and payload (:mod:`~stages.judges.prompt`), the reply model (:mod:`~stages.judges.reply`),
  the boxes drawn for a multimodal judge (:mod:`~stages.judges.draw`), rate limits
  (:mod:`~stages.judges.limits`), the answer cache (:mod:`~stages.judges.cache`) and the
  client with its retries (:mod:`~stages.judges.client`).

:mod:`stages.judges.stats` sums the judge's log rows into the numbers of ``stats.json``.
The modules here import each other only downwards (``llm`` -> ``client`` -> ``reply``, ...);
none imports this package's ``__init__`` or the stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from stages.judges.cache import JOURNAL_DIR
from stages.judges.llm import OpenAIJudge
from stages.judges.rules import RULES_VERSION, RulesJudge

__all__ = ["Judge", "OpenAIJudge", "RULES_VERSION", "RulesJudge", "judge_batch", "make_judge"]


class Judge(Protocol):
    """Decides every candidate region of one sample.

    ``judge(record)`` returns ``{region_id: verdict}`` for every region in
    ``record["regions"]``, each verdict ``{"accept": bool, "reason": str, "judge": str,
    "prompt": str}``, plus optional log fields (``decided_by``, ``raw``, ``latency_ms``,
    ``tokens``, ``error``, ... see ``stages.adjudicate.LOG_FIELDS``) that go to the adjudication
    log but not into the shard. A verdict with ``"visual": False`` says the judge found the
    phrase not visual at all.

    ``judge_many(records, images)`` (optional) decides a whole batch at once (``images``: the
    stored image bytes of each record); the stage calls it once per batch when the judge has
    it (see :func:`judge_batch`).
    """

    name: str

    def setup(self) -> None: ...

    def judge(self, record: dict) -> dict[int, dict]: ...


def judge_batch(judge, records: list[dict], images: list | None = None) -> list[dict[int, dict]]:
    """``judge.judge_many`` when the judge has it, else ``judge.judge`` on each record."""
    many = getattr(judge, "judge_many", None)
    if many is not None:
        return many(records, images)
    return [judge.judge(record) for record in records]


def make_judge(config, out_dir=None, limiter=None) -> Judge:
    """The judge named by ``adjudicate.judge``; ``out_dir`` (the build's output folder) lets the
    LLM judge reuse answers already in its logs and journal its new ones there; ``limiter`` (a
    :class:`stages.judges.limits.Limiter` shared with other judges) replaces its own rate limits."""
    if config.judge == "rules":
        return RulesJudge(config)
    if config.judge == "openai":
        cache_dirs = ([out_dir] if out_dir else []) + list(config.cache_from)
        return OpenAIJudge(config, cache_dirs=cache_dirs,
                           journal_dir=Path(out_dir) / JOURNAL_DIR if out_dir else None, limiter=limiter)
    raise NotImplementedError(f"adjudicate.judge={config.judge!r} is not available; use 'rules' or 'openai'")
