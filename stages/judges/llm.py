"""The LLM judge (``adjudicate.judge: openai``): one Chat Completions request per sample.

Works against any OpenAI-compatible endpoint (OpenAI, or a vLLM / SGLang server) through the
official ``openai`` client. The sample goes to the model as JSON inside the user message of a
versioned prompt template (``prompts/judge.v1.md``, :mod:`stages.judges.prompt`), plus, with
``visual: true``, the image with the boxes drawn (:mod:`stages.judges.draw`). The reply must
answer every entity and every candidate shown, with ids that were shown
(:mod:`stages.judges.reply`); anything else is a faulty reply.

Faults never stop the run: the openai client retries timeouts, connection errors, 429 and 5xx,
and a faulty reply is asked again, ``max_retries`` times in all (:mod:`stages.judges.client`);
after that the sample's candidates get the ``on_error`` fallback (the rules judge's verdict, or
reject) and the error is recorded with them. Requests run concurrently on one asyncio loop
(``concurrency`` in flight) behind the requests- and tokens-per-minute limiter
(:mod:`stages.judges.limits`): this judge's own, or one shared by all judge actors under Ray.

Answers are cached by (model, prompt hash, input hash) (:mod:`stages.judges.cache`), so a
resumed or repeated build never asks the same question twice.

The API key is read from the environment variable named by ``api_key_env`` when the client is
created and is never stored in a record, log row, journal or error text.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from stages.judges.cache import AnswerJournal, cache_key, load_answers
from stages.judges.client import Asker, Outcome
from stages.judges.draw import draw_candidates
from stages.judges.limits import Limiter, estimate_tokens, local_limiter
from stages.judges.prompt import Prompt, build_payload, load_prompt, payload_json
from stages.judges.reply import ReplyError, parse_reply, reply_schema
from stages.judges.rules import RULES_VERSION, RulesJudge, settle_claims

log = logging.getLogger("lookandlearn.judge")

# Reasons from the rules judge that settle a candidate without asking the LLM (mode: ambiguous);
# ``not_top_k`` is not among them: a good region that only lost on rank is the doubtful case.
CLEAR_REJECT_REASONS = ("low_det_score", "no_mask", "low_mask_score", "mask_too_small", "mask_too_large",
                        "mask_fills_little_of_box", "duplicate_mask")


@dataclass
class _Question:
    """One sample's question: prepared (CPU) before any request of the batch is sent."""
    record: dict
    rules: dict = field(default_factory=dict)       # the rules judge's verdicts (fallback, mode ambiguous)
    verdicts: dict = field(default_factory=dict)    # decided without asking (mode ambiguous)
    ask: list = field(default_factory=list)         # region ids to ask about
    shown: dict = field(default_factory=dict)       # {entity id: [region ids]} shown
    input_hash: str = ""
    key: str = ""
    outcome: Outcome | None = None                  # known before asking (cache hit, internal error)
    messages: list | None = None                    # set when this sample sends the request


def _spread(total: int, n: int) -> list[int]:
    base, extra = divmod(int(total), max(n, 1))
    return [base + (1 if i < extra else 0) for i in range(n)]


