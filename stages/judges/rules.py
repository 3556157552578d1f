"""The rules judge: deterministic accept/reject from detector score, mask quality, top-k and, within
one text, one phrase per region."""
from __future__ import annotations

import re

from stages.record import rle
from stages.record.schema import is_caption_turn

# v1 + one phrase per region (adjudicate.exclusive_regions) and a plural phrase's own floor for its
# further instances (adjudicate.plural_min_det_score); rules.v1: neither
RULES_VERSION = "rules.v2"
RULES_VERSION_V1 = "rules.v1"

# Words that say which or how many, not what: two phrases differing only in these may name one thing.
_NOT_CONTENT = frozenset("""a an the this that these those some any each every both all his her its their my your
our one two three four five six seven eight nine ten several many few""".split())
_WORD = re.compile(r"[\w'-]+")


def content_words(entity: dict) -> frozenset[str]:
    """What a phrase says its referent is: its words without determiners and numbers, lower case,
    the last word replaced by the entity's root (a lemma: "two ellipses" -> {"ellipse"})."""
    words = [w for w in _WORD.findall(str(entity.get("phrase", "")).lower()) if w not in _NOT_CONTENT]
    root = str(entity.get("root") or "").lower()
    if words and root:
        words[-1] = root
    return frozenset(words)


def may_corefer(a: dict, b: dict) -> bool:
    """Whether two phrases may name the same thing: one's content words lie within the other's
    ("a man" / "the man", "a circle" / "the large red circle", "two green triangles" / "the green
    triangles"). "a red star" and "a blue star" may not."""
    wa, wb = content_words(a), content_words(b)
    return wa <= wb or wb <= wa


def _text_of(entity: dict) -> int:
    turn = entity.get("turn")
    return -1 if is_caption_turn(turn) else int(turn)


class RulesJudge:
    """Deterministic accept/reject from detector score, mask quality and per-phrase top-k.

    Checks run in order and the first failure is the reason, so every rejection names one
    concrete cause. Survivors of the per-region checks are taken best first by ``det_score *
    mask_score`` over the whole sample:

    * with ``exclusive_regions`` (the default), a region whose mask overlaps (IoU >
      ``exclusive_iou``) an already accepted region of another phrase *of the same text* (the
      caption, one caption of a list, one conversation turn) is ``claimed_by_other_phrase``: within
      one text, distinct noun phrases name distinct things ("a red star and a blue star"). Phrases
      that may name the same thing (:func:`may_corefer`) never compete, nor do phrases of
      different texts (several captions of one image describe the same objects in other words).
      The loser goes on to its next candidate, so a phrase whose best box sat on a neighbour
      named by another phrase can still be grounded on its own object;
    * a survivor whose mask nearly repeats an accepted region of its own phrase (IoU > 0.9) is a
      duplicate, not a second instance;
    * with ``plural_min_det_score``, the regions of a plural phrase that has at least one region
      at ``min_det_score`` pass the detector-score check at that lower floor (the others still
      need every other check): the small detector scores the first instance of a group higher
      than the rest, and a floor that keeps only one of "three cats" makes a wrong label;
    * a singular phrase keeps the best ``top_k_singular`` (default 1: "a dog" is one dog), a
      plural one up to ``top_k_plural``. (Capping a plural at the number it states, "three cats":
      3, was measured on the shape scenes and cost more than it gave: the small detector's extra
      boxes often cover the instances the first three missed.)
    """

    name = "rules"
    duplicate_iou = 0.9

    def __init__(self, config):
        self.config = config
        v2 = config.exclusive_regions or config.plural_min_det_score is not None
        self.version = RULES_VERSION if v2 else RULES_VERSION_V1

    def setup(self) -> None:
        pass

    def _region_problem(self, region: dict, image_area: int, floor: float | None = None) -> str | None:
        c = self.config
        threshold, which = c.min_det_score, ""
        if floor is not None and floor < threshold:
            threshold, which = floor, " (plural floor)"
        if region["det_score"] < threshold:
            return f"low_det_score: {region['det_score']:.2f} < {threshold:.2f}{which}"
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
            return {"accept": accept, "reason": reason, "judge": self.name, "prompt": self.version}

        entities = {e["id"]: e for e in record["entities"]}
        # a plural phrase with one confident region takes its further instances at its own floor:
        # "three cats" with one box at 0.5 and two at 0.25 is three cats, not one
        confident = {r["entity"] for r in record["regions"] if r["det_score"] >= c.min_det_score}
        survivors = []
        for region in record["regions"]:
            plural_floor = c.plural_min_det_score if (
                entities[region["entity"]].get("plural") and region["entity"] in confident) else None
            problem = self._region_problem(region, image_area, plural_floor)
            if problem:
                verdicts[region["id"]] = verdict(False, problem)
            else:
                survivors.append(region)
        survivors.sort(key=lambda r: (-(r["det_score"] * r["mask_score"]), r["id"]))
        accepted: dict[int, list[dict]] = {}     # entity id -> its accepted regions, best first
        for region in survivors:
            entity = entities[region["entity"]]
            mine = accepted.setdefault(entity["id"], [])
            claim = _claimed_by(region, entity, entities, accepted, c.exclusive_iou) if c.exclusive_regions else None
            duplicate_of = None if claim else _overlapping(region, mine, self.duplicate_iou)
            limit = c.top_k_plural if entity.get("plural") else c.top_k_singular
            if claim is not None:
                verdicts[region["id"]] = verdict(False, _claim_reason(claim, entities))
            elif duplicate_of is not None:
                verdicts[region["id"]] = verdict(False, f"duplicate_mask: IoU > {self.duplicate_iou} with region "
                                                        f"{duplicate_of[0]['id']}")
            elif len(mine) >= limit:
                kind = "plural" if entity.get("plural") else "singular"
                verdicts[region["id"]] = verdict(False, f"not_top_k: rank {len(mine) + 1} > {limit} for a {kind} phrase")
            else:
                mine.append(region)
                score = region["det_score"] * region["mask_score"]
                verdicts[region["id"]] = verdict(True, f"passes_rules: rank {len(mine)}, det*mask {score:.2f}")
        return verdicts


