"""The scene generator (devkit/scenes.py) and ``lookandlearn evaluate labels`` (pipeline/evaluate_labels.py)."""
from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from devkit import scenes
from devkit.sample_data import heldout_ids
from devkit.scenes import COLOURS, PLURALS, SceneConfig, generate, shape_mask, stream
from stages.record import dumps, new_record, rle

WORD_COUNT = {"a": 1, "an": 1, "two": 2, "three": 3}


def _digest(scene) -> str:
    return hashlib.sha256(scene.image.tobytes()).hexdigest()


# --- the generator ---------------------------------------------------------------------------

def test_generate_is_deterministic_and_indexed():
    a, b = generate(3, "train", 5), generate(3, "train", 5)
    assert _digest(a) == _digest(b) and a.caption == b.caption and a.conversation == b.conversation
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.instances, b.instances))
    assert _digest(generate(3, "train", 6)) != _digest(a)
    assert _digest(generate(4, "train", 5)) != _digest(a)
    first = [_digest(s) for s, _ in zip(stream("val", seed=3), range(4))]
    assert first == [_digest(generate(3, "val", i)) for i in range(4)]


def test_splits_are_disjoint():
    seen = {split: {_digest(generate(0, split, i)) for i in range(25)} for split in ("train", "val", "test")}
    assert all(len(v) == 25 for v in seen.values())
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    with pytest.raises(ValueError, match="split"):
        generate(0, "dev", 0)


@pytest.fixture(scope="module")
def many():
    return [generate(1, "train", i) for i in range(80)]


def test_scene_variety_within_the_stated_ranges(many):
    backgrounds, shapes, colours, sizes = set(), set(), set(), set()
    plural = ghost = occluded = inside = 0
    for sc in many:
        h, w = sc.image.shape[:2]
        assert 256 <= w <= 800 and 256 <= h <= 800
        assert 3 / 4 - 0.01 <= w / h <= 16 / 9 + 0.01
        assert 1 <= len(sc.instances) <= 6
        backgrounds.add(sc.background)
        for inst in sc.instances:
            shapes.add(inst.shape)
            colours.add(inst.colour)
            sizes.add(inst.size)
        plural += any(len(p.instances) >= 2 for p in sc.phrases)
        ghost += any(not p.instances for p in sc.phrases)
        inside += sc.relation == "inside"
        full = [shape_mask(i.shape, *i.geometry, w, h) for i in sc.instances]
        occluded += any((full[j] & full[k]).any() for j in range(len(full)) for k in range(j + 1, len(full)))
    assert backgrounds == set(scenes.BACKGROUNDS)
    assert shapes == set(scenes.SHAPES) and colours == set(COLOURS)
    assert {"tiny", "small", "large", "big", None} <= sizes
    assert plural and ghost and occluded and inside


def test_instance_masks_are_exactly_the_drawn_visible_pixels(many):
    for sc in many[:40]:
        h, w = sc.image.shape[:2]
        full = [shape_mask(i.shape, *i.geometry, w, h) for i in sc.instances]
        for k, inst in enumerate(sc.instances):
            later = np.zeros((h, w), bool)
            for m in full[k + 1:]:
                later |= m
            assert np.array_equal(inst.mask, full[k] & ~later)              # occluded pixels excluded
            assert inst.mask.sum() == full[k].sum() - (full[k] & later).sum()
            assert (sc.image[inst.mask] == COLOURS[inst.colour]).all()     # every visible pixel is painted
            x0, y0, x1, y1 = inst.box
            assert not inst.mask[:y0].any() and not inst.mask[y1:].any() and not inst.mask[:, x1:].any()
        for j in range(len(sc.instances)):
            for k in range(j + 1, len(sc.instances)):
                assert not (sc.instances[j].mask & sc.instances[k].mask).any()


