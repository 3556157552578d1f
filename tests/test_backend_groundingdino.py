"""detect.backend: groundingdino — the original package (groundingdino-py 0.4.0) and an original .pth.

A tiny random GroundingDINO is built by the package's own ``build_model`` from a config file
(``devkit/tiny_original.py``) and saved as the released checkpoints are (``{"model": state_dict}``),
then converted with the same weights to a transformers folder (``lookandlearn convert
groundingdino``). Both backends must give the same boxes and scores through the same stage code;
the package's own BERT wrapper must really be broken under this transformers (else the
compatibility layer would be dead code); bad checkpoints and configs stop a build with exit 2
naming the field. RANDOM weights: only agreement is measured.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("groundingdino", reason="groundingdino-py (extra [groundingdino]) is not installed")

from conftest_models import cpu_runtime, detect_config, two_image_batch  # noqa: E402
from stages import record as rec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gdino_original(tmp_path_factory) -> dict[str, Path]:
    from devkit.tiny_original import write_tiny_groundingdino

    return write_tiny_groundingdino(tmp_path_factory.mktemp("gdino-original"))


@pytest.fixture(scope="module")
def gdino_converted(gdino_original, tmp_path_factory) -> Path:
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("gdino-converted") / "hf"
    assert main(["convert", "groundingdino", str(gdino_original["checkpoint"]), "--config",
                 str(gdino_original["config"]), "--text-encoder", str(gdino_original["text_encoder"]),
                 "--out", str(out)]) == 0
    return out


def _original_overrides(paths: dict[str, Path]) -> list[str]:
    return [f"detect.model={paths['checkpoint']}", "detect.backend=groundingdino",
            f"detect.config={paths['config']}", f"detect.text_encoder={paths['text_encoder']}"]


@pytest.fixture(scope="module")
def stages(gdino_original, gdino_converted):
    from stages.ground import GroundStage

    kw = dict(batch_size=2, box_threshold=0.3, text_threshold=0.25)
    original = GroundStage(detect_config(gdino_original["checkpoint"], backend="groundingdino",
                                         config=str(gdino_original["config"]),
                                         text_encoder=str(gdino_original["text_encoder"]), **kw), cpu_runtime())
    converted = GroundStage(detect_config(gdino_converted, **kw), cpu_runtime())
    original.setup()
    converted.setup()
    return original, converted


def test_the_packages_own_bert_wrapper_breaks_under_this_transformers():
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper
    from transformers import BertConfig, BertModel

    from stages.backends.groundingdino import BertWarper

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32)).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises((AttributeError, TypeError)):
        BertModelWarper(bert)(input_ids=ids, attention_mask=mask)
    ours = BertWarper(bert)
    assert set(ours.state_dict()) == {k for k in bert.state_dict()}  # the checkpoint's bert.* keys load
    out = ours(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    assert torch.allclose(out, bert(input_ids=ids, attention_mask=torch.ones(1, 4)).last_hidden_state, atol=1e-5)


def test_original_and_converted_give_the_same_raw_outputs(stages):
    original, converted = stages
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(2)]
    texts = ["a dog . the red car .", "people . a small moped . sky ."]
    a_in = [original._prepared(i, None) for i in images]
    b_in = [converted._prepared(i, None) for i in images]
    assert all(np.array_equal(x, y) for x, y in zip(a_in, b_in))
    logits_a, boxes_a = original._forward(a_in, texts)
    logits_b, boxes_b = converted._forward(b_in, texts)
    assert logits_a.shape == logits_b.shape and boxes_a.shape == boxes_b.shape
    finite = torch.isfinite(logits_b)
    assert torch.equal(torch.isfinite(logits_a), finite)
    assert torch.allclose(logits_a[finite], logits_b[finite], rtol=1e-3, atol=1e-4)
    assert torch.allclose(boxes_a, boxes_b, rtol=1e-3, atol=1e-5)
    assert boxes_b.std() > 0.05  # boxes vary, so agreeing means something


def test_original_and_converted_give_the_same_regions(stages):
    original, converted = stages
    a = [rec.loads(r) for r in original(two_image_batch())["record"]]
    b = [rec.loads(r) for r in converted(two_image_batch())["record"]]
    n = 0
    for ra, rb in zip(a, b):
        assert [(r["entity"]) for r in ra.get("regions", [])] == [(r["entity"]) for r in rb.get("regions", [])]
        for x, y in zip(ra.get("regions", []), rb.get("regions", [])):
            np.testing.assert_allclose(x["box_xyxy"], y["box_xyxy"], rtol=1e-3, atol=0.02)
            assert abs(x["det_score"] - y["det_score"]) <= 1e-3 * max(abs(y["det_score"]), 1e-3) + 1e-5
            n += 1
    assert n > 0


def _build(tmp_path, sample_manifest_args, overrides):
    from pipeline.cli import main

    out = tmp_path / "out"
    code = main(["build", str(REPO / "manifests" / "sample-random.yaml"), "--out", str(out), "--no-progress",
                 *(f"--set={o}" for o in sample_manifest_args + ["runtime.executor=local", "input.limit=10"]
                   + overrides)])
    return code, out


def test_sample_builds_with_both_original_backends(tmp_path, sample_manifest_args, gdino_original):
    from devkit.tiny_original import write_tiny_sam_checkpoint

    sam = write_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth")
    code, out = _build(tmp_path, sample_manifest_args, _original_overrides(gdino_original) + [
        "detect.box_threshold=0.3", "detect.text_threshold=0.25", f"segment.model={sam}",
        "segment.backend=segment-anything"])
    assert code == 0
    resolved = (out / "manifest.resolved.yaml").read_text()
    assert "backend: groundingdino" in resolved and "backend: segment-anything" in resolved
    regions = 0
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tf.extractfile(member).read())
                    assert record["provenance"]["detector"] == f"groundingdino:{gdino_original['checkpoint'].resolve()}"
                    regions += sum(1 for r in record.get("regions", []) if r.get("mask_rle"))
    assert regions > 0


def test_bad_checkpoints_and_configs_stop_the_build_with_exit_2(tmp_path, sample_manifest_args, gdino_original,
                                                                 capsys):
    from devkit.tiny_original import write_tiny_sam_checkpoint

    sam_pth = write_tiny_sam_checkpoint(tmp_path / "sam.pth")
    objects = tmp_path / "objects.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": np.float64(1.0)}, objects)
    state = torch.load(gdino_original["checkpoint"], weights_only=True)["model"]
    state["transformer.level_embed"] = torch.zeros(4, 16)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({"model": state}, wrong_shape)
    code_config = tmp_path / "evil.py"
    code_config.write_text("import os\nos.system('touch pwned')\n")
    cases = {
        "sam checkpoint as detector": ([f"detect.model={sam_pth}"], "detect.model", "not a GroundingDINO checkpoint"),
        "objects": ([f"detect.model={objects}"], "detect.model", "other than weights"),
        "wrong shape": ([f"detect.model={wrong_shape}"], "detect.model", "does not fit"),
        "config is code": ([f"detect.config={code_config}"], "detect.config", "not executed"),
        "no text encoder": ([f"detect.text_encoder={tmp_path / 'no-bert'}"], "detect.text_encoder", "does not exist"),
        "gdino checkpoint as segmenter": ([f"segment.model={gdino_original['checkpoint']}",
                                           "segment.backend=segment-anything"], "segment.model", "not a SAM checkpoint"),
    }
    for label, (extra, field, why) in cases.items():
        code, _ = _build(tmp_path / label.replace(" ", "_"), sample_manifest_args,
                         _original_overrides(gdino_original) + extra)
        err = capsys.readouterr().err
        assert code == 2, (label, err)
        assert field in err and why in err, (label, err)
    assert not (Path.cwd() / "pwned").exists()
