import json

import numpy as np
from pycocotools import mask as mask_utils

from stages.adjudicate import AdjudicateConfig, AdjudicateStage
from stages.judges.rules import RulesJudge
from stages.record import check_record, dumps, loads, new_record

W, H = 100, 80


def _rle(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle, int(m.sum())


def _region(rid, entity, box, det=0.8, mscore=0.9, mask_box=None):
    rle, area = _rle(*(mask_box or box))
    return {"id": rid, "entity": entity, "box_xyxy": [float(v) for v in box], "det_score": det,
            "mask_rle": rle, "mask_score": mscore, "area": area}


def _record(entities, regions):
    rec = new_record("k-1", {"dataset": "t", "id": "1"}, W, H, "0" * 64,
                     {"caption": "a dog and two cats near the door"})
    rec["entities"] = entities
    rec["regions"] = regions
    return rec


def _entity(eid, phrase, start, plural=False, status=None):
    return {"id": eid, "phrase": phrase, "start": start, "end": start + len(phrase), "turn": None,
            "root": phrase.split()[-1], "plural": plural, "status": status, "regions": [],
            "reason": "non_visual_noun: door" if status == "skipped" else None, "expression": None}


def _run(record, **cfg):
    stage = AdjudicateStage(AdjudicateConfig(**cfg))
    out = stage({"seq": [0], "status": ["ok"], "record": [dumps(record)], "log": ["[]"]})
    return loads(out["record"][0]), json.loads(out["log"][0])


def test_singular_keeps_best_plural_keeps_several_and_every_rejection_has_a_reason():
    ents = [_entity(0, "a dog", 0), _entity(1, "two cats", 10, plural=True),
            _entity(2, "the door", 24, status="skipped")]
    regs = [
        _region(0, 0, (0, 0, 30, 30), det=0.6), _region(1, 0, (50, 40, 90, 70), det=0.9),
        _region(2, 1, (0, 40, 20, 60)), _region(3, 1, (30, 40, 50, 60)),
        _region(4, 1, (60, 0, 80, 20), det=0.1),
    ]
    rec, log = _run(_record(ents, regs))
    assert check_record(rec) == []
    by_id = {r["id"]: r["verdict"] for r in rec["regions"]}
    assert by_id[1]["accept"] and not by_id[0]["accept"] and by_id[0]["reason"].startswith("not_top_k")
    assert by_id[2]["accept"] and by_id[3]["accept"]
    assert by_id[4]["reason"].startswith("low_det_score")
    assert [e["status"] for e in rec["entities"]] == ["grounded", "grounded", "skipped"]
    assert rec["entities"][0]["regions"] == [1] and rec["entities"][1]["regions"] == [2, 3]
    assert len(log) == 5 and {row["model"] for row in log} == {"rules"}
    assert all(row["reason"] for row in log)


def test_duplicate_masks_and_size_limits():
    ents = [_entity(0, "two cats", 10, plural=True)]
    regs = [_region(0, 0, (10, 10, 60, 60)), _region(1, 0, (10, 10, 60, 60), det=0.7),
            _region(2, 0, (0, 0, 100, 80)), _region(3, 0, (0, 0, 1, 2))]
    rec, _ = _run(_record(ents, regs))
    v = {r["id"]: r["verdict"]["reason"].split(":")[0] for r in rec["regions"]}
    assert v == {0: "passes_rules", 1: "duplicate_mask", 2: "mask_too_large", 3: "mask_too_small"}


def test_all_rejected_and_no_candidates_statuses():
    ents = [_entity(0, "a dog", 0), _entity(1, "two cats", 10, plural=True)]
    regs = [_region(0, 0, (0, 0, 30, 30), mscore=0.1)]
    rec, _ = _run(_record(ents, regs))
    assert rec["entities"][0]["status"] == "rejected"
    assert rec["entities"][0]["reason"] == "all_candidates_rejected: low_mask_score"
    assert rec["entities"][1]["status"] == "ungrounded"
    assert check_record(rec) == []


def test_mask_fill_rule():
    ents = [_entity(0, "a dog", 0)]
    regs = [_region(0, 0, (0, 0, 100, 80), mask_box=(0, 0, 10, 10))]
    rec, _ = _run(_record(ents, regs), min_mask_fill=0.2)
    assert rec["regions"][0]["verdict"]["reason"].startswith("mask_fills_little_of_box")


def test_rejected_rows_pass_through():
    stage = AdjudicateStage(AdjudicateConfig())
    batch = {"seq": [0], "status": ["rejected"], "record": [""], "log": ["[]"]}
    assert stage(batch)["record"] == [""]


def test_rules_judge_is_deterministic():
    ents = [_entity(0, "two cats", 10, plural=True)]
    regs = [_region(i, 0, (i * 10, 0, i * 10 + 8, 8), det=0.5) for i in range(6)]
    rec = _record(ents, regs)
    judge = RulesJudge(AdjudicateConfig())
    assert judge.judge(rec) == judge.judge(json.loads(json.dumps(rec)))


def _entity_in(eid, phrase, start, turn=None, root=None, plural=False):
    return {**_entity(eid, phrase, start, plural=plural), "turn": turn, "root": root or phrase.split()[-1]}


def test_a_region_goes_to_one_phrase_of_a_text_and_the_loser_takes_its_next_candidate():
    # "a red star" and "a blue star" both score the red star; the red star's own phrase scores it
    # higher, so "a blue star" loses that region and keeps its second candidate (the blue star)
    ents = [_entity_in(0, "a red star", 0), _entity_in(1, "a blue star", 15)]
    red, blue = (0, 0, 30, 30), (50, 40, 90, 70)
    regs = [_region(0, 0, red, det=0.6), _region(1, 1, red, det=0.5), _region(2, 1, blue, det=0.4)]
    rec, log = _run(_record(ents, regs))
    v = {r["id"]: r["verdict"] for r in rec["regions"]}
    assert v[0]["accept"] and v[2]["accept"] and not v[1]["accept"]
    assert v[1]["reason"].startswith("claimed_by_other_phrase") and "'a red star'" in v[1]["reason"]
    assert v[0]["prompt"] == "rules.v2"
    assert rec["entities"][1]["regions"] == [2]
    # off: the old rules (rules.v1), both phrases on the red star
    rec, _ = _run(_record(ents, regs), exclusive_regions=False)
    v = {r["id"]: r["verdict"] for r in rec["regions"]}
    assert v[0]["accept"] and v[1]["accept"] and not v[2]["accept"] and v[0]["prompt"] == "rules.v1"


def test_a_phrase_naming_nothing_loses_the_object_another_phrase_names():
    ents = [_entity_in(0, "a red star", 0), _entity_in(1, "a purple circle", 15)]
    regs = [_region(0, 0, (0, 0, 30, 30), det=0.6), _region(1, 1, (2, 0, 30, 30), det=0.45)]
    rec, _ = _run(_record(ents, regs))
    assert [e["status"] for e in rec["entities"]] == ["grounded", "rejected"]
    assert rec["entities"][1]["reason"] == "all_candidates_rejected: claimed_by_other_phrase"


def test_phrases_that_may_name_the_same_thing_or_other_turns_do_not_compete():
    box = (0, 0, 30, 30)
    for a, b, turns in [("a man", "the man", (None, None)),                   # same words
                        ("two green triangles", "the green triangles", (None, None)),
                        ("a circle", "the large red circle", (None, None)),  # one's words within the other's
                        ("a red star", "a blue star", (None, 1)),             # another text: no competition
                        ("a red star", "a blue star", (0, 1))]:
        ents = [_entity_in(0, a, 0, turn=turns[0]), _entity_in(1, b, 20, turn=turns[1])]
        verdicts = RulesJudge(AdjudicateConfig()).judge(_record(ents, [_region(0, 0, box, det=0.6),
                                                                       _region(1, 1, box, det=0.5)]))
        assert [verdicts[i]["accept"] for i in (0, 1)] == [True, True], (a, b, turns)
    # a lemma root: "ellipses" (root "ellipse") and "an ellipse" may be the same thing
    ents = [_entity_in(0, "two ellipses", 0, root="ellipse", plural=True), _entity_in(1, "an ellipse", 20)]
    rec, _ = _run(_record(ents, [_region(0, 0, box, det=0.6), _region(1, 1, box, det=0.5)]))
    assert [r["verdict"]["accept"] for r in rec["regions"]] == [True, True]


def test_claims_need_overlapping_masks():
    ents = [_entity_in(0, "a red star", 0), _entity_in(1, "a blue star", 15)]
    regs = [_region(0, 0, (0, 0, 30, 30), det=0.6), _region(1, 1, (20, 0, 50, 30), det=0.5)]   # IoU 0.2
    rec, _ = _run(_record(ents, regs))
    assert all(r["verdict"]["accept"] for r in rec["regions"])
    rec, _ = _run(_record(ents, regs), exclusive_iou=0.1)
    assert [r["verdict"]["accept"] for r in rec["regions"]] == [True, False]



def test_a_plural_phrase_takes_its_further_instances_at_the_plural_floor():
    # "two cats": one confident box (0.5) and one weaker (0.25); a floor of 0.3 alone would keep one
    # cat and the label would cover half the group
    ents = [_entity_in(0, "two cats", 0, plural=True), _entity_in(1, "a dog", 20)]
    regs = [_region(0, 0, (0, 0, 20, 20), det=0.5), _region(1, 0, (40, 0, 60, 20), det=0.25),
            _region(2, 0, (70, 0, 90, 20), det=0.1), _region(3, 1, (0, 40, 20, 60), det=0.25)]
    rec, _ = _run(_record(ents, regs), min_det_score=0.3)
    assert [r["verdict"]["accept"] for r in rec["regions"]] == [True, False, False, False]
    rec, _ = _run(_record(ents, regs), min_det_score=0.3, plural_min_det_score=0.2)
    v = [r["verdict"] for r in rec["regions"]]
    assert [x["accept"] for x in v] == [True, True, False, False]
    assert v[2]["reason"] == "low_det_score: 0.10 < 0.20 (plural floor)"
    assert v[3]["reason"].startswith("low_det_score: 0.25 < 0.30")      # a singular phrase: the floor
    # no confident region: the plural floor does not apply
    regs[0]["det_score"] = 0.28
    rec, _ = _run(_record(ents, regs), min_det_score=0.3, plural_min_det_score=0.2)
    assert not any(r["verdict"]["accept"] for r in rec["regions"])
    assert rec["entities"][0]["status"] == "rejected"