def test_occlusion_hides_the_earlier_object():
    cfg = SceneConfig(objects=(2, 2), occlusion_p=1.0, inside_p=0.0, plural_p=0.0, hallucinate_p=0.0)
    found = 0
    for i in range(60):
        sc = generate(0, "test", i, cfg)
        h, w = sc.image.shape[:2]
        a, b = sc.instances
        fa, fb = (shape_mask(x.shape, *x.geometry, w, h) for x in (a, b))
        if (fa & fb).any():
            found += 1
            assert not (a.mask & fb).any() and b.mask.sum() == fb.sum()
            assert a.mask.sum() >= 0.5 * fa.sum()                          # min_visible
    assert found >= 3


def _named(words: list[str]) -> tuple[int, str, str]:
    """(count, colour, shape) a generated phrase says."""
    count = WORD_COUNT[words[0].lower()]
    shape = words[-1] if count == 1 else next(s for s, p in PLURALS.items() if p == words[-1])
    return count, words[-2], shape


def test_phrases_name_exactly_their_instances(many):
    checked_plural = checked_ghost = 0
    for sc in many:
        for text, phrases in [(sc.caption, sc.phrases)] + [
                (sc.conversation[t]["value"], [p for p in sc.conversation_phrases if p.turn == t]) for t in (1, 3)]:
            for p in phrases:
                assert text[p.start:p.end] == p.text
                words = p.text.split()
                if words[0].lower() == "the":        # "the red circles" in the answer turn
                    colour, shape = words[1], words[-1]
                    shape = next((s for s, pl in PLURALS.items() if pl == shape), shape)
                    count = len(p.instances)
                else:
                    count, colour, shape = _named(words)
                alike = [i.id for i in sc.instances if (i.shape, i.colour) == (shape, colour)]
                assert p.instances == alike, (sc.caption, p)
                if p.instances:
                    assert len(p.instances) == count
                    checked_plural += count > 1
                else:
                    checked_ghost += 1
        assert [p.text for p in sc.conversation_phrases if p.turn == 1] == [p.text for p in sc.phrases]
    assert checked_plural >= 5 and checked_ghost >= 5


def test_truth_line_masks_are_phrase_unions(many):
    sc = next(s for s in many if any(len(p.instances) >= 2 for p in s.phrases) and any(not p.instances for p in s.phrases))
    line = sc.truth("x")
    assert line["id"] == "x" and len(line["entities"]) == len(sc.phrases)
    for e, p in zip(line["entities"], sc.phrases):
        assert (e["start"], e["end"], e["phrase"], e["turn"]) == (p.start, p.end, p.text, None)
        if p.instances:
            assert np.array_equal(rle.decode(e["mask"]), sc.union_mask(p.instances))
        else:
            assert e["mask"] is None
    conv = sc.truth("x", conversation=True)["entities"]
    assert {e["turn"] for e in conv} == {1, 3}


def test_phrases_line_up_with_the_parser(many):
    from stages.phrases import extract_entities, load_spacy

    nlp = load_spacy()
    total = hit = 0
    for sc in many[:40]:
        spans = {(e["start"], e["end"]) for e in extract_entities(nlp(sc.caption)) if e["status"] is None}
        for p in sc.phrases:
            total += 1
            hit += (p.start, p.end) in spans
    assert hit >= 0.95 * total, (hit, total)


def test_experiment_scenes_use_the_generator():
    from devkit.experiments.shapes_scenes import COLOURS as EXP_COLOURS, SHAPES as EXP_SHAPES, scenes as exp_scenes

    train, test = exp_scenes(20, seed=0), exp_scenes(20, seed=0, split="test")
    assert {hashlib.sha256(s["image"].tobytes()).hexdigest() for s in train}.isdisjoint(
        hashlib.sha256(s["image"].tobytes()).hexdigest() for s in test)
    for s in train:
        assert s["image"].shape == (112, 112, 3)
        a, b = s["objects"]
        assert a["shape"] != b["shape"] and a["colour"] != b["colour"]
        assert {a["shape"], b["shape"]} <= set(EXP_SHAPES) and {a["colour"], b["colour"]} <= set(EXP_COLOURS)
        assert a["size"] in ("small", "large") and not (a["mask"] & b["mask"]).any()
        assert (s["image"][~(a["mask"] | b["mask"])] == 128).all()


