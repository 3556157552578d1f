"""adjudicate: accept or reject every candidate region of every entity, with a reason.

The stage owns the bookkeeping (entity statuses, accepted-region lists, adjudication log
rows); *who* decides is a :class:`Judge`. The rules judge below is deterministic and needs
no model; an LLM judge plugs in by implementing the same ``judge(record)`` method.
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
    "prompt": str}``, plus optional log fields (``raw``, ``latency_ms``, ``tokens``,
    ``error``) that go to the adjudication log but not into the shard.
    """

    name: str

    def setup(self) -> None: ...

    def judge(self, record: dict) -> dict[int, dict]: ...


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


def make_judge(config) -> Judge:
    if config.judge == "rules":
        return RulesJudge(config)
    raise NotImplementedError(
        f"adjudicate.judge={config.judge!r} is not available in this version; use 'rules'"
    )


class AdjudicateStage:
    """Applies a judge to every sample and writes the verdicts, statuses and log rows."""

    def __init__(self, config, judge: Judge | None = None):
        self.config = config
        self.judge = judge

    def setup(self) -> None:
        if self.judge is None:
            self.judge = make_judge(self.config)
        self.judge.setup()

    def __call__(self, batch: dict) -> dict:
        if self.judge is None:
            self.setup()
        records = list(batch["record"])
        logs = list(batch.get("log", ["[]"] * len(records)))
        for i, status in enumerate(batch["status"]):
            if status != ROW_OK:
                continue
            record = loads(records[i])
            started = time.perf_counter()
            verdicts = self.judge.judge(record) if record["regions"] else {}
            elapsed_ms = (time.perf_counter() - started) * 1000
            log_rows = finalize(record, verdicts, elapsed_ms)
            records[i] = dumps(record)
            logs[i] = json.dumps(json.loads(logs[i] or "[]") + log_rows)
        out = dict(batch)
        out["record"] = records
        out["log"] = logs
        return out


_LOG_ONLY = ("raw", "latency_ms", "tokens", "error")


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
        region["verdict"] = {k: v for k, v in full.items() if k not in _LOG_ONLY}
    entities = {e["id"]: e for e in record["entities"]}
    for entity in record["entities"]:
        if entity["status"] == "skipped":
            continue
        own = [r for r in record["regions"] if r["entity"] == entity["id"]]
        accepted = [r["id"] for r in own if r["verdict"]["accept"]]
        entity["regions"] = accepted
        if accepted:
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
            "raw": str(full.get("raw", "")),
            "accept": bool(full["accept"]),
            "reason": full["reason"],
            "model": full["judge"],
            "prompt": full["prompt"],
            "latency_ms": float(full.get("latency_ms", per_region_ms)),
            "tokens": int(full.get("tokens", 0)),
            "error": str(full.get("error", "")),
        })
    return log_rows
