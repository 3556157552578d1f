"""Model families by name (issue 12, item 4): MM-GroundingDINO, OWLv2, SAM-HQ, SAM 2 and SAM 3.

Each family's tiny RANDOM checkpoint (devkit/tiny_families.py) builds a few sample items end to
end through the local executor and the records have the fields of docs/schema.md. The numbers
mean nothing (random weights); the tests check the plumbing, never quality. A checkpoint of
the wrong family, or a broken config.json, stops the build with exit 2 naming the field.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import EXIT_BAD_INPUT, main
from pipeline.manifest import load_manifest
from pipeline.runner import build
from stages.record import check_record

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "sample-random.yaml"
LIMIT = 5


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, Path]:
    from devkit.tiny_families import FAMILY_DIRS, write_tiny_family

    out = tmp_path_factory.mktemp("tiny-families")
    return {family: write_tiny_family(out, family) for family in FAMILY_DIRS}


def _records(out: Path) -> list[dict]:
    records = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            records += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return records


def _build(tmp_path: Path, sample_jsonl: Path, sets: list[str]) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    manifest = load_manifest(SAMPLE, [f"input.path={sample_jsonl}", f"input.limit={LIMIT}", "runtime.executor=local",
                                      "runtime.device=cpu", *sets], out=str(out))
    stats = build(manifest, progress=False)
    return stats, _records(out)


def _check_regions(records: list[dict], detector: Path, segmenter: Path | None) -> int:
    """Every record valid and tied to the models named; every region with a box inside the image,
    a det score, a mask of the image's size and a mask score. Returns the number of regions."""
    from pycocotools import mask as mask_utils

    assert records, "no sample was written"
    regions = 0
    for record in records:
        check_record(record)
        assert record["provenance"]["detector"] == str(detector.resolve())
        if segmenter is not None:
            assert record["provenance"]["segmenter"] == str(segmenter.resolve())
        height, width = record["image"]["height"], record["image"]["width"]
        entity_ids = {e["id"] for e in record["entities"]}
        for region in record["regions"]:
            regions += 1
            assert region["entity"] in entity_ids
            x0, y0, x1, y1 = region["box_xyxy"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, region["box_xyxy"]
            assert 0.0 <= region["det_score"] <= 1.0 and 0.0 <= region["mask_score"] <= 1.0
            assert region["mask_rle"]["size"] == [height, width]
            mask = mask_utils.decode({**region["mask_rle"], "counts": region["mask_rle"]["counts"].encode()})
            assert int(mask.sum()) == region["area"]
    return regions


@pytest.mark.parametrize("family, sets", [
    ("mm-grounding-dino", ["detect.box_threshold=0.6", "detect.text_threshold=0.5"]),
    # OWLv2: text_threshold does not apply; 0.99 would drop every GroundingDINO box, not OWLv2's
    ("owlv2", ["detect.box_threshold=0.5", "detect.text_threshold=0.99"]),
])
def test_detector_family_builds_the_sample(family, sets, families, tiny_models, sample_jsonl, tmp_path):
    detector, segmenter = families[family], Path(tiny_models["sam-tiny-random"])
    stats, records = _build(tmp_path, sample_jsonl, [f"detect.model={detector}", f"segment.model={segmenter}", *sets])
    assert stats["samples_out"] == len(records) > 0
    assert _check_regions(records, detector, segmenter) > 0, f"{family} found no box at all"


@pytest.mark.parametrize("family", ["sam_hq", "sam2"])
def test_segmenter_family_builds_the_sample(family, families, tiny_models, sample_jsonl, tmp_path):
    detector, segmenter = Path(tiny_models["grounding-dino-tiny-random"]), families[family]
    stats, records = _build(tmp_path, sample_jsonl, [f"detect.model={detector}", f"segment.model={segmenter}"])
    assert stats["samples_out"] == len(records) > 0
    assert _check_regions(records, detector, segmenter) > 0
    masks = [r for rec in records for r in rec["regions"]]
    assert any(r["area"] > 0 for r in masks), "every mask is empty"


def test_sam3_grounds_and_segments_in_one_model(families, sample_jsonl, tmp_path):
    """SAM 3 as detect.model: boxes and masks from one model; segment.model is neither checked nor
    loaded (it names a folder that does not exist)."""
    detector = families["sam3"]
    stats, records = _build(tmp_path, sample_jsonl, [f"detect.model={detector}", "segment.model=/nonexistent/sam",
                                                     "detect.box_threshold=0.3"])
    assert stats["samples_out"] == len(records) > 0
    assert _check_regions(records, detector, None) > 0
    assert all("segmenter" not in r["provenance"] for r in records)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- segmenter: none (the SAM 3 detector makes the masks" in card and "- segmenter: `/nonexistent" not in card


def test_sam3_grounder_stage_keeps_phrases_apart(families):
    """Each phrase is its own SAM 3 prompt: the regions of an entity are that phrase's, the same
    phrase twice gets the same boxes, and box_threshold filters the scores."""
    from conftest_models import cpu_runtime, detect_config, make_batch, make_record, random_pixels
    from stages.ground_segment import GroundAndSegment
    from stages.segment import SegmentConfig

    def run(threshold):
        stage = GroundAndSegment(detect_config(families["sam3"], box_threshold=threshold, max_boxes_per_phrase=3),
                                 SegmentConfig(model="/nonexistent"), cpu_runtime())
        stage.setup()
        record = make_record("a", "a dog and a red car and a dog", ["a dog", "a red car", "a dog"], 160, 120)
        out = stage(make_batch([record], [random_pixels(120, 160, 5)]))
        return json.loads(out["record"][0])

    record = run(0.0)
    by_entity = {}
    for region in record["regions"]:
        by_entity.setdefault(region["entity"], []).append(region)
    assert set(by_entity) == {0, 1, 2} and all(len(v) == 3 for v in by_entity.values())
    assert [r["box_xyxy"] for r in by_entity[0]] == [r["box_xyxy"] for r in by_entity[2]]
    assert [r["det_score"] for r in by_entity[0]] != [r["det_score"] for r in by_entity[1]]
    scores = sorted(r["det_score"] for r in record["regions"])
    cut = float(np.median(scores))
    above = run(cut)["regions"]
    assert above and all(r["det_score"] >= cut for r in above)
    assert len(above) < len(record["regions"])


def _cli_build(tmp_path: Path, sample_jsonl: Path, sets: list[str]) -> int:
    args = ["build", str(SAMPLE), "--out", str(tmp_path / "out"), "--set", f"input.path={sample_jsonl}",
            "--set", "input.limit=2", "--set", "runtime.executor=local"]
    for item in sets:
        args += ["--set", item]
    return main(args)


@pytest.mark.parametrize("field, wrong, expect", [
    ("detect.model", "sam-tiny-random", "the SAM family (model_type 'sam')"),
    ("detect.model", "sam2", "the SAM 2 family"),
    ("segment.model", "grounding-dino-tiny-random", "the GroundingDINO family"),
    ("segment.model", "owlv2", "the OWLv2 family"),
    ("segment.model", "sam3", "the SAM 3 family"),
])
def test_wrong_architecture_is_exit_2_naming_the_field(field, wrong, expect, families, tiny_models, sample_jsonl,
                                                       tmp_path, capsys):
    folder = families.get(wrong) or tiny_models[wrong]
    other = {"detect.model": tiny_models["grounding-dino-tiny-random"], "segment.model": tiny_models["sam-tiny-random"]}
    other[field] = folder
    code = _cli_build(tmp_path, sample_jsonl, [f"{k}={v}" for k, v in other.items()])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert f"error: {field}: " in err and expect in err, err
    assert not (tmp_path / "out" / "shards").exists() or not any((tmp_path / "out" / "shards").iterdir())


@pytest.mark.parametrize("content, why", [
    ("{not json", "not readable JSON"),
    ('{"architectures": ["Foo"]}', "has no model_type"),
    ('{"model_type": "bert"}', "model_type 'bert'"),
])
def test_bad_checkpoint_file_is_exit_2_naming_the_field(content, why, tiny_models, sample_jsonl, tmp_path, capsys):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(content)
    code = _cli_build(tmp_path, sample_jsonl, [f"detect.model={bad}", f"segment.model={tiny_models['sam-tiny-random']}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "error: detect.model: " in err and why in err, err


def test_hub_layout_video_checkpoints_load(families, tmp_path):
    """The hub's SAM 2.1 and SAM 3 repos hold the video models' configs (model_type sam2_video /
    sam3_video, facebook/sam3's weights under detector_model.): the same families, loaded as the
    image models, with every weight found."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import Sam2Config, Sam2VideoConfig, Sam2VideoModel, Sam3Config, Sam3VideoConfig

    from conftest_models import cpu_runtime, detect_config, make_batch, make_record, random_pixels, segment_config
    from stages.families import check_segmenter_family, is_grounder, make_segment_stage
    from stages.ground_segment import GroundAndSegment
    from stages.segment import SegmentConfig

    sam2 = Sam2Config.from_pretrained(families["sam2"])
    video2 = tmp_path / "sam2-video"
    Sam2VideoModel(Sam2VideoConfig(
        vision_config=sam2.vision_config.to_dict(), prompt_encoder_config=sam2.prompt_encoder_config.to_dict(),
        mask_decoder_config=sam2.mask_decoder_config.to_dict(), image_size=128, memory_attention_hidden_size=32,
        memory_encoder_hidden_size=32, memory_encoder_output_channels=16, mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32, memory_attention_num_layers=1, memory_fuser_intermediate_dim=64,
        memory_attention_feed_forward_hidden_size=64)).save_pretrained(video2)
    shutil.copy(families["sam2"] / "processor_config.json", video2)
    assert check_segmenter_family(segment_config(video2)) == "sam2_video"
    stage = make_segment_stage(segment_config(video2), cpu_runtime())
    stage.setup()
    [(masks, iou)] = stage.segment_images([random_pixels(100, 150, 2)], [[[10, 10, 90, 80]]])
    assert masks.shape == (1, 100, 150) and iou.shape == (1,)

    video3 = tmp_path / "sam3-video"
    shutil.copytree(families["sam3"], video3)
    Sam3VideoConfig(detector_config=Sam3Config.from_pretrained(families["sam3"]).to_dict()).save_pretrained(video3)
    weights = load_file(families["sam3"] / "model.safetensors")
    save_file({f"detector_model.{k}": v for k, v in weights.items()}, video3 / "model.safetensors")
    assert is_grounder(detect_config(video3))
    stage = GroundAndSegment(detect_config(video3, box_threshold=0.0), SegmentConfig(model="/nonexistent"),
                             cpu_runtime())
    stage.setup()
    same = GroundAndSegment(detect_config(families["sam3"], box_threshold=0.0), SegmentConfig(model="/nonexistent"),
                            cpu_runtime())
    same.setup()
    record = make_record("a", "a dog on a table", ["a dog", "a table"], 160, 120)
    got = [json.loads(s(make_batch([record], [random_pixels(120, 160, 3)]))["record"][0])["regions"]
           for s in (stage, same)]
    assert got[0] and [r["box_xyxy"] for r in got[0]] == [r["box_xyxy"] for r in got[1]]  # the same weights loaded


def test_tiny_models_cli_offers_every_family(tmp_path, capsys):
    """`lookandlearn tiny-models DIR --family F` knows exactly the families devkit can write."""
    from devkit.tiny_families import FAMILY_DIRS
    from pipeline.cli import _parser

    sub = next(a for a in _parser()._actions if getattr(a, "choices", None) and "tiny-models" in a.choices)
    family = next(a for a in sub.choices["tiny-models"]._actions if a.dest == "family")
    assert sorted(family.choices) == sorted(FAMILY_DIRS)
    with pytest.raises(SystemExit) as exc:
        main(["tiny-models", str(tmp_path), "--family", "not-a-family"])
    assert exc.value.code == EXIT_BAD_INPUT and "--family" in capsys.readouterr().err


def test_hub_ids_dispatch_on_the_cached_config(families, tmp_path, monkeypatch):
    """A hub id (offline, from the Hugging Face cache) is dispatched on its config.json like a
    folder: the name says nothing ('someone/detector' holds OWLv2) and a wrong family is exit 2."""
    import shutil

    from conftest_models import cpu_runtime, detect_config, segment_config
    from stages.families import ModelFamilyError, check_detector_family, check_segmenter_family, make_ground_stage
    from stages.owl import OwlGroundStage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    commit = "b" * 40
    repo = tmp_path / "hf-home" / "hub" / "models--someone--detector"
    shutil.copytree(families["owlv2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    assert check_detector_family(detect_config("someone/detector")) == "owlv2"
    stage = make_ground_stage(detect_config("someone/detector"), cpu_runtime())
    assert isinstance(stage, OwlGroundStage)
    stage.setup()
    assert stage.ref == f"someone/detector@{commit}"
    with pytest.raises(ModelFamilyError, match=r"^segment\.model: 'someone/detector' holds a model of the OWLv2 family"):
        check_segmenter_family(segment_config("someone/detector"))