# --- evaluate labels on a hand-made build ----------------------------------------------------

H = W = 20


def _box(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _enc(mask: np.ndarray) -> dict:
    return rle.encode(mask[None])[0]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _record(key, src, caption, entities, regions):
    rec = new_record(key, {"dataset": "t", "id": src}, W, H, "0" * 64, {"caption": caption})
    rec["entities"], rec["regions"] = entities, regions
    return rec


def _entity(i, caption, phrase, status, regions=(), turn=None):
    start = caption.index(phrase)
    return {"id": i, "phrase": phrase, "start": start, "end": start + len(phrase), "turn": turn,
            "root": phrase.split()[-1], "plural": False, "status": status, "regions": list(regions),
            "reason": None if status == "grounded" else f"{status}: x"}


def _region(i, entity, mask, accept, score):
    return {"id": i, "entity": entity, "box_xyxy": [0, 0, W, H], "det_score": score, "mask_rle": _enc(mask),
            "mask_score": 0.9, "area": int(mask.sum()),
            "verdict": {"accept": accept, "reason": "x", "judge": "rules", "prompt": "rules.v1"}}


CAP_A = "a red circle and a blue square and a green star"
CAP_B = "two yellow triangles, a pink hexagon, a black diamond and a white star on a gray background"


@pytest.fixture(scope="module")
def hand_build(tmp_path_factory):
    """Two samples with known IoUs, and the truth for them plus one input the build lacks."""
    from stages.write import ShardWriter

    root = tmp_path_factory.mktemp("labels")
    circle, square = _box(0, 0, 6, 6), _box(10, 10, 16, 16)
    a = _record("t-a", "a", CAP_A,
                [_entity(0, CAP_A, "a red circle", "grounded", [0]),
                 _entity(1, CAP_A, "a blue square", "grounded", [1]),
                 _entity(2, CAP_A, "a green star", "grounded", [2])],
                [_region(0, 0, circle, True, 0.91),
                 _region(1, 1, _box(13, 10, 19, 16), True, 0.87),        # IoU 18/54 = 1/3 with the square
                 _region(2, 2, _box(2, 12, 6, 16), True, 0.86)])
    tri1, tri2 = _box(0, 0, 4, 4), _box(8, 0, 12, 4)
    b = _record("t-b", "b", CAP_B,
                [_entity(0, CAP_B, "two yellow triangles", "grounded", [0, 1], turn=-1),   # -1: the caption too
                 _entity(1, CAP_B, "a pink hexagon", "rejected", turn=-1),
                 _entity(2, CAP_B, "a black diamond", "rejected", turn=-1),
                 _entity(3, CAP_B, "a gray background", "skipped", turn=-1)],
                [_region(0, 0, tri1, True, 0.9), _region(1, 0, tri2, True, 0.88),
                 _region(2, 1, _box(0, 10, 5, 15), False, 0.83), _region(3, 2, _box(5, 5, 9, 9), False, 0.81)])
    rows = [{"seq": k, "shard": 0, "key": rec["key"], "status": "ok", "reason": "", "image": _png(), "ext": "png",
             "record": dumps(rec), "item": "{}", "log": "[]", "times": "{}"} for k, rec in enumerate((a, b))]
    ShardWriter(root / "out", "t").write_shard(0, rows)

    def span(cap, phrase):
        s = cap.index(phrase)
        return s, s + len(phrase)

    def ent(cap, phrase, mask, turn=None, shift=0):
        s, e = span(cap, phrase)
        return {"turn": turn, "start": s + shift, "end": e + shift, "phrase": phrase,
                "mask": None if mask is None else _enc(mask)}

    truth = [
        {"id": "a", "entities": [ent(CAP_A, "a red circle", circle), ent(CAP_A, "a blue square", square, turn=-1),
                                 ent(CAP_A, "a green star", None)]},
        {"id": "t-b", "entities": [ent(CAP_B, "two yellow triangles", tri1 | tri2),
                                   ent(CAP_B, "a pink hexagon", None),
                                   ent(CAP_B, "a black diamond", _box(5, 5, 9, 9), shift=1),   # found by phrase
                                   ent(CAP_B, "a white star", _box(15, 15, 19, 19))]},          # not parsed
        {"id": "c", "entities": [{"turn": None, "start": 0, "end": 5, "phrase": "a cat", "mask": _enc(circle)}]},
    ]
    path = root / "truth.jsonl"
    path.write_text("# gold labels\n\n" + "".join(json.dumps(t) + "\n" for t in truth))
    return root / "out", path


def test_evaluate_labels_counts_and_scores(hand_build):
    from pipeline.evaluate_labels import evaluate_labels

    out, truth = hand_build
    report = evaluate_labels(out, truth)
    o = report["overall"]
    # named: circle, square, triangles, diamond, white star, cat = 6; correct: circle, triangles
    # grounded: circle, square (IoU 1/3), green star (names nothing), triangles = 4
    assert (o["entities"], o["names_something"], o["grounded"], o["correct"]) == (8, 6, 4, 2)
    assert o["precision"] == 0.5 and o["recall"] == round(2 / 6, 4) and o["f1"] == pytest.approx(0.4, abs=1e-3)
    assert (o["names_nothing"], o["false_grounded"], o["false_grounding_rate"]) == (2, 1, 0.5)
    c = report["counts"]
    assert (c["truth_lines"], c["lines_matched"], c["lines_without_sample"]) == (3, 2, 1)
    assert (c["matched_by_span"], c["matched_by_phrase"], c["matched_by_none"]) == (5, 1, 2)
    assert c["build_entities_unlabelled"] == 1                       # "a gray background"
    rows = {r["phrase"]: r for r in report["entities"]}
    assert rows["a red circle"]["iou"] == 1.0 and rows["two yellow triangles"]["iou"] == 1.0
    assert rows["a blue square"]["iou"] == pytest.approx(1 / 3, abs=1e-3) and not rows["a blue square"]["correct"]
    assert rows["a black diamond"]["matched"] == "phrase" and rows["a black diamond"]["status"] == "rejected"
    assert rows["a white star"]["status"] == "(not found)" and rows["a cat"]["status"] == "(no sample)"
    d = report["iou_distribution"]
    assert d["grounded_with_truth_mask"] == 3 and sum(b["count"] for b in d["bins"]) == 3
    assert d["bins"][-1]["count"] == 2 and d["bins"][3]["count"] == 1        # 1.0 twice, 0.333 once
    assert d["mean_iou_all"] == pytest.approx((1 + 1 / 3 + 1) / 6, abs=1e-3)
    status = {r["status"]: r for r in report["by_status"]}
    assert (status["grounded"]["entities"], status["grounded"]["correct"], status["grounded"]["precision"]) == (4, 2, 0.5)
    assert status["rejected"]["grounded"] == 0 and status["rejected"]["names_nothing"] == 1
    decision = {r["decision"]: r for r in report["by_decision"]}
    assert decision["rules: accept"]["entities"] == 4 and decision["rules: reject all"]["entities"] == 2
    bands = {r["band"]: r for r in report["by_det_score"]}
    assert bands["0.90-0.95"]["correct"] == 2 and bands["0.85-0.90"]["false_grounded"] == 1
    assert {r["root"] for r in report["by_root"]} >= {"circle", "square", "triangles", "cat"}
    assert evaluate_labels(out, truth, iou=0.3)["overall"]["correct"] == 3     # the square counts at 0.3


def test_conversation_turns_are_matched_by_turn(tmp_path):
    """The same phrase at the same offsets in two assistant turns, naming different shapes: each
    truth entity goes to its own turn's entity."""
    from pipeline.evaluate_labels import evaluate_labels
    from stages.write import ShardWriter

    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle."},
             {"from": "human", "value": "And the other?"}, {"from": "gpt", "value": "a red circle."}]
    rec = new_record("t-c", {"dataset": "t", "id": "c"}, W, H, "0" * 64, {"conversations": turns})
    rec["entities"] = [_entity(0, "a red circle.", "a red circle", "grounded", [0], turn=3),
                       _entity(1, "a red circle.", "a red circle", "grounded", [1], turn=1)]
    rec["regions"] = [_region(0, 0, _box(10, 10, 16, 16), True, 0.9), _region(1, 1, _box(0, 0, 6, 6), True, 0.9)]
    row = {"seq": 0, "shard": 0, "key": "t-c", "status": "ok", "reason": "", "image": _png(), "ext": "png",
           "record": dumps(rec), "item": "{}", "log": "[]", "times": "{}"}
    ShardWriter(tmp_path / "out", "t").write_shard(0, [row])
    truth = tmp_path / "truth.jsonl"
    truth.write_text(json.dumps({"id": "c", "entities": [
        {"turn": 3, "start": 0, "end": 12, "phrase": "a red circle", "mask": _enc(_box(10, 10, 16, 16))},
        {"turn": 1, "start": 0, "end": 12, "phrase": "a red circle", "mask": _enc(_box(0, 0, 6, 6))}]}) + "\n")
    report = evaluate_labels(tmp_path / "out", truth)
    assert [(r["turn"], r["iou"]) for r in report["entities"]] == [(3, 1.0), (1, 1.0)]
    assert report["overall"]["precision"] == 1.0 and report["overall"]["recall"] == 1.0
    assert report["counts"]["build_entities_unlabelled"] == 0