def _overlapping(region: dict, others: list[dict], threshold: float) -> tuple[dict, float] | None:
    """The first of ``others`` whose mask has IoU > ``threshold`` with the region's, and that IoU."""
    if not others:
        return None
    ious = rle.iou([region["mask_rle"]], [o["mask_rle"] for o in others])
    for other, iou in zip(others, ious[0]):
        if iou > threshold:
            return other, float(iou)
    return None


def _claimed_by(region: dict, entity: dict, entities: dict, accepted: dict[int, list[dict]],
                threshold: float) -> tuple[dict, float] | None:
    """The accepted region of a competing phrase (same text, may not corefer) that this one overlaps."""
    rivals = [r for eid, regions in accepted.items() if eid != entity["id"]
              and _text_of(entities[eid]) == _text_of(entity) and not may_corefer(entities[eid], entity)
              for r in regions]
    return _overlapping(region, rivals, threshold)


def _claim_reason(claim: tuple[dict, float], entities: dict) -> str:
    other, iou = claim
    score = other["det_score"] * (other.get("mask_score") or 0.0)
    return (f"claimed_by_other_phrase: IoU {iou:.2f} with region {other['id']} of "
            f"'{entities[other['entity']]['phrase']}' (det*mask {score:.2f})")


def settle_claims(record: dict, verdicts: dict[int, dict], config) -> dict[int, dict]:
    """One phrase per region for any judge's verdicts (the LLM judge judges each candidate on its
    own): accepted regions taken best first (``det_score * mask_score``); one whose mask overlaps
    (IoU > ``exclusive_iou``) an accepted region of a competing phrase of the same text is turned
    into a rejection, ``claimed_by_other_phrase`` (``decided_by: rules``), the judge's own reason
    kept after it. Returns the verdicts (changed ones copied); as given with ``exclusive_regions`` off."""
    if not config.exclusive_regions:
        return verdicts
    entities = {e["id"]: e for e in record["entities"]}
    accepted = sorted((r for r in record["regions"] if verdicts.get(r["id"], {}).get("accept") and r.get("mask_rle")),
                      key=lambda r: (-(r["det_score"] * (r.get("mask_score") or 0.0)), r["id"]))
    kept: dict[int, list[dict]] = {}
    out = dict(verdicts)
    for region in accepted:
        entity = entities[region["entity"]]
        claim = _claimed_by(region, entity, entities, kept, config.exclusive_iou)
        if claim is None:
            kept.setdefault(entity["id"], []).append(region)
            continue
        out[region["id"]] = {**verdicts[region["id"]], "accept": False, "decided_by": "rules",
                             "reason": f"{_claim_reason(claim, entities)}; {verdicts[region['id']]['reason']}"}
    return out
