"""Reduced shapes instrument (``--quick``: 64 px scenes, one seed, λ = 0 and λ > 0 from the same
initial weights on the same fresh scenes): the λ > 0 model must ground better on held-out scenes
(gIoU over λ = 0's, also over λ = 0's layer chosen on val) and must not be blind (its question
accuracy drops when the images are swapped within the batch).

Margins seen while choosing the setting (QUICK: 300 steps, lr 2e-3; λ = 0.3; seeds 0 / 1 / 2 / 3):
gIoU over λ = 0 +0.116 / +0.090 / +0.152 / +0.124, over λ = 0's val-chosen layer +0.117 / +0.058 /
+0.153 / +0.077; the λ = 0.3 model's accuracy drop with swapped images 0.060 / 0.080 / 0.147 /
0.070 (2.5 / 3.8 / 4.9 / 3.2 standard errors). The test runs seed 2 and asks for +0.05, +0.03 and a
drop of more than 0.03 and 2 standard errors: every seed tried passes (seed 2 with the 80 test
captions of QUICK: gIoU 0.186 -> 0.345, λ = 0's val-chosen layer 0.183, drop 0.147 ± 0.030). At
200-240 steps (lr 2e-3 to 3e-3) the λ = 0.3 model was still blind in three of four seeds, hence
300 steps. 63-72 s here with other work running (CPU-bound). Marked slow."""
from __future__ import annotations

import math

import pytest

SEED = 2
LAMBDA = 0.3
GIOU_MARGIN, LAYER_MARGIN, SWAP_MARGIN = 0.05, 0.03, 0.03


@pytest.mark.slow
def test_wtl_grounds_better_and_still_looks(tmp_path):
    from devkit.experiments.shapes import QUICK, run_shapes
    from devkit.experiments.shapes_report import RESULT_FIELDS, format_results

    rows = run_shapes(tmp_path, seeds=[SEED], st=QUICK, lams=[LAMBDA])
    by = {r["lambda"]: r for r in rows}
    base, wtl = by[0.0], by[LAMBDA]
    assert wtl["giou"] > base["giou"] + GIOU_MARGIN, (base, wtl)
    assert wtl["giou"] > base["giou_val_layer"] + LAYER_MARGIN, (base, wtl)
    assert not wtl["blind"] and wtl["swap_drop"] > SWAP_MARGIN, wtl
    assert wtl["qa_acc"] > wtl["qa_constant"], wtl
    for r in rows:
        assert set(RESULT_FIELDS) <= set(r) and r["n_questions"] == QUICK.test_questions
        for k in ("giou", "pointing", "oracle_giou", "qa_acc", "qa_constant", "qa_image_swapped"):
            assert 0.0 <= r[k] <= 1.0 and not math.isnan(r[k]), (k, r)
        assert r["giou"] < r["oracle_giou"] and r["caption_nll"] > 0
    text = format_results(rows)
    assert f"| {SEED} | 0.0 | phrase | constant |" in text and f"| {SEED} | {LAMBDA} |" in text