def test_evaluate_labels_cli_json_and_table(hand_build, tmp_path, capsys):
    from pipeline.cli import main

    out, truth = hand_build
    assert main(["evaluate", "labels", str(out), "--truth", str(truth), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["correct"] == 2
    target = tmp_path / "r.json"
    assert main(["evaluate", "labels", str(out), "--truth", str(truth), "--json", str(target)]) == 0
    text = capsys.readouterr().out
    for heading in ("Overall", "By entity status", "By phrase root", "By detector-score band", "By judge decision"):
        assert heading in text
    assert json.loads(target.read_text())["overall"] == report["overall"]


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "entities": [{"turn": null, "start": 0, "end": 3, "phrase": "a x", "mask": {"size": [20, 20]}}]}',
     "entities.0.mask.counts"),
    ('{"id": "a", "entities": [{"start": 0, "end": 3, "phrase": "a x"}]}', "entities.0.mask"),
    ('{"entities": []}', "field id"),
    ('{"id": "a", "entities": [{"turn": -3, "start": 0, "end": 3, "phrase": "a x", "mask": null}]}', "entities.0.turn"),
    ('{"id": "a", "entities": [{"start": 4, "end": 3, "phrase": "a x", "mask": null}]}', "end (3) must be after"),
    ('not json', "not JSON"),
])
def test_bad_truth_is_exit_2_naming_the_field(hand_build, tmp_path, capsys, line, message):
    from pipeline.cli import main

    out, _ = hand_build
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    assert main(["evaluate", "labels", str(out), "--truth", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.jsonl:1" in err


def test_truth_mask_of_another_size_is_refused(hand_build, tmp_path, capsys):
    from pipeline.cli import main

    out, _ = hand_build
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"id": "a", "entities": [{"turn": None, "start": 0, "end": 12, "phrase": "a red circle",
                                                        "mask": rle.encode(np.ones((1, 5, 5), bool))[0]}]}) + "\n")
    assert main(["evaluate", "labels", str(out), "--truth", str(bad)]) == 2
    assert re.search(r"mask size \[5, 5\] is not the stored image's \[20, 20\]", capsys.readouterr().err)