class OpenAIJudge:
    """LLM judge over an OpenAI-compatible Chat Completions endpoint (see the module doc)."""

    def __init__(self, config, cache_dirs=(), journal_dir: str | os.PathLike | None = None,
                 limiter: Limiter | None = None):
        self.config = config
        self.shared_limiter = limiter  # given: shared with other judges (the runner's, under Ray)
        self.model = config.model
        self.name = config.model
        self.cache_dirs = [Path(p) for p in cache_dirs]
        self.journal = AnswerJournal(journal_dir)
        self.rules = RulesJudge(config)
        self.prompt: Prompt | None = None
        self._answers: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asker: Asker | None = None
        self._own_limiter: Limiter | None = None

    # -- lifecycle --
    def setup(self) -> None:
        if self.prompt is None:
            self.prompt = load_prompt(self.config.prompt)
            self._answers = load_answers(self.cache_dirs)
            if self._answers:
                log.info("judge cache: %d earlier answers", len(self._answers))
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        # one INFO line per request (or retry) is too many; errors still show
        for name in ("httpx", "httpx2", "openai"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        if self._own_limiter is None and self.shared_limiter is None:
            self._own_limiter = local_limiter(self.config)
        limiter = self.shared_limiter or self._own_limiter
        if self._asker is None:
            self._asker = Asker(self.config, limiter)  # once per worker: connections are reused
        self._asker.limiter = limiter

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            if self._asker is not None:
                self._loop.run_until_complete(self._asker.close())
            self._loop.close()
        self._asker = None
        self.journal.close()

    # -- the Judge protocol --
    def judge(self, record: dict, image: bytes | None = None) -> dict[int, dict]:
        return self.judge_many([record], [image])[0]

    def judge_many(self, records: list[dict], images: list | None = None) -> list[dict[int, dict]]:
        if self.prompt is None or self._loop is None or self._loop.is_closed() or self._asker is None:
            self.setup()
        images = list(images) if images is not None else [None] * len(records)
        return self._loop.run_until_complete(self._judge_all(records, images))

    async def _judge_all(self, records, images):
        self._sem = asyncio.Semaphore(self.config.concurrency)
        self._inflight: dict[str, asyncio.Future] = {}
        # the CPU work first (rules, payloads, cache look-ups), then only the waiting on the network
        questions = [self._prepare(r, im) for r, im in zip(records, images)]
        answers = await asyncio.gather(*(self._answer(q) for q in questions))
        # one phrase per region holds whoever judged (the LLM sees each candidate on its own)
        return [settle_claims(r, v, self.config) if r["regions"] else v for r, v in zip(records, answers)]

    # -- one sample --
    def _verdict(self, accept: bool, reason: str, **extra) -> dict:
        return {"accept": bool(accept), "reason": reason, "judge": self.model, "prompt": self.prompt.name,
                "prompt_hash": self.prompt.hash, **extra}

    def _rules_verdict(self, rules: dict, **extra) -> dict:
        return {**rules, "decided_by": "rules", "prompt_hash": "", "input_hash": "", **extra}

    def _to_ask(self, record: dict, rules: dict[int, dict]) -> list[int]:
        if self.config.mode == "all":
            return [r["id"] for r in record["regions"]]
        by_entity: dict[int, list[dict]] = {}
        for region in record["regions"]:
            by_entity.setdefault(region["entity"], []).append(region)
        ask = []
        for regions in by_entity.values():
            survivors = [r for r in regions if rules[r["id"]]["accept"] or
                         rules[r["id"]]["reason"].split(":")[0] not in CLEAR_REJECT_REASONS]
            for region in survivors:
                clear_accept = (len(survivors) == 1 and rules[region["id"]]["accept"]
                                and region["det_score"] >= self.config.clear_det_score)
                if not clear_accept:
                    ask.append(region["id"])
        return ask

    def _prepare(self, record: dict, image: bytes | None) -> _Question:
        """Rules verdicts, what to ask, the question's cache key and (unless cached) its messages."""
        q = _Question(record=record)
        if not record["regions"]:
            return q
        try:
            q.rules = self.rules.judge(record)
        except Exception as exc:  # noqa: BLE001 - only the fallback and mode ambiguous need the rules
            q.rules = {r["id"]: {"accept": False, "reason": f"rules_failed: {type(exc).__name__}",
                                 "judge": "rules", "prompt": RULES_VERSION} for r in record["regions"]}
        try:
            q.ask = self._to_ask(record, q.rules)
            q.verdicts = {rid: self._rules_verdict(v) for rid, v in q.rules.items() if rid not in set(q.ask)}
            if not q.ask:
                return q
            payload, q.shown = build_payload(record, q.ask)
            text = payload_json(payload)
            visual = bool(self.config.visual and image is not None)
            q.input_hash = hashlib.sha256(json.dumps(
                {"payload": text, "image": record["image"]["sha256"] if visual else None}).encode()).hexdigest()[:24]
            q.key = cache_key(self.model, self.prompt.hash, q.input_hash)
            q.outcome = self._from_cache(q.key, q.shown)
            if q.outcome is None and q.key not in self._inflight:
                system, user = self.prompt.render(text)
                content = user
                if visual:
                    uri = draw_candidates(bytes(image), record, q.ask, self.config.image_max_side)
                    content = [{"type": "text", "text": user}, {"type": "image_url", "image_url": {"url": uri}}]
                q.messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
                # later copies of this question in the batch wait for this one's answer
                self._inflight[q.key] = asyncio.get_running_loop().create_future()
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the sample
            q.outcome = self._internal_error(record, exc)
            q.ask = list(q.rules)
        return q

    def _internal_error(self, record: dict, exc: Exception) -> Outcome:
        scrub = self._asker.scrub if self._asker is not None else str
        log.warning("judge: internal error on %s: %s", record.get("key"), scrub(exc))
        return Outcome(error_kind="internal", error=scrub(f"{type(exc).__name__}: {exc}")[:500])

    async def _answer(self, q: _Question) -> dict[int, dict]:
        if not q.ask:
            return q.verdicts
        try:
            outcome = q.outcome
            if outcome is None and q.messages is None:  # a copy: wait for the first one's answer
                first = await asyncio.shield(self._inflight[q.key])
                outcome = Outcome(parsed=first.parsed, raw=first.raw, cached=True) if first.parsed else first
            elif outcome is None:
                future = self._inflight[q.key]
                try:
                    outcome = await self._ask(q.messages, q.shown)
                    if outcome.parsed is not None:
                        self._remember(q.key, q.input_hash, outcome.raw)
                finally:
                    future.set_result(outcome if outcome is not None else Outcome(error_kind="internal"))
            return self._verdicts(q, outcome)
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the sample
            outcome = self._internal_error(q.record, exc)
            return {**q.verdicts, **{rid: self._fallback(q.rules[rid], outcome, input_hash=q.input_hash)
                                     for rid in q.ask}}

    def _verdicts(self, q: _Question, outcome: Outcome) -> dict[int, dict]:
        verdicts = dict(q.verdicts)
        n = len(q.ask)
        latency = [outcome.latency_ms / n] * n
        prompt_tokens = _spread(outcome.prompt_tokens, n)
        completion_tokens = _spread(outcome.completion_tokens, n)
        for i, rid in enumerate(q.ask):
            extra = {"input_hash": q.input_hash, "raw": outcome.raw, "cached": outcome.cached,
                     "attempts": outcome.attempts, "attempt_errors": ",".join(outcome.attempt_errors),
                     "latency_ms": latency[i], "prompt_tokens": prompt_tokens[i],
                     "completion_tokens": completion_tokens[i], "tokens": prompt_tokens[i] + completion_tokens[i]}
            if outcome.parsed is None:
                verdicts[rid] = self._fallback(q.rules[rid], outcome, **extra)
                continue
            answer = outcome.parsed[rid]
            if not answer["visual"]:
                accept, reason = False, f"llm_not_visual: {answer['reason']}"
            else:
                accept = answer["accept"]
                reason = f"{'llm_accept' if accept else 'llm_reject'}: {answer['reason']}"
            verdicts[rid] = self._verdict(accept, reason, decided_by="llm", visual=answer["visual"], **extra)
        return verdicts

    def _fallback(self, rules_verdict: dict, outcome: Outcome, **extra) -> dict:
        error = f"{outcome.error_kind}: {outcome.error}"
        attempts = f" after {outcome.attempts} attempts" if outcome.attempts else ""
        base = {"input_hash": "", **extra, "error": error, "prompt_hash": self.prompt.hash}
        if self.config.on_error == "rules":
            return {**rules_verdict, **base, "decided_by": "fallback_rules",
                    "reason": f"judge_error_fallback: {outcome.error_kind}{attempts}; rules: {rules_verdict['reason']}"}
        return {**self._verdict(False, f"judge_error: {outcome.error_kind}{attempts}"), **base,
                "decided_by": "fallback_reject"}

    def _from_cache(self, key: str, shown) -> Outcome | None:
        raw = self._answers.get(key)
        if raw is None:
            return None
        try:
            return Outcome(parsed=parse_reply(raw, shown), raw=raw, cached=True)
        except ReplyError:
            return None

    def _remember(self, key: str, input_hash: str, raw: str) -> None:
        self._answers[key] = raw
        self.journal.write(self.model, self.prompt.hash, input_hash, raw)

    # -- one question, with retries (stages.judges.client) --
    def _request_kwargs(self, messages: list, shown) -> dict:
        c = self.config
        kwargs = {"model": self.model, "messages": messages, "temperature": c.temperature,
                  "max_tokens": c.max_tokens}
        schema = reply_schema(shown)
        if c.response_format == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "judge_verdicts", "strict": True, "schema": schema}}
        elif c.response_format == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        elif c.response_format == "guided_json":  # vLLM < 0.10 guided decoding
            kwargs["extra_body"] = {"guided_json": schema}
        elif c.response_format == "structured_outputs":  # vLLM >= 0.10
            kwargs["extra_body"] = {"structured_outputs": {"json": schema}}
        return kwargs

    async def _ask(self, messages: list, shown) -> Outcome:
        kwargs = self._request_kwargs(messages, shown)
        estimate = estimate_tokens(messages, self.config.max_tokens)  # the reply's usage replaces it
        async with self._sem:
            return await self._asker.ask(kwargs, shown, estimate)
