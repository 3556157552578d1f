"""Reduced shapes experiment (one seed, 400 steps, 160 training scenes; ~1.5 min on a 2-core CPU):
λ > 0 must raise held-out attention-mask gIoU over λ = 0 by a clear margin, also over the λ = 0
model's best single layer. Margin seen while choosing the setting (seeds 0, 1, 2): gIoU
+0.24 / +0.27 / +0.25 over λ = 0 in the same layers and +0.14 / +0.18 / +0.27 over λ = 0's best
layer; the test asks for +0.10 and +0.05. With the scenes from devkit/scenes.py (seed 0, measured
when the experiment moved to it): gIoU 0.096 -> 0.386, +0.29 over λ = 0 and +0.21 over its best
layer (0.180). Marked slow."""
from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_wtl_raises_heldout_attention_iou(tmp_path):
    from devkit.experiments.shapes import QUICK, format_results, run_shapes

    rows = run_shapes(tmp_path, seeds=[0], st=QUICK)
    by = {r["lambda"]: r for r in rows}
    base, wtl = by[0.0], by[QUICK.lam]
    assert wtl["final_wtl_loss"] < base["final_wtl_loss"]
    assert wtl["final_train_iou"] > base["final_train_iou"]
    assert wtl["giou"] > base["giou"] + 0.10, (base, wtl)
    assert wtl["giou"] > base["best_layer_giou"] + 0.05, (base, wtl)
    for r in rows:
        for k in ("giou", "ciou", "pointing", "own_gt_other", "question_acc"):
            assert 0.0 <= r[k] <= 1.0 and not math.isnan(r[k]), (k, r)
    text = format_results(rows, QUICK)
    assert "| 0 | 0.0 |" in text and f"| 0 | {QUICK.lam} |" in text and "torch" in text
