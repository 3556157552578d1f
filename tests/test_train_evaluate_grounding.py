"""`lookandlearn evaluate grounding` on a tiny random LLaVA model and a generated shapes shard:
metric keys and ranges, overlays written, JSON written, the single-image mode, bad input."""
from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from devkit.experiments.shapes_scenes import scene_record, scenes, write_shard
from train_support import tiny_vlm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-grounding")
    model = tiny_vlm(root, "llava", image_size=112, patch_size=8)
    sc = scenes(5, seed=11)
    items = [scene_record(f"s{i}", s) for i, s in enumerate(sc)] + [scene_record("q0", sc[0], question=1)]
    shard = write_shard(root / "data" / "shards" / "shapes-000000.tar", items)
    return root, model, shard.parent.parent, sc


def test_evaluate_grounding_shards(setup, capsys):
    root, model, data, sc = setup
    overlays, out_json = root / "overlays", root / "grounding.json"
    rc = main(["evaluate", "grounding", "--model", str(model), "--shards", str(data), "--overlays", str(overlays),
               "--json", str(out_json)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert set(result) >= {"giou", "ciou", "pointing", "entities"}
    assert result["entities"] == 2 * len(sc)  # the question sample has no grounded entity
    for k in ("giou", "ciou", "pointing"):
        assert 0.0 <= result[k] <= 1.0, (k, result)
    pngs = sorted(p.name for p in overlays.glob("*.png"))
    assert len(pngs) == 2 * len(sc) and pngs[0] == "s0-0.png"
    from PIL import Image

    import numpy as np

    from stages.train.overlay import MIN_SIDE, TRUE_COLOUR

    overlay = np.asarray(Image.open(overlays / "s0-0.png").convert("RGB"))
    # the 112 px image scaled up to MIN_SIDE, a caption strip (phrase, legend) below it
    assert overlay.shape[1] == MIN_SIDE and overlay.shape[0] > MIN_SIDE
    picture = overlay[:MIN_SIDE]
    assert (np.abs(picture.astype(int) - TRUE_COLOUR).sum(-1) < 10).sum() > 100  # the true mask's outline
    assert np.unique(picture.reshape(-1, 3), axis=0).shape[0] > 50  # a colour map, not a one-colour wash
    assert json.loads(capsys.readouterr().out)["entities"] == result["entities"]
    # other thresholds and --limit
    assert main(["evaluate", "grounding", "--model", str(model), "--shards", str(data), "--threshold", "topk",
                 "--value", "0.2", "--limit", "2", "--layers", "0", "3", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["entities"] == 4


def test_evaluate_grounding_single_image(setup, capsys):
    root, model, _, sc = setup
    from PIL import Image

    import numpy as np

    from stages.train.overlay import UNSEEN_GREY

    img = root / "scene.png"
    # wider than high: LLaVA's centre crop cuts the sides away, the overlay greys them out
    wide = np.concatenate([np.zeros((112, 40, 3), np.uint8), sc[0]["image"], np.zeros((112, 40, 3), np.uint8)], 1)
    Image.fromarray(wide).save(img)
    overlays = root / "single"
    rc = main(["evaluate", "grounding", "--model", str(model), "--image", str(img), "--phrase", "red circle",
               "--phrase", "blue square", "--overlays", str(overlays)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["phrase"] for p in out["phrases"]] == ["red circle", "blue square"]
    assert all(0.0 < p["mask_fraction"] <= 1.0 for p in out["phrases"])
    assert sorted(p.name for p in overlays.glob("*.png")) == ["scene-blue_square.png", "scene-red_circle.png"]
    picture = np.asarray(Image.open(overlays / "scene-red_circle.png").convert("RGB"))
    edge, centre = picture[100, 5].astype(int), picture[100, picture.shape[1] // 2].astype(int)
    assert np.abs(edge - np.array(UNSEEN_GREY) * 0.7).max() < 20  # black pixels under the grey veil
    assert np.abs(centre - edge).max() > 10


def test_evaluate_grounding_bad_input(setup):
    root, model, _, _ = setup
    assert main(["evaluate", "grounding", "--model", str(model)]) == 2
    img = root / "scene.png"
    if img.exists():
        assert main(["evaluate", "grounding", "--model", str(model), "--image", str(img), "--phrase", "x",
                     "--caption", "a red circle."]) == 2
