"""GPU fast path pieces, on CPU: CPU-side resize + device-side normalise == the processors,
prepared columns change nothing, batched SAM decoding, padded GroundingDINO batches, the pre-NMS
cap (the RLE is the record module's: tests/test_record.py)."""
from __future__ import annotations

import numpy as np
import torch

from conftest_models import (  # noqa: F401
    cpu_runtime,
    detect_config,
    gdino_dir,
    make_batch,
    make_record,
    random_pixels,
    sam_dir,
    segment_config,
    two_image_batch,
)
from stages import record as rec
from stages.prep import ImagePrep

SIZES = [(480, 640), (640, 480), (333, 120), (40, 50), (427, 640), (1, 7)]


def _processors(gdino_dir, sam_dir):
    from transformers import AutoProcessor, GroundingDinoImageProcessor, SamImageProcessor, SamProcessor

    return [(GroundingDinoImageProcessor(), "gdino"), (SamImageProcessor(), "sam"),
            (AutoProcessor.from_pretrained(str(gdino_dir)).image_processor, "gdino"),
            (SamProcessor.from_pretrained(str(sam_dir)).image_processor, "sam")]


def test_prep_matches_the_image_processors(gdino_dir, sam_dir):
    for processor, kind in _processors(gdino_dir, sam_dir):
        prep = ImagePrep(processor, kind)
        for h, w in SIZES:
            image = random_pixels(h, w, h + w)
            want = processor([image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
            resized = prep.resize(image)
            assert resized.dtype == np.uint8 and resized.shape[2] == 3
            values, mask = prep.upload([resized], torch.device("cpu"))
            assert tuple(values.shape) == tuple(want.shape), (kind, h, w)
            assert torch.allclose(values, want.float(), atol=1e-3), (kind, h, w, float((values - want).abs().max()))
            assert int(mask.sum()) == resized.shape[0] * resized.shape[1]


def test_upload_pads_mixed_sizes_with_zeros_and_a_mask(gdino_dir, sam_dir):
    processor, _ = _processors(gdino_dir, sam_dir)[2]
    prep = ImagePrep(processor, "gdino")
    a, b = prep.resize(random_pixels(480, 640, 1)), prep.resize(random_pixels(300, 200, 2))
    values, mask = prep.upload([a, b], torch.device("cpu"))
    h = max(a.shape[0], b.shape[0]); w = max(a.shape[1], b.shape[1])
    assert tuple(values.shape) == (2, 3, h, w)
    alone, _ = prep.upload([b], torch.device("cpu"))
    assert torch.equal(values[1, :, : b.shape[0], : b.shape[1]], alone[0])
    assert values[1, :, b.shape[0]:].abs().sum() == 0 and values[1, :, :, b.shape[1]:].abs().sum() == 0
    assert int(mask[1].sum()) == b.shape[0] * b.shape[1]


def _stage(gdino_dir, sam_dir, **detect):
    from stages.ground_segment import GroundAndSegment

    stage = GroundAndSegment(detect_config(gdino_dir, batch_size=4, **detect), segment_config(sam_dir, batch_size=2),
                             cpu_runtime())
    stage.setup()
    return stage


def test_prepared_columns_change_nothing(gdino_dir, sam_dir):
    from stages.ground_segment import PREPARED_COLUMNS, PrepareStage

    stage = _stage(gdino_dir, sam_dir)
    plain = stage(two_image_batch())
    prep = PrepareStage(stage.ground.detect, stage.segment.segment, cpu_runtime())
    prepared = prep(two_image_batch())
    assert all(name in prepared for name in PREPARED_COLUMNS)
    assert prepared[PREPARED_COLUMNS[0]][2].size == 0  # rejected row: nothing prepared
    assert prepared[PREPARED_COLUMNS[1]][3].size == 0  # only a skipped entity: the models never see it
    assert prepared[PREPARED_COLUMNS[0]][0].shape[2] == 3 and prepared[PREPARED_COLUMNS[1]][1].size > 0
    out = stage(prepared)
    assert not any(name in out for name in PREPARED_COLUMNS)
    assert list(out["record"]) == list(plain["record"])
    # the stages called one after the other (no overlap) give the very same records
    assert list(stage.segment(stage.ground(two_image_batch()))["record"]) == list(plain["record"])


def test_batched_mask_decoding_matches_one_image_at_a_time(gdino_dir, sam_dir):
    stage = _stage(gdino_dir, sam_dir)
    images = [random_pixels(480, 640, 1), random_pixels(300, 200, 2), random_pixels(64, 48, 3)]
    boxes = [[[10.0, 20.0, 300.0, 400.0], [0.0, 300.0, 640.0, 480.0], [5.0, 5.0, 50.0, 60.0]],
             [[30.0, 10.0, 90.0, 280.0]], []]
    together = stage.segment.segment_images(images, boxes)
    for i in range(3):
        alone = stage.segment.segment_images([images[i]], [boxes[i]])[0]
        assert together[i][0].shape == alone[0].shape
        for a, b in zip(together[i][0], alone[0]):
            inter, union = np.logical_and(a, b).sum(), np.logical_or(a, b).sum()
            assert union == 0 or inter / union > 0.98
        assert np.allclose(together[i][1], alone[1], atol=1e-3)
    assert together[2][0].shape == (0, 64, 48)


def test_padded_detector_batches(gdino_dir, sam_dir):
    stage = _stage(gdino_dir, sam_dir, batching="pad")
    out = stage(two_image_batch())
    for i, (h, w) in {0: (480, 640), 1: (300, 200)}.items():
        for region in rec.loads(out["record"][i])["regions"]:
            x0, y0, x1, y1 = region["box_xyxy"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert region["mask_rle"]["size"] == [h, w]


def test_pre_nms_cap_keeps_the_best_boxes():
    from stages.phrase_boxes import PRE_NMS_TOP_K, select_boxes

    n = PRE_NMS_TOP_K * 3
    g = torch.Generator().manual_seed(0)
    xy = torch.rand((n, 2), generator=g) * 900
    boxes = torch.cat([xy, xy + 20 + torch.rand((n, 2), generator=g) * 50], dim=1)
    scores = torch.rand(n, generator=g)
    labels = torch.zeros(n, dtype=torch.long)
    kept = select_boxes(boxes.clone(), scores, labels, 1000, 1000, 0.5, 1)
    assert kept.tolist() == [int(torch.argmax(scores))]


def test_batch_phrase_scores_equal_phrase_scores():
    from stages.phrase_boxes import batch_phrase_scores, phrase_scores

    g = torch.Generator().manual_seed(1)
    logits = torch.randn((3, 50, 20), generator=g) * 3
    logits[1, :, 15:] = float("-inf")  # padding of a shorter prompt
    spans = [[(1, 3), (4, 7), (8, 8)], [(1, 2)], [(2, 5), (6, 9), (10, 14), (15, 19)]]
    keep, scores = batch_phrase_scores(logits, spans, 0.6, 0.5)
    for b, row in enumerate(spans):
        k1, s1 = phrase_scores(logits[b], row, 0.6, 0.5)
        assert torch.equal(scores[b, :, : len(row)], s1)
        assert torch.equal(keep[b, :, : len(row)], k1)
        assert not keep[b, :, len(row):].any()
