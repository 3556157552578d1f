"""The shapes instrument's pseudo-label arm (devkit/experiments/shapes_pseudo.py): training captions
relabelled by the engine itself (manifests/sample.yaml: the committed small trained models, rules
judge), their quality counted against the exact masks, and the arm wired through run_shapes."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from devkit.experiments import shapes_tasks as T


@pytest.fixture(scope="module")
def labeler():
    from devkit.experiments.shapes_pseudo import PseudoLabeler

    return PseudoLabeler()


def test_engine_labels_replace_the_generators_and_are_counted(labeler):
    from stages.train.data import entity_mask

    scs = [T.scene(5, "train", i, 64) for i in range(12)]
    exact = [T.caption_record(f"train{i:06d}", sc) for i, sc in enumerate(scs)]
    before = labeler.summary()
    pseudo = labeler.relabel(exact, [sc.image for sc in scs])
    after = labeler.summary()
    assert [p["key"] for p in pseudo] == [e["key"] for e in exact]
    assert [p["text"]["caption"] for p in pseudo] == [e["text"]["caption"] for e in exact]
    assert after["samples"] - before["samples"] == 12
    assert after["phrases"] - before["phrases"] == sum(len(e["entities"]) for e in exact)
    # the labels are the engine's: verdicts from the rules judge, masks that are not the exact ones
    judges = {r["verdict"]["judge"] for p in pseudo for r in p["regions"] if r.get("verdict")}
    assert judges and "generator" not in judges
    grounded = [(p, e) for p in pseudo for e in p["entities"] if e["status"] == "grounded"]
    assert grounded, "the trained models ground none of 12 scenes"
    exact_masks = [entity_mask(x, e) for x in exact for e in x["entities"]]
    assert not all(any(np.array_equal(entity_mask(p, e), m) for m in exact_masks) for p, e in grounded)
    # counted against the truth: correct <= grounded <= phrases, and the trained models get some right
    assert 0 < after["correct"] <= after["grounded"] <= after["phrases"]


def test_pseudo_arm_runs_beside_the_exact_one(tmp_path):
    from devkit.experiments.shapes import QUICK, run_shapes

    st = replace(QUICK, steps=3, test_questions=8, test_captions=6, val_captions=4, val_questions=0)
    rows = run_shapes(tmp_path, seeds=[0], st=st, lams=[0.3], labels=("exact", "pseudo"))
    assert [(r["lambda"], r["labels"]) for r in rows] == [(0.0, "exact"), (0.3, "exact"), (0.3, "pseudo")]
    q = rows[-1]["pseudo_labels"]
    assert q["samples"] == st.steps * st.batch_size // 2 and q["phrases"] >= q["samples"]
    assert "pseudo_labels" not in rows[1]
    # held-out scoring is the same for both arms: against exact masks, same items
    assert rows[1]["entities"] == rows[2]["entities"] and rows[1]["n_questions"] == rows[2]["n_questions"]


def test_cli_rejects_unknown_labels(capsys, tmp_path):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["experiment", "shapes", "--quick", "--work", str(tmp_path), "--labels", "noisy"])
    assert exc.value.code == 2 and "--labels" in capsys.readouterr().err
