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

    assert Image.open(overlays / "s0-0.png").size == (112, 112)
    assert json.loads(capsys.readouterr().out)["entities"] == result["entities"]
    # other thresholds and --limit
    assert main(["evaluate", "grounding", "--model", str(model), "--shards", str(data), "--threshold", "topk",
                 "--value", "0.2", "--limit", "2", "--layers", "0", "3", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["entities"] == 4


def test_evaluate_grounding_single_image(setup, capsys):
    root, model, _, sc = setup
    from PIL import Image

    img = root / "scene.png"
    Image.fromarray(sc[0]["image"]).save(img)
    overlays = root / "single"
    rc = main(["evaluate", "grounding", "--model", str(model), "--image", str(img), "--phrase", "red circle",
               "--phrase", "blue square", "--overlays", str(overlays)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["phrase"] for p in out["phrases"]] == ["red circle", "blue square"]
    assert all(0.0 < p["mask_fraction"] <= 1.0 for p in out["phrases"])
    assert sorted(p.name for p in overlays.glob("*.png")) == ["scene-blue_square.png", "scene-red_circle.png"]


def test_evaluate_grounding_bad_input(setup):
    root, model, _, _ = setup
    assert main(["evaluate", "grounding", "--model", str(model)]) == 2
    img = root / "scene.png"
    if img.exists():
        assert main(["evaluate", "grounding", "--model", str(model), "--image", str(img), "--phrase", "x",
                     "--caption", "a red circle."]) == 2
