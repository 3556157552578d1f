"""The LLM judge (``adjudicate.judge: openai``): one Chat Completions request per sample.

Works against any OpenAI-compatible endpoint (OpenAI, or a vLLM / SGLang server) through the
official ``openai`` client. The sample goes to the model as JSON inside the user message of a
versioned prompt template (``prompts/judge.v1.md``): the caption (or assistant turn), every
entity that has candidates, and per candidate its id, normalised box, position words, detector
score and mask share (plus, with ``visual: true``, the image with the boxes drawn). The reply
must be JSON that answers every entity (``visual``) and every candidate shown (``accept`` +
``reason``) with ids that were shown; anything else is a faulty reply.

Faults never stop the run: timeouts, connection errors, 429 / 5xx and faulty replies are
retried ``max_retries`` times with backoff (``Retry-After`` / ``retry-after-ms`` honoured);
after that the sample's candidates get the ``on_error`` fallback (the rules judge's verdict,
or reject) and the error is recorded with them. Requests run concurrently on one asyncio loop
(``concurrency`` in flight) behind token buckets for requests and tokens per minute.

Answers are cached by (model, prompt hash, input hash): read back from ``OUT/logs`` and from
the answer journal ``OUT/cache/judge-answers-*.jsonl`` (appended as answers arrive, so even a
killed build's unfinished shard is not asked again), so a resumed or repeated build never asks
the same question twice.

The API key is read from the environment variable named by ``api_key_env`` when the client is
created and is never stored in a record, log row, journal or error text.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from email.utils import mktime_tz, parsedate_tz
from pathlib import Path

from stages.adjudicate import RulesJudge, RULES_VERSION
from stages.record import entity_text

log = logging.getLogger("lookandlearn.judge")

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
JOURNAL_DIR = "cache"
JOURNAL_GLOB = "judge-answers-*.jsonl"
MAX_REASON_CHARS = 200
# Reasons from the rules judge that settle a candidate without asking the LLM (mode: ambiguous);
# ``not_top_k`` is not among them: a good region that only lost on rank is the doubtful case.
CLEAR_REJECT_REASONS = ("low_det_score", "no_mask", "low_mask_score", "mask_too_small", "mask_too_large",
                        "mask_fills_little_of_box", "duplicate_mask")
RETRYABLE = ("timeout", "connection", "rate_limit", "server_error", "malformed_json", "invalid_reply",
             "truncated", "refusal", "empty_reply")


# --- prompt templates ----------------------------------------------------------------------

@dataclass(frozen=True)
class Prompt:
    name: str
    hash: str
    system: str
    user: str

    def render(self, payload_json: str) -> tuple[str, str]:
        # one replace on the fixed template: text inside the payload is never substituted again
        return self.system, self.user.replace("{{payload}}", payload_json, 1)


def load_prompt(name: str) -> Prompt:
    """``judge.v1`` -> ``prompts/judge.v1.md`` (or a path to a ``.md`` file)."""
    path = Path(name)
    if not (path.suffix == ".md" and path.is_file()):
        path = PROMPTS_DIR / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"adjudicate.prompt: no prompt template {name!r} (looked for {path})")
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^## (system|user)[ \t]*$", text, flags=re.M)
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}
    if set(sections) != {"system", "user"} or sections["user"].count("{{payload}}") != 1:
        raise ValueError(f"prompt template {path} needs a '## system' and a '## user' part, "
                         "the user part with {{payload}} exactly once")
    return Prompt(name=path.stem, hash=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
                  system=sections["system"].strip(), user=sections["user"].strip())


# --- what the judge is shown -----------------------------------------------------------------

def position_words(box_norm: list[float]) -> str:
    x0, y0, x1, y1 = box_norm
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    where = "center" if (horizontal, vertical) == ("center", "middle") else f"{vertical} {horizontal}"
    share = max(x1 - x0, 0) * max(y1 - y0, 0)
    size = ("tiny" if share < 0.01 else "small" if share < 0.1 else "medium" if share < 0.4
            else "large" if share < 0.8 else "almost the whole image")
    return f"{where}, {size}"


def build_payload(record: dict, region_ids: list[int]) -> tuple[dict, dict[int, list[int]]]:
    """The sample as shown to the judge, and ``{entity id: [candidate ids]}`` that were shown."""
    width, height = record["image"]["width"], record["image"]["height"]
    wanted = set(region_ids)
    entities = {e["id"]: e for e in record["entities"]}
    shown: dict[int, list[int]] = {}
    for region in record["regions"]:
        if region["id"] in wanted:
            shown.setdefault(region["entity"], []).append(region["id"])
    regions = {r["id"]: r for r in record["regions"]}
    turns = sorted({entities[e].get("turn") for e in shown}, key=lambda t: -1 if t is None else t)
    payload: dict = {}
    if turns == [None]:
        payload["caption"] = record["text"]["caption"]
    else:
        payload["turns"] = {str(t): entity_text(record, entities[next(e for e in shown if entities[e].get("turn") == t)])
                            for t in turns}
    payload["entities"] = []
    for entity_id in sorted(shown):
        entity = entities[entity_id]
        item = {"id": entity_id, "phrase": entity["phrase"], "plural": bool(entity.get("plural"))}
        if entity.get("turn") is not None:
            item["turn"] = entity["turn"]
        expression = (entity.get("expression") or {}).get("text")
        if expression and expression != entity["phrase"]:
            item["expression"] = expression
        item["candidates"] = []
        for rid in shown[entity_id]:
            region = regions[rid]
            x0, y0, x1, y1 = region["box_xyxy"]
            box = [round(x0 / width, 3), round(y0 / height, 3), round(x1 / width, 3), round(y1 / height, 3)]
            item["candidates"].append({
                "id": rid, "box": box, "position": position_words(box),
                "det_score": round(float(region["det_score"]), 3),
                "mask_share": round(float(region.get("area") or 0) / max(width * height, 1), 4),
            })
        payload["entities"].append(item)
    return payload, shown


def payload_json(payload: dict) -> str:
    """Canonical JSON of the payload; ``<``/``>`` escaped so a caption cannot close ``<data>``."""
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e")


def reply_schema(shown: dict[int, list[int]]) -> dict:
    """JSON schema of a valid reply for this sample (ids restricted to the ones shown)."""
    candidate_ids = sorted({rid for ids in shown.values() for rid in ids})
    return {
        "type": "object", "additionalProperties": False, "required": ["entities"],
        "properties": {"entities": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "visual", "candidates"],
            "properties": {
                "id": {"type": "integer", "enum": sorted(shown)},
                "visual": {"type": "boolean"},
                "candidates": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["id", "accept", "reason"],
                    "properties": {"id": {"type": "integer", "enum": candidate_ids},
                                   "accept": {"type": "boolean"}, "reason": {"type": "string"}}}},
            }}}},
    }


class ReplyError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def parse_reply(text: str | None, shown: dict[int, list[int]]) -> dict[int, dict]:
    """Validate a reply: ``{region id: {"accept", "reason", "visual"}}`` or :class:`ReplyError`.

    Strict: a JSON object (a surrounding Markdown code fence is tolerated), every entity and
    every candidate that was shown answered exactly once, no other ids, the right types.
    """
    if text is None or not text.strip():
        raise ReplyError("empty_reply", "no content")
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ReplyError("malformed_json", f"{exc.msg} at char {exc.pos}") from None
    if not isinstance(data, dict) or not isinstance(data.get("entities"), list):
        raise ReplyError("invalid_reply", "expected an object with an 'entities' list")
    out: dict[int, dict] = {}
    seen_entities: set[int] = set()
    for item in data["entities"]:
        if not isinstance(item, dict) or type(item.get("id")) is not int:
            raise ReplyError("invalid_reply", "entity without an integer id")
        eid = item["id"]
        if eid not in shown:
            raise ReplyError("invalid_reply", f"unknown entity id {eid}")
        if eid in seen_entities:
            raise ReplyError("invalid_reply", f"entity {eid} answered twice")
        seen_entities.add(eid)
        visual = item.get("visual")
        if not isinstance(visual, bool):
            raise ReplyError("invalid_reply", f"entity {eid}: 'visual' is not true/false")
        candidates = item.get("candidates")
        if not isinstance(candidates, list):
            raise ReplyError("invalid_reply", f"entity {eid}: no 'candidates' list")
        for cand in candidates:
            if not isinstance(cand, dict) or type(cand.get("id")) is not int:
                raise ReplyError("invalid_reply", f"entity {eid}: candidate without an integer id")
            rid = cand["id"]
            if rid not in shown[eid]:
                raise ReplyError("invalid_reply", f"unknown candidate id {rid} for entity {eid}")
            if rid in out:
                raise ReplyError("invalid_reply", f"candidate {rid} answered twice")
            if not isinstance(cand.get("accept"), bool):
                raise ReplyError("invalid_reply", f"candidate {rid}: 'accept' is not true/false")
            reason = cand.get("reason")
            if not isinstance(reason, str):
                raise ReplyError("invalid_reply", f"candidate {rid}: 'reason' is not a string")
            reason = " ".join(reason.split())[:MAX_REASON_CHARS]
            out[rid] = {"accept": cand["accept"], "reason": reason, "visual": visual}
    missing_entities = sorted(set(shown) - seen_entities)
    if missing_entities:
        raise ReplyError("invalid_reply", f"entities not answered: {missing_entities}")
    missing = sorted(rid for ids in shown.values() for rid in ids if rid not in out)
    if missing:
        raise ReplyError("invalid_reply", f"candidates not answered: {missing}")
    return out


_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60))


def draw_candidates(image_bytes: bytes, record: dict, region_ids: list[int], max_side: int = 1024) -> str:
    """The image with the candidate boxes drawn and labelled by id, as a JPEG data URI."""
    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    # boxes are in the stored image's pixels; the stored image may differ from these bytes' size
    sx = image.width / record["image"]["width"]
    sy = image.height / record["image"]["height"]
    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 300))
    wanted = set(region_ids)
    for region in record["regions"]:
        if region["id"] not in wanted:
            continue
        color = _COLORS[region["id"] % len(_COLORS)]
        x0, y0, x1, y1 = region["box_xyxy"]
        box = [x0 * sx, y0 * sy, max(x0 * sx, x1 * sx), max(y0 * sy, y1 * sy)]
        draw.rectangle(box, outline=color, width=line)
        label = str(region["id"])
        tx, ty = box[0] + line, box[1] + line
        tw, th = draw.textbbox((tx, ty), label)[2:]
        draw.rectangle([tx - 1, ty - 1, tw + 1, th + 1], fill=color)
        draw.text((tx, ty), label, fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- rate limits -----------------------------------------------------------------------------

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


# --- the cache of earlier answers --------------------------------------------------------------

def cache_key(model: str, prompt_hash: str, input_hash: str) -> str:
    return f"{model}\x1f{prompt_hash}\x1f{input_hash}"


def load_answers(out_dirs) -> dict[str, str]:
    """Valid earlier answers ``{cache_key: raw reply}`` from output folders: their adjudication
    logs (``logs/adjudication-*.parquet``) and answer journals (``cache/judge-answers-*.jsonl``)."""
    answers: dict[str, str] = {}
    for out in out_dirs:
        out = Path(out)
        for path in sorted((out / "logs").glob("adjudication-*.parquet")):
            try:
                import pyarrow.parquet as pq

                names = set(pq.read_schema(path).names)
                cols = ["model", "prompt_hash", "input_hash", "raw", "decided_by", "error"]
                if not set(cols) <= names:
                    continue  # written before the LLM judge existed
                for row in pq.read_table(path, columns=cols).to_pylist():
                    if row["decided_by"] == "llm" and not row["error"] and row["input_hash"]:
                        answers[cache_key(row["model"], row["prompt_hash"], row["input_hash"])] = row["raw"]
            except Exception as exc:  # noqa: BLE001 - a damaged log only costs cache hits
                log.warning("judge cache: cannot read %s: %s", path, exc)
        for path in sorted((out / JOURNAL_DIR).glob(JOURNAL_GLOB)):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        answers[cache_key(row["model"], row["prompt_hash"], row["input_hash"])] = row["raw"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
    return answers


# --- the judge ---------------------------------------------------------------------------------

@dataclass
class _Outcome:
    """What asking one question gave: a parsed reply, or the error after the last attempt."""
    parsed: dict[int, dict] | None = None
    raw: str = ""
    error_kind: str = ""
    error: str = ""
    attempts: int = 0
    attempt_errors: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cached: bool = False


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
    outcome: _Outcome | None = None                 # known before asking (cache hit, internal error)
    messages: list | None = None                    # set when this sample sends the request
    prompt_chars: int = 0


class _AttemptError(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None,
                 raw: str = "", usage: tuple[int, int] = (0, 0)):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.raw = raw
        self.usage = usage


def _retry_after_seconds(headers) -> float | None:
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


def _spread(total: int, n: int) -> list[int]:
    base, extra = divmod(int(total), max(n, 1))
    return [base + (1 if i < extra else 0) for i in range(n)]


class OpenAIJudge:
    """LLM judge over an OpenAI-compatible Chat Completions endpoint (see the module doc)."""

    def __init__(self, config, cache_dirs=(), journal_dir: str | os.PathLike | None = None):
        self.config = config
        self.model = config.model
        self.name = config.model
        self.cache_dirs = [Path(p) for p in cache_dirs]
        self.journal_dir = Path(journal_dir) if journal_dir else None
        self.rules = RulesJudge(config)
        self.prompt: Prompt | None = None
        self._answers: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = None
        self._journal = None
        self._secret: str | None = None

    # -- lifecycle --
    def setup(self) -> None:
        if self.prompt is None:
            self.prompt = load_prompt(self.config.prompt)
            self._answers = load_answers(self.cache_dirs)
            if self._answers:
                log.info("judge cache: %d earlier answers", len(self._answers))
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        for name in ("httpx", "httpx2"):  # one INFO line per request is too many; errors still show
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        workers = max(1, getattr(self.config, "workers", 1))
        if self._client is None:
            self._client = self._make_client()  # once per worker: connections are reused
        rpm, tpm = self.config.requests_per_minute, self.config.tokens_per_minute
        self._requests = RateLimiter(rpm / workers if rpm else None)
        self._tokens = RateLimiter(tpm / workers if tpm else None)

    def _make_client(self):
        from openai import AsyncOpenAI

        secret = os.environ.get(self.config.api_key_env) or "EMPTY"  # vLLM/SGLang accept any key
        if secret == "EMPTY":
            log.warning("judge: $%s is not set; sending a dummy API key (fine for a vLLM/SGLang server "
                        "started without --api-key)", self.config.api_key_env)
        self._secret = secret if secret != "EMPTY" else None
        return AsyncOpenAI(api_key=secret, base_url=self.config.base_url, max_retries=0,
                           timeout=self.config.timeout_s)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            if self._client is not None:
                self._loop.run_until_complete(self._client.close())
            self._loop.close()
        self._client = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _scrub(self, text: str) -> str:
        text = str(text)
        if self._secret:
            text = text.replace(self._secret, "***")
        return text

    # -- the Judge protocol --
    def judge(self, record: dict, image: bytes | None = None) -> dict[int, dict]:
        return self.judge_many([record], [image])[0]

    def judge_many(self, records: list[dict], images: list | None = None) -> list[dict[int, dict]]:
        if self.prompt is None or self._loop is None or self._loop.is_closed():
            self.setup()
        images = list(images) if images is not None else [None] * len(records)
        return self._loop.run_until_complete(self._judge_all(records, images))

    async def _judge_all(self, records, images):
        if self._client is None:
            self._client = self._make_client()
        self._sem = asyncio.Semaphore(self.config.concurrency)
        self._inflight: dict[str, asyncio.Future] = {}
        # the CPU work first (rules, payloads, cache look-ups), then only the waiting on the network
        questions = [self._prepare(r, im) for r, im in zip(records, images)]
        return await asyncio.gather(*(self._answer(q) for q in questions))

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
                q.prompt_chars = len(system) + len(user) + (3000 if visual else 0)
                # later copies of this question in the batch wait for this one's answer
                self._inflight[q.key] = asyncio.get_running_loop().create_future()
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the sample
            q.outcome = self._internal_error(record, exc)
            q.ask = list(q.rules)
        return q

    def _internal_error(self, record: dict, exc: Exception) -> _Outcome:
        log.warning("judge: internal error on %s: %s", record.get("key"), self._scrub(exc))
        return _Outcome(error_kind="internal", error=self._scrub(f"{type(exc).__name__}: {exc}")[:500])

    async def _answer(self, q: _Question) -> dict[int, dict]:
        if not q.ask:
            return q.verdicts
        try:
            outcome = q.outcome
            if outcome is None and q.messages is None:  # a copy: wait for the first one's answer
                first = await asyncio.shield(self._inflight[q.key])
                outcome = _Outcome(parsed=first.parsed, raw=first.raw, cached=True) if first.parsed else first
            elif outcome is None:
                future = self._inflight[q.key]
                try:
                    outcome = await self._ask(q.messages, q.shown, q.prompt_chars)
                    if outcome.parsed is not None:
                        self._remember(q.key, q.input_hash, outcome.raw)
                finally:
                    future.set_result(outcome if outcome is not None else _Outcome(error_kind="internal"))
            return self._verdicts(q, outcome)
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the sample
            outcome = self._internal_error(q.record, exc)
            return {**q.verdicts, **{rid: self._fallback(q.rules[rid], outcome, input_hash=q.input_hash)
                                     for rid in q.ask}}

    def _verdicts(self, q: _Question, outcome: _Outcome) -> dict[int, dict]:
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

    def _fallback(self, rules_verdict: dict, outcome: _Outcome, **extra) -> dict:
        error = f"{outcome.error_kind}: {outcome.error}"
        attempts = f" after {outcome.attempts} attempts" if outcome.attempts else ""
        base = {"input_hash": "", **extra, "error": error, "prompt_hash": self.prompt.hash}
        if self.config.on_error == "rules":
            return {**rules_verdict, **base, "decided_by": "fallback_rules",
                    "reason": f"judge_error_fallback: {outcome.error_kind}{attempts}; rules: {rules_verdict['reason']}"}
        return {**self._verdict(False, f"judge_error: {outcome.error_kind}{attempts}"), **base,
                "decided_by": "fallback_reject"}

    def _from_cache(self, key: str, shown) -> _Outcome | None:
        raw = self._answers.get(key)
        if raw is None:
            return None
        try:
            return _Outcome(parsed=parse_reply(raw, shown), raw=raw, cached=True)
        except ReplyError:
            return None

    def _remember(self, key: str, input_hash: str, raw: str) -> None:
        self._answers[key] = raw
        if self.journal_dir is None:
            return
        if self._journal is None:
            self.journal_dir.mkdir(parents=True, exist_ok=True)
            name = f"judge-answers-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._journal = open(self.journal_dir / name, "a", encoding="utf-8")
        self._journal.write(json.dumps({"model": self.model, "prompt_hash": self.prompt.hash,
                                        "input_hash": input_hash, "raw": raw}, ensure_ascii=False) + "\n")
        self._journal.flush()

    # -- one question, with retries --
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

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and retry_after <= self.config.max_retry_after_s:
            return retry_after
        base = min(self.config.backoff_s * (2 ** attempt), self.config.max_backoff_s)
        return base * (1 - 0.25 * random.random())

    async def _ask(self, messages: list, shown, prompt_chars: int) -> _Outcome:
        kwargs = self._request_kwargs(messages, shown)
        estimate = prompt_chars / 4 + min(self.config.max_tokens, 300)
        outcome = _Outcome()
        async with self._sem:
            started = time.perf_counter()
            for attempt in range(self.config.max_retries + 1):
                await self._requests.acquire(1)
                await self._tokens.acquire(estimate)
                outcome.attempts += 1
                try:
                    raw, usage = await self._attempt(kwargs)
                    outcome.prompt_tokens += usage[0]
                    outcome.completion_tokens += usage[1]
                    self._tokens.debit(sum(usage) - estimate if sum(usage) else 0)
                    outcome.raw = raw
                    try:
                        outcome.parsed = parse_reply(raw, shown)
                    except ReplyError as exc:
                        raise _AttemptError(exc.kind, exc.detail, raw=raw) from None
                    outcome.error_kind = outcome.error = ""
                    break
                except _AttemptError as exc:
                    outcome.prompt_tokens += exc.usage[0]
                    outcome.completion_tokens += exc.usage[1]
                    outcome.attempt_errors.append(exc.kind)
                    outcome.error_kind, outcome.error = exc.kind, self._scrub(exc)[:500]
                    if exc.raw:
                        outcome.raw = self._scrub(exc.raw)
                    if exc.kind not in RETRYABLE or attempt == self.config.max_retries:
                        break
                    delay = self._backoff(attempt, exc.retry_after)
                    log.debug("judge: %s (attempt %d), retrying in %.2fs", exc.kind, attempt + 1, delay)
                    await asyncio.sleep(delay)
            outcome.latency_ms = (time.perf_counter() - started) * 1000
        if outcome.parsed is None:
            log.warning("judge: giving up after %d attempts: %s: %s", outcome.attempts, outcome.error_kind, outcome.error)
        return outcome

    async def _attempt(self, kwargs: dict) -> tuple[str, tuple[int, int]]:
        import openai

        try:
            response = await self._client.chat.completions.create(**kwargs)
        except openai.APITimeoutError:
            raise _AttemptError("timeout", f"no reply within {self.config.timeout_s}s") from None
        except openai.APIConnectionError as exc:
            raise _AttemptError("connection", self._scrub(f"{type(exc).__name__}: {exc}")) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            kind = ("rate_limit" if status == 429 else "server_error" if status >= 500 or status in (408, 409)
                    else "auth" if status in (401, 403) else "bad_request")
            raise _AttemptError(kind, self._scrub(f"HTTP {status}: {exc.message}")[:300],
                                retry_after=_retry_after_seconds(exc.response.headers)) from None
        except openai.APIResponseValidationError as exc:
            raise _AttemptError("malformed_json", self._scrub(exc)) from None
        except ValueError as exc:  # a 200 whose body is not JSON (a proxy's HTML page, ...)
            raise _AttemptError("malformed_json", f"response body: {self._scrub(exc)}"[:300]) from None
        usage = response.usage
        tokens = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
        if not response.choices:
            raise _AttemptError("empty_reply", "no choices", usage=tokens)
        choice = response.choices[0]
        message = choice.message
        if getattr(message, "refusal", None):
            raise _AttemptError("refusal", self._scrub(message.refusal)[:300], usage=tokens)
        if choice.finish_reason == "length":
            raise _AttemptError("truncated", f"reply cut at max_tokens={self.config.max_tokens}",
                                raw=message.content or "", usage=tokens)
        return message.content or "", tokens
