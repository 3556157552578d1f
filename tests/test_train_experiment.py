"""Reduced shapes experiment (one seed, few steps): λ > 0 must raise held-out attention-mask
gIoU over λ = 0 by a clear margin. Several minutes on a 2-core CPU: marked slow."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_wtl_raises_heldout_attention_iou(tmp_path):
    from pipeline.experiment import QUICK, run_shapes

    rows = run_shapes(tmp_path, seeds=[0], st=QUICK)
    by = {r["lambda"]: r for r in rows}
    base, wtl = by[0.0], by[QUICK.lam]
    assert wtl["final_wtl_loss"] < base["final_wtl_loss"]
    assert wtl["giou"] > base["giou"] + 0.05, (base, wtl)
