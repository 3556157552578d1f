"""The rules judge: deterministic accept/reject from detector score, mask quality and top-k."""
from __future__ import annotations

from stages.record import rle

RULES_VERSION = "rules.v1"


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
        ious = rle.iou([region["mask_rle"]], [a["mask_rle"] for a in accepted])
        for other, iou in zip(accepted, ious[0]):
            if iou > self.duplicate_iou:
                return other["id"]
        return None
