"""adjudicate: accept or reject every candidate region of every entity, with a reason.

The stage owns the bookkeeping (entity statuses, accepted-region lists, adjudication log
rows); *who* decides is a :class:`Judge`. The rules judge below is deterministic and needs
no model; the LLM judge (``stages/llm_judge.py``) implements the same protocol and answers a
whole batch at once (``judge_many``: one request per sample, many in flight).
"""
from __future__ import annotations

import json
import time
from typing import Protocol

from pycocotools import mask as mask_utils

from stages.record import ROW_OK, dumps, entity_text, loads

RULES_VERSION = "rules.v1"


class Judge(Protocol):
    """Decides every candidate region of one sample.

    ``judge(record)`` returns ``{region_id: verdict}`` for every region in
    ``record["regions"]``, each verdict ``{"accept": bool, "reason": str, "judge": str,
    "prompt": str}``, plus optional log fields (``decided_by``, ``raw``, ``latency_ms``,
    ``tokens``, ``error``, ... see :data:`LOG_FIELDS`) that go to the adjudication log but not
    into the shard. A verdict with ``"visual": False`` says the judge found the phrase not
    visual at all.

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


class RulesJudge:
    """Deterministic accept/reject from detector score, mask quality and per-phrase top-k.

    Checks run in order and the first failure is the reason, so every rejection names one
    concrete cause. Survivors are ranked by ``det_score * mask_score``; a singular phrase
    keeps the best ``top_k_singular`` (default 1: "a dog" is one dog), a plural one up to
    ``top_k_plural``; a survivor whose mask nearly repeats an accepted one (IoU > 0.9) is a
    duplicate, not a second instance.
    """

    name = "rules"
    duplicate_iou = 0.9

    def __init__(self, config):
        self.config = config

    def setup(self) -> None:
        pass

    def _region_problem(self, region: dict, image_area: int) -> str | None:
        c = self.config
        if region["det_score"] < c.min_det_score:
            return f"low_det_score: {region['det_score']:.2f} < {c.min_det_score:.2f}"
        if region.get("mask_rle") is None:
            return "no_mask"
        if region["mask_score"] < c.min_mask_score:
            return f"low_mask_score: {region['mask_score']:.2f} < {c.min_mask_score:.2f}"
        share = region["area"] / max(image_area, 1)
        if share < c.min_area_frac:
            return f"mask_too_small: {share:.4f} of the image < {c.min_area_frac}"
        if share > c.max_area_frac:
            return f"mask_too_large: {share:.2f} of the image > {c.max_area_frac}"
        x0, y0, x1, y1 = region["box_xyxy"]
        box_area = max((x1 - x0) * (y1 - y0), 1e-6)
        fill = region["area"] / box_area
        if fill < c.min_mask_fill:
            return f"mask_fills_little_of_box: {fill:.2f} < {c.min_mask_fill}"
        return None

    def judge(self, record: dict) -> dict[int, dict]:
        c = self.config
        image_area = record["image"]["width"] * record["image"]["height"]
        verdicts: dict[int, dict] = {}

        def verdict(accept: bool, reason: str) -> dict:
            return {"accept": accept, "reason": reason, "judge": self.name, "prompt": RULES_VERSION}

        entities = {e["id"]: e for e in record["entities"]}
        by_entity: dict[int, list[dict]] = {}
        for region in record["regions"]:
            by_entity.setdefault(region["entity"], []).append(region)

        for entity_id, regions in by_entity.items():
            entity = entities[entity_id]
            survivors = []
            for region in regions:
                problem = self._region_problem(region, image_area)
                if problem:
                    verdicts[region["id"]] = verdict(False, problem)
                else:
                    survivors.append(region)
            survivors.sort(key=lambda r: (-(r["det_score"] * r["mask_score"]), r["id"]))
            limit = c.top_k_plural if entity.get("plural") else c.top_k_singular
            accepted: list[dict] = []
            for region in survivors:
                duplicate_of = self._duplicate_of(region, accepted)
                if duplicate_of is not None:
                    verdicts[region["id"]] = verdict(False, f"duplicate_mask: IoU > {self.duplicate_iou} with region {duplicate_of}")
                elif len(accepted) >= limit:
                    kind = "plural" if entity.get("plural") else "singular"
                    verdicts[region["id"]] = verdict(False, f"not_top_k: rank {len(accepted) + 1} > {limit} for a {kind} phrase")
                else:
                    accepted.append(region)
                    score = region["det_score"] * region["mask_score"]
                    verdicts[region["id"]] = verdict(True, f"passes_rules: rank {len(accepted)}, det*mask {score:.2f}")
        return verdicts

    def _duplicate_of(self, region: dict, accepted: list[dict]) -> int | None:
        if not accepted:
            return None
        ious = mask_utils.iou([region["mask_rle"]], [a["mask_rle"] for a in accepted], [0] * len(accepted))
        for other, iou in zip(accepted, ious[0]):
            if iou > self.duplicate_iou:
                return other["id"]
        return None


def make_judge(config, out_dir=None) -> Judge:
    """The judge named by ``adjudicate.judge``; ``out_dir`` (the build's output folder) lets the
    LLM judge reuse answers already in its logs and journal its new ones there."""
    if config.judge == "rules":
        return RulesJudge(config)
    if config.judge == "openai":
        from pathlib import Path

        from stages.llm_judge import JOURNAL_DIR, OpenAIJudge

        cache_dirs = ([out_dir] if out_dir else []) + list(config.cache_from)
        return OpenAIJudge(config, cache_dirs=cache_dirs,
                           journal_dir=Path(out_dir) / JOURNAL_DIR if out_dir else None)
    raise NotImplementedError(f"adjudicate.judge={config.judge!r} is not available; use 'rules' or 'openai'")


class AdjudicateStage:
    """Applies a judge to every sample and writes the verdicts, statuses and log rows."""

    def __init__(self, config, judge: Judge | None = None, out_dir=None):
        self.config = config
        self.judge = judge
        self.out_dir = out_dir

    def setup(self) -> None:
        if self.judge is None:
            self.judge = make_judge(self.config, self.out_dir)
        self.judge.setup()

    def __call__(self, batch: dict) -> dict:
        if self.judge is None:
            self.setup()
        records = list(batch["record"])
        logs = list(batch.get("log", ["[]"] * len(records)))
        images = batch.get("image")
        todo = [i for i, status in enumerate(batch["status"]) if status == ROW_OK]
        parsed = {i: loads(records[i]) for i in todo}
        asked = [i for i in todo if parsed[i]["regions"]]
        started = time.perf_counter()
        results = judge_batch(self.judge, [parsed[i] for i in asked],
                              [images[i] for i in asked] if images is not None else None)
        elapsed_ms = (time.perf_counter() - started) * 1000
        per_region_ms = elapsed_ms / max(sum(len(parsed[i]["regions"]) for i in asked), 1)
        verdicts = dict(zip(asked, results))
        for i in todo:
            record = parsed[i]
            log_rows = finalize(record, verdicts.get(i, {}), per_region_ms * len(record["regions"]))
            records[i] = dumps(record)
            logs[i] = json.dumps(json.loads(logs[i] or "[]") + log_rows)
        out = dict(batch)
        out["record"] = records
        out["log"] = logs
        return out


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