def test_coco_truth_converter(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.labels_truth import read_truth

    coco = {"images": [{"id": 7, "height": H, "width": W, "file_name": "x.png"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
                            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": _enc(_box(12, 12, 18, 18))}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    links = [{"id": "s7", "image_id": 7, "entities": [
        {"turn": None, "start": 0, "end": 9, "phrase": "two boxes", "annotations": [1, 2]},
        {"turn": None, "start": 14, "end": 19, "phrase": "a dog", "annotations": []}]}]
    (tmp_path / "links.jsonl").write_text("".join(json.dumps(x) + "\n" for x in links))
    out = tmp_path / "truth.jsonl"
    assert main(["evaluate", "coco-truth", str(tmp_path / "instances.json"), "--links", str(tmp_path / "links.jsonl"),
                 "--out", str(out)]) == 0
    truth = read_truth(out)
    both, dog = truth["s7"]
    mask = rle.decode(both.mask.model_dump())
    poly = rle.decode(rle.from_coco([[2, 2, 8, 2, 8, 8, 2, 8]], H, W))
    assert np.array_equal(mask, poly | _box(12, 12, 18, 18)) and 30 <= poly.sum() <= 49
    assert dog.mask is None
    links[0]["entities"][0]["annotations"] = [3]
    (tmp_path / "links.jsonl").write_text(json.dumps(links[0]) + "\n")
    assert main(["evaluate", "coco-truth", str(tmp_path / "instances.json"), "--links", str(tmp_path / "links.jsonl"),
                 "--out", str(out)]) == 2
    assert "annotation 3" in capsys.readouterr().err


# --- end to end on the offline sample --------------------------------------------------------

def test_sample_truth_and_evaluate_labels_on_the_sample_build(sample_out, sample_jsonl, capsys):
    from pipeline.cli import main
    from pipeline.labels_truth import read_truth

    truth_path = sample_jsonl.parent / "truth.jsonl"
    truth = read_truth(truth_path)
    rows: dict[str, dict] = {}
    for line in sample_jsonl.read_text().splitlines():                  # the first row of an id (one is repeated)
        rows.setdefault(json.loads(line)["id"], json.loads(line))
    held = set(heldout_ids())
    assert len(truth) == 13 + len(held) and "rotated-exif6" in truth and held <= set(truth)
    for ident, entities in truth.items():
        for e in entities:
            assert rows[ident]["caption"][e.start:e.end] == e.phrase
    assert main(["evaluate", "labels", str(sample_out), "--truth", str(truth_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    c, o = report["counts"], report["overall"]
    total = sum(len(v) for v in truth.values())
    # sample_out (sample-random.yaml) stops before the held-out scenes: their lines have no sample,
    # and their entities count as not grounded
    assert c["lines_matched"] == 13 and c["lines_without_sample"] == len(held)
    no_sample = [r for r in report["by_status"] if r["status"] == "(no sample)"]
    unbuilt = sum(len(truth[i]) for i in held)
    assert no_sample and no_sample[0]["entities"] == unbuilt and no_sample[0]["grounded"] == 0
    assert c["matched_by_span"] + c.get("matched_by_phrase", 0) + c.get("matched_by_none", 0) == total == o["entities"]
    assert c["matched_by_span"] >= 0.9 * (total - unbuilt)          # truth spans are the parser's spans
    assert o["names_something"] + o["names_nothing"] == total and o["names_nothing"] >= 3
    assert 0 <= o["correct"] <= o["grounded"] <= total
    assert sum(r["entities"] for r in report["by_status"]) == total
    assert sum(r["entities"] for r in report["by_decision"]) == total


def test_sample_llava_variant_carries_conversation_truth(tmp_path):
    from devkit.sample_data import write_sample_variants
    from pipeline.labels_truth import read_truth

    paths = write_sample_variants(tmp_path)
    convs = {row["id"]: row["conversations"] for row in json.loads(paths["llava"].read_text())}
    truth = read_truth(paths["llava_truth"])
    assert len(truth) == 12 and {e.turn for v in truth.values() for e in v} == {1, 3}
    for ident, entities in truth.items():
        assert len(convs[ident]) == 4 and convs[ident][1]["from"] == "gpt"
        for e in entities:
            assert convs[ident][e.turn]["value"][e.start:e.end] == e.phrase
