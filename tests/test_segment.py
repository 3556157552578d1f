"""segment: SAM masks on the tiny RANDOM model, RLE at the stored image's size; ground+segment."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest_models import (  # noqa: F401
    cpu_runtime,
    detect_config,
    gdino_dir,
    make_batch,
    make_record,
    random_pixels,
    sam_dir,
    segment_config,
    segment_stage,
    two_image_batch,
)
from stages import record as rec
from stages.models import model_ref
from stages.segment import encode_masks, scale_boxes


def _boxed_batch() -> dict:
    """Three ok rows of different sizes with hand-made boxes (one with none) and a rejected row."""
    a = make_record("seg-a", "A cat on a mat.", ["A cat", "a mat"], 640, 480)
    a["regions"] = [{"id": 0, "entity": 0, "box_xyxy": [10.0, 20.0, 300.0, 400.0], "det_score": 0.9},
                    {"id": 1, "entity": 1, "box_xyxy": [0.0, 300.0, 640.0, 480.0], "det_score": 0.5},
                    {"id": 2, "entity": 0, "box_xyxy": [100.5, 50.25, 101.5, 51.75], "det_score": 0.4}]
    b = make_record("seg-b", "A tall tower.", ["A tall tower"], 120, 333)
    b["regions"] = [{"id": 0, "entity": 0, "box_xyxy": [30.0, 10.0, 90.0, 320.0], "det_score": 0.7}]
    c = make_record("seg-c", "Nothing found.", ["Nothing"], 50, 40)
    d = make_record("seg-d", "A dog.", ["A dog"], 64, 48)
    d["regions"] = [{"id": 0, "entity": 0, "box_xyxy": [1.0, 1.0, 20.0, 20.0], "det_score": 0.7}]
    pixels = [random_pixels(480, 640, 5), random_pixels(333, 120, 6), random_pixels(40, 50, 7),
              random_pixels(48, 64, 8)]
    return make_batch([a, b, c, d], pixels, [rec.ROW_OK, rec.ROW_OK, rec.ROW_OK, rec.ROW_REJECTED])


def _check_masks(record: dict, height: int, width: int) -> None:
    for region in record["regions"]:
        rle = region["mask_rle"]
        assert rle["size"] == [height, width]
        assert isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert decoded.shape == (height, width)
        assert region["area"] == int(decoded.sum())
        assert isinstance(region["mask_score"], float) and 0.0 <= region["mask_score"] <= 1.0
    assert not [p for p in rec.check_record(record) if "mask" in p or "box" in p]


def test_encode_masks_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 7, 11)) > 0.5
    rles = encode_masks(masks)
    assert [r["size"] for r in rles] == [[7, 11]] * 3
    for m, r in zip(masks, rles):
        assert np.array_equal(mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}), m)
    assert encode_masks(np.zeros((0, 4, 4), bool)) == []


def test_scale_boxes_matches_sam_processor(segment_stage):
    processor = segment_stage.processor
    image = random_pixels(333, 120)
    box = [30.0, 10.0, 90.0, 320.0]
    enc = processor(images=[image], input_boxes=[[box]], return_tensors="pt")
    original = tuple(int(v) for v in enc["original_sizes"][0])
    reshaped = tuple(int(v) for v in enc["reshaped_input_sizes"][0])
    assert torch.allclose(scale_boxes([box], original, reshaped), enc["input_boxes"][0].float())


def test_segment_stage_masks_at_stored_size(segment_stage):
    batch = _boxed_batch()
    out = segment_stage(batch)
    assert out["record"][3] == batch["record"][3]  # rejected row untouched
    ref = model_ref(segment_stage.segment.model)
    for i, (h, w) in enumerate([(480, 640), (333, 120), (40, 50)]):
        record = rec.loads(out["record"][i])
        assert record["provenance"]["segmenter"] == ref
        _check_masks(record, h, w)
    assert len(rec.loads(out["record"][0])["regions"]) == 3
    assert rec.loads(out["record"][2])["regions"] == []


def test_segment_stage_is_deterministic_and_idempotent(segment_stage):
    first = segment_stage(_boxed_batch())
    second = segment_stage(_boxed_batch())
    assert first["record"] == second["record"]
    # Regions that already carry a mask are not segmented again.
    assert segment_stage(first)["record"] == first["record"]


def test_ground_and_segment_two_sizes_one_batch(gdino_dir, sam_dir):
    from stages.ground_segment import GroundAndSegment

    stage = GroundAndSegment(detect_config(gdino_dir, batch_size=4), segment_config(sam_dir, batch_size=4),
                             cpu_runtime())
    stage.setup()
    batch = two_image_batch()
    out = stage(batch)
    assert out["record"][2] == batch["record"][2]
    sizes = {0: (480, 640), 1: (300, 200)}
    total = 0
    for i, (h, w) in sizes.items():
        record = rec.loads(out["record"][i])
        assert set(record["provenance"]) >= {"detector", "segmenter"}
        for region in record["regions"]:
            x0, y0, x1, y1 = region["box_xyxy"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        _check_masks(record, h, w)
        total += len(record["regions"])
    assert total > 0
    assert stage(two_image_batch())["record"] == out["record"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_ground_and_segment_on_cuda_bf16(gdino_dir, sam_dir):
    from pipeline.manifest import RuntimeConfig
    from stages.ground_segment import GroundAndSegment

    stage = GroundAndSegment(detect_config(gdino_dir), segment_config(sam_dir),
                             RuntimeConfig(executor="local", device="cuda", dtype="auto"))
    out = stage(two_image_batch())
    for i, (h, w) in {0: (480, 640), 1: (300, 200)}.items():
        _check_masks(rec.loads(out["record"][i]), h, w)
