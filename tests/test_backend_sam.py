"""segment.backend: segment-anything — the original package and an original .pth.

A tiny random SAM is written in the original format (``devkit/tiny_original.py``, the package's
own classes) and converted with the same weights to a transformers folder (``lookandlearn
convert sam``, transformers' key mapping). Both backends must give the same masks for the same
images and boxes; the adapter must agree with the package's own ``SamPredictor``; bad checkpoints
stop a build with exit 2 naming ``segment.model``. RANDOM weights: only agreement is measured.
"""
from __future__ import annotations

import json
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything", reason="segment-anything (extra [sam]) is not installed")

from conftest_models import cpu_runtime, segment_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def sam_pth(tmp_path_factory) -> Path:
    from devkit.tiny_original import write_tiny_sam_checkpoint

    return write_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam-original") / "sam_tiny.pth")


@pytest.fixture(scope="module")
def sam_converted(sam_pth, tmp_path_factory) -> Path:
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("sam-converted") / "hf"
    assert main(["convert", "sam", str(sam_pth), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def stages(sam_pth, sam_converted):
    from stages.segment import SegmentStage

    original = SegmentStage(segment_config(sam_pth, backend="segment-anything", batch_size=2), cpu_runtime())
    converted = SegmentStage(segment_config(sam_converted), cpu_runtime())
    original.setup()
    converted.setup()
    return original, converted


def _images_and_boxes():
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
              rng.integers(0, 256, (300, 200, 3), dtype=np.uint8),
              rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)]
    boxes = [[[10, 20, 300, 400], [100, 100, 600, 470], [0, 0, 640, 480], [320, 10, 330, 30]],
             [[5, 5, 150, 250]],
             [[30, 40, 200, 220], [0, 0, 100, 100]]]
    return images, boxes


def test_original_and_converted_give_the_same_masks(stages):
    original, converted = stages
    images, boxes = _images_and_boxes()
    a = original.segment_images(images, boxes)
    b = converted.segment_images(images, boxes)
    ious, fills = [], []
    for (ma, sa), (mb, sb), img in zip(a, b, images):
        assert ma.shape == mb.shape and ma.shape[1:] == img.shape[:2]
        ious += [_iou(x, y) for x, y in zip(ma, mb)]
        fills += [float(x.mean()) for x in ma]
        np.testing.assert_allclose(sa, sb, rtol=1e-3, atol=1e-5)
    assert min(ious) >= 0.99, ious
    # the masks are neither empty nor full, so the IoU above compares something
    assert any(0.02 < f < 0.98 for f in fills), fills


def test_adapter_matches_the_packages_own_predictor(stages):
    from segment_anything import SamPredictor

    original, _ = stages
    images, boxes = _images_and_boxes()
    ours = original.segment_images(images, boxes)
    predictor = SamPredictor(original.model.sam)
    for image, bxs, (masks, scores) in zip(images, boxes, ours):
        predictor.set_image(image)
        prompt = predictor.transform.apply_boxes_torch(torch.tensor(bxs, dtype=torch.float32), image.shape[:2])
        ref, ref_scores, _ = predictor.predict_torch(None, None, boxes=prompt, multimask_output=False)
        for x, y in zip(masks, ref[:, 0].numpy()):
            assert _iou(x, y) >= 0.99
        # SamPredictor resizes with PIL, the stage with torchvision: nearly, not exactly, the same pixels
        np.testing.assert_allclose(scores, ref_scores[:, 0].numpy(), rtol=0.05, atol=1e-3)


def test_released_sizes_are_read_and_built_by_the_registry():
    from segment_anything import sam_model_registry

    from stages.backends.segment_anything import read_arch

    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            state = sam_model_registry[name]().state_dict()
        assert read_arch(state).registry_name == name
    with torch.device("meta"):
        state = sam_model_registry["vit_b"]().state_dict()
    state["image_encoder.blocks.0.mlp.lin1.weight"] = torch.empty(100, 768, device="meta")
    assert read_arch(state).registry_name is None  # not a released size: built from its shapes


def _sample_build(tmp_path, sample_manifest_args, overrides):
    from pipeline.cli import main

    out = tmp_path / "out"
    code = main(["build", str(REPO / "manifests" / "sample-random.yaml"), "--out", str(out), "--no-progress",
                 *(f"--set={o}" for o in sample_manifest_args + ["runtime.executor=local", "input.limit=10"]
                                                      + overrides)])
    return code, out


def test_sample_builds_with_the_original_backend(tmp_path, sample_manifest_args, sam_pth):
    code, out = _sample_build(tmp_path, sample_manifest_args,
                              [f"segment.model={sam_pth}", "segment.backend=segment-anything"])
    assert code == 0
    resolved = (out / "manifest.resolved.yaml").read_text()
    assert "backend: segment-anything" in resolved
    masks = 0
    import tarfile

    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tf.extractfile(member).read())
                    assert record["provenance"]["segmenter"] == f"segment-anything:{sam_pth.resolve()}"
                    for region in record.get("regions", []):
                        if region.get("mask_rle"):
                            masks += 1
                            assert region["mask_rle"]["size"] == [record["image"]["height"], record["image"]["width"]]
                            assert 0.0 <= region["mask_score"] <= 1.0
    assert masks > 0


class _NotWeights:
    pass


def _bad_checkpoints(tmp_path: Path, sam_pth: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    wrong_model = tmp_path / "wrong_model.pth"
    torch.save({"backbone.0.weight": torch.zeros(3, 3), "transformer.level_embed": torch.zeros(4, 8)}, wrong_model)
    objects = tmp_path / "objects.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": Fraction(1, 3)}, objects)
    plain_pickle = tmp_path / "pickle.pth"
    plain_pickle.write_bytes(pickle.dumps(_NotWeights()))
    state = torch.load(sam_pth, weights_only=True)
    del state["image_encoder.blocks.1.attn.qkv.weight"]
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 64)
    truncated = tmp_path / "truncated.pth"
    torch.save(state, truncated)
    return {"text": (text, "not a PyTorch checkpoint"), "wrong model": (wrong_model, "not a SAM checkpoint"),
            "objects": (objects, "other than weights"), "pickle": (plain_pickle, "other than weights"),
            "wrong shapes": (truncated, "does not fit the SAM architecture"),
            "missing": (tmp_path / "nope.pth", "no such checkpoint file"),
            "folder": (tmp_path, "is a folder")}


def test_bad_checkpoints_stop_the_build_with_exit_2_naming_the_field(tmp_path, sample_manifest_args, sam_pth,
                                                                       capsys):
    for label, (path, why) in _bad_checkpoints(tmp_path, sam_pth).items():
        code, out = _sample_build(tmp_path / label.replace(" ", "_"), sample_manifest_args,
                                  [f"segment.model={path}", "segment.backend=segment-anything"])
        err = capsys.readouterr().err
        assert code == 2, (label, err)
        assert "segment.model" in err and why in err, (label, err)
        assert not (out / "shards").exists() or not any((out / "shards").iterdir())


def test_convert_refuses_a_bad_checkpoint_with_exit_2(tmp_path, sam_pth, capsys):
    from pipeline.cli import main

    path, _ = _bad_checkpoints(tmp_path, sam_pth)["objects"]
    assert main(["convert", "sam", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "other than weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
