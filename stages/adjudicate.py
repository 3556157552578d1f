"""adjudicate: accept or reject every candidate region of every entity, with a reason.

The stage owns the bookkeeping (entity statuses, accepted-region lists, adjudication log
rows); *who* decides is a judge (``stages/judges/``): the deterministic rules judge, or the LLM
judge, which answers a whole batch at once (``judge_many``: one request per sample, many in
flight). :class:`AdjudicateConfig` is the ``adjudicate:`` section of a manifest.
"""
from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import Field, field_validator

from stages.config import StageConfig
from stages.judges import Judge, judge_batch, make_judge
from stages.judges.prompt import load_prompt
from stages.base import Resources, Row, Stage
from stages.record import entity_text


class AdjudicateConfig(StageConfig):
    """``adjudicate:`` in a manifest: which judge, its LLM settings and the rules thresholds."""

    judge: Literal["rules", "openai"] = "rules"
    model: str | None = Field(None, description="LLM judge model name (judge: openai)")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (judge: openai)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (read when the "
                             "client is created, never recorded; unset = a dummy key, fine for vLLM/SGLang)")
    concurrency: int = Field(16, ge=1, description="requests in flight per judge worker (judge: openai)")
    workers: int = Field(1, ge=1, description="judge actors in the Ray plan (judge: openai); the per-minute limits hold for all "
                                               "of them together (one limiter actor)")
    batch_size: int = Field(64, ge=1, description="samples per judge batch in the Ray plan (judge: openai); a batch's requests run "
                                                  "concurrently, so keep it >= concurrency")
    prompt: str = Field("judge.v1", description="prompt template: prompts/NAME.md (or a path to a .md file); its name and hash "
                                                "are recorded with every verdict")
    mode: Literal["all", "ambiguous"] = Field(
        "all", description="all = the LLM judges every candidate; ambiguous = the rules decide the clear cases (hard "
                           "rule failures; a lone rules-accepted candidate with det_score >= clear_det_score) and the "
                           "LLM only the rest")
    clear_det_score: float = Field(0.5, ge=0, le=1, description="mode ambiguous: a lone candidate the rules accept with at least "
                                                                "this detector score is accepted without asking")
    visual: bool = Field(False, description="also send the image with the candidate boxes drawn (multimodal judges)")
    image_max_side: int = Field(1024, ge=64, description="visual: the image sent is downscaled to this longest side")
    response_format: Literal["json_schema", "json_object", "guided_json", "structured_outputs", "none"] = Field(
        "json_schema", description="how the reply format is enforced: json_schema = response_format JSON schema (OpenAI, "
                                   "vLLM, SGLang); guided_json = vLLM<0.10 extra_body guided_json; structured_outputs = "
                                   "vLLM>=0.10 extra_body structured_outputs; json_object; none. Replies are always validated")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16, description="reply token limit per request")
    timeout_s: float = Field(60.0, gt=0, description="per-attempt request timeout")
    max_retries: int = Field(3, ge=0, description="retries after a failed attempt, at most max_retries + 1 requests per sample in all "
                                                  "(timeout, connection, 429, 5xx: by the openai client; invalid reply: by the judge)")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay (doubles per retry, with jitter) when the server sends no Retry-After")
    max_backoff_s: float = Field(30.0, ge=0, description="longest backoff between retries")
    max_retry_after_s: float = Field(120.0, ge=0, description="a longer Retry-After is replaced by the normal backoff")
    requests_per_minute: float | None = Field(None, gt=0, description="requests (HTTP attempts) within any 60 s, all workers "
                                                                      "together; none = unlimited")
    tokens_per_minute: float | None = Field(None, gt=0, description="tokens within any 60 s, all workers together: prompt "
                                                                    "characters / 4 + max_tokens before a request, the reply's usage after")
    on_error: Literal["rules", "reject"] = Field(
        "rules", description="after the last retry: rules = the rules judge's verdict; reject = reject the candidates. "
                             "Either way the error is recorded with the verdict")
    cache_from: list[str] = Field(default_factory=list, description="other output folders whose logged answers are reused "
                                                                    "(this build's own output folder always is)")
    min_det_score: float = Field(0.3, ge=0, le=1, description="rules: reject regions below this detector score")
    min_mask_score: float = Field(0.5, ge=0, le=1, description="rules: reject masks below this predicted quality")
    min_mask_fill: float = Field(0.1, ge=0, le=1, description="rules: reject masks covering less than this share of their box")
    min_area_frac: float = Field(0.0005, ge=0, le=1, description="rules: reject masks smaller than this share of the image")
    max_area_frac: float = Field(0.95, ge=0, le=1, description="rules: reject masks larger than this share of the image")
    top_k_singular: int = Field(1, ge=1, description="rules: accept at most this many regions for a singular phrase")
    top_k_plural: int = Field(4, ge=1, description="rules: accept at most this many regions for a plural phrase")
    exclusive_regions: bool = Field(True, description="rules: within one text (the caption, one caption of a list, one "
                                    "conversation turn) a region goes to one phrase: a candidate whose mask overlaps an "
                                    "accepted, better-scoring region of another phrase is rejected (claimed_by_other_phrase) "
                                    "and the phrase goes on to its next candidate. Phrases that may name the same thing "
                                    "('a man' / 'the man': one's words within the other's) never compete. false = rules.v1")
    plural_min_det_score: float | None = Field(None, ge=0, le=1, description=(
        "rules: a plural phrase ('three cats') that has a region at min_det_score takes its other regions down to this "
        "detector score (none = min_det_score for all)"))
    exclusive_iou: float = Field(0.5, ge=0, le=1, description="rules: the mask IoU above which two phrases' regions are one "
                                                             "object (exclusive_regions)")

    @field_validator("prompt")
    @classmethod
    def _prompt_exists(cls, value: str) -> str:
        try:
            load_prompt(value)
        except (OSError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value


class AdjudicateStage(Stage):
    """Applies a judge to every sample and writes the verdicts, statuses and log rows.

    Resources: the rules judge is CPU work; the LLM judge waits on the network (an ``io`` actor
    pool of ``adjudicate.workers``, batches of ``adjudicate.batch_size`` so that a batch keeps
    ``concurrency`` requests in flight)."""

    name = "adjudicate"

    def __init__(self, config: AdjudicateConfig, judge: Judge | None = None, out_dir=None, limiter=None):
        self.config = config
        self.judge = judge
        self.out_dir = out_dir
        # a rate limiter shared with the other judge workers (the runner sets it under Ray)
        self.limiter = limiter
        if config.judge == "openai":
            self.resources = Resources("io", workers=config.workers, batch_size=config.batch_size)
        else:
            self.resources = Resources("cpu")

    def setup(self) -> None:
        if self.judge is None:
            self.judge = make_judge(self.config, self.out_dir, limiter=self.limiter)
        self.judge.setup()

    def process(self, rows: list[Row]) -> None:
        asked = [row for row in rows if row.record["regions"]]
        started = time.perf_counter()
        results = judge_batch(self.judge, [row.record for row in asked],
                              [row["image"] for row in asked] if asked and asked[0].get("image") is not None else None)
        elapsed_ms = (time.perf_counter() - started) * 1000
        per_region_ms = elapsed_ms / max(sum(len(row.record["regions"]) for row in asked), 1)
        verdicts = {row.index: result for row, result in zip(asked, results)}
        for row in rows:
            record = row.record
            log_rows = finalize(record, verdicts.get(row.index, {}), per_region_ms * len(record["regions"]))
            row["log"] = json.dumps(json.loads(row.get("log") or "[]") + log_rows)


# What a verdict keeps in the shard; everything else a judge returns goes to the log only.
_VERDICT_KEYS = ("accept", "reason", "judge", "prompt")
# Log fields besides the region's own, with their defaults (the rules judge sets none of them).
LOG_FIELDS = {"decided_by": "", "cached": False, "prompt_hash": "", "input_hash": "", "raw": "",
              "attempts": 0, "attempt_errors": "", "prompt_tokens": 0, "completion_tokens": 0,
              "tokens": 0, "error": "", "visual": None}


def finalize(record: dict, verdicts: dict[int, dict], elapsed_ms: float = 0.0) -> list[dict]:
    """Store verdicts on regions, set each entity's final status, return adjudication log rows."""
    missing = [r["id"] for r in record["regions"] if r["id"] not in verdicts]
    if missing:
        raise ValueError(f"judge gave no verdict for regions {missing} of {record['key']}")
    width, height = record["image"]["width"], record["image"]["height"]
    per_region_ms = elapsed_ms / max(len(record["regions"]), 1)
    log_rows = []
    for region in record["regions"]:
        full = verdicts[region["id"]]
        region["verdict"] = {k: full[k] for k in _VERDICT_KEYS}
    entities = {e["id"]: e for e in record["entities"]}
    for entity in record["entities"]:
        if entity["status"] == "skipped":
            continue
        own = [r for r in record["regions"] if r["entity"] == entity["id"]]
        accepted = [r["id"] for r in own if r["verdict"]["accept"]]
        entity["regions"] = accepted
        not_visual = [verdicts[r["id"]] for r in own if verdicts[r["id"]].get("visual") is False]
        if not_visual and not accepted:
            # the judge says the phrase names nothing visible: an abstract phrase, not a miss
            entity["status"] = "skipped"
            entity["reason"] = "judge_not_visual: " + not_visual[0]["reason"].split(":", 1)[-1].strip()
        elif accepted:
            entity["status"], entity["reason"] = "grounded", None
        elif own:
            entity["status"] = "rejected"
            entity["reason"] = "all_candidates_rejected: " + "; ".join(
                sorted({r["verdict"]["reason"].split(":")[0] for r in own}))
        else:
            entity["status"], entity["reason"] = "ungrounded", "no_box_above_thresholds"
    for region in record["regions"]:
        entity = entities[region["entity"]]
        full = verdicts[region["id"]]
        x0, y0, x1, y1 = region["box_xyxy"]
        shown = {
            "phrase": entity["phrase"],
            "text": entity_text(record, entity),
            "box_norm": [round(x0 / width, 4), round(y0 / height, 4), round(x1 / width, 4), round(y1 / height, 4)],
            "det_score": region["det_score"],
            "mask_score": region.get("mask_score"),
            "mask_share": round(region.get("area", 0) / max(width * height, 1), 5),
            "plural": entity.get("plural"),
        }
        log_rows.append({
            "key": record["key"],
            "entity": entity["id"],
            "phrase": entity["phrase"],
            "root": entity.get("root"),
            "region": region["id"],
            "det_score": float(region["det_score"]),
            "mask_score": float(region.get("mask_score") or 0.0),
            "inputs": json.dumps(shown, ensure_ascii=False),
            "accept": bool(full["accept"]),
            "reason": full["reason"],
            "model": full["judge"],
            "prompt": full["prompt"],
            "latency_ms": float(full.get("latency_ms", per_region_ms)),
            **{name: full.get(name, default) for name, default in LOG_FIELDS.items() if name != "raw"},
            "raw": str(full.get("raw", "")),
        })
        row = log_rows[-1]
        row["decided_by"] = row["decided_by"] or ("rules" if full["judge"] == "rules" else "judge")
        row["error"] = str(row["error"] or "")
    return log_rows
