"""The Python API (``lookandlearn``): build from a dict, label in memory (the very record a shard
holds for the same input), clear errors naming the field, and the README example, executed."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import lookandlearn
from lookandlearn import BuildResult, Labeler, ManifestError, Rejected, build, decode_mask
from stages.record import make_key
from stages.record.shards import iter_records

REPO = Path(__file__).resolve().parents[1]
# reasons only the input listing can give (a repeated id, a line that is not JSON, a path outside
# input.image_root): an image handed to the labeler directly has none of them
_LISTING_ONLY = ("duplicate_id", "bad_json", "bad_item", "missing_image", "outside_image_root")


def _models(tiny_models) -> tuple[Path, Path]:
    return (next(p for k, p in tiny_models.items() if "dino" in k),
            next(p for k, p in tiny_models.items() if "sam" in k))


@pytest.fixture(scope="module")
def manifest(tiny_models, sample_jsonl) -> dict:
    """manifests/sample-random.yaml as a dict, pointed at the session's tiny models and sample data."""
    data = yaml.safe_load((REPO / "manifests" / "sample-random.yaml").read_text())
    det, sam = _models(tiny_models)
    data["input"]["path"] = str(sample_jsonl)
    data["detect"]["model"], data["segment"]["model"] = str(det), str(sam)
    data["runtime"]["executor"] = "local"
    return data


@pytest.fixture(scope="module")
def built(manifest, tmp_path_factory) -> BuildResult:
    """A small build from the dict (the session's ``sample_out`` is the whole sample, same settings)."""
    return build(manifest, out=tmp_path_factory.mktemp("api") / "out", overrides={"input.limit": 6})


@pytest.fixture(scope="module")
def labeler(manifest) -> Labeler:
    return Labeler(manifest)


def _shard_records(out: Path) -> dict[str, dict]:
    return {rec["key"]: rec for rec, _, _ in iter_records(sorted((out / "shards").glob("*.tar")))}


def _rejected(out: Path) -> dict[str, str]:
    return {row["key"]: row["reason"] for path in sorted((out / "rejected").glob("*.parquet"))
            for row in pq.read_table(path).to_pylist()}


def _inputs(sample_jsonl: Path) -> list[dict]:
    """The sample's input lines that name an image and a caption, first occurrence of each id."""
    rows, seen = [], set()
    for line in sample_jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("image"), str) and row.get("id") not in seen:
            seen.add(row.get("id"))
            rows.append(row)
    return rows


def test_build_from_a_dict_writes_the_shards(built, manifest, sample_out):
    assert isinstance(built, BuildResult) and built.path.is_dir()
    assert built.shards and all(p.stat().st_size > 0 for p in built.shards)
    records = _shard_records(built.path)
    assert built.stats["samples_out"] == len(records) == 6
    # the same settings as the YAML manifest give the same samples
    whole = _shard_records(sample_out)
    assert all(records[key] == whole[key] for key in records)
    assert json.loads((built.path / "stats.json").read_text())["samples_out"] == len(records)
    assert all(key.startswith(f"{manifest['input']['dataset']}-") for key in records)


def test_label_gives_the_record_the_shard_holds(sample_out, labeler, manifest, sample_jsonl):
    """Sample images + captions labelled in memory (one batch call) give the shard's record for
    that input: the same entities, boxes, scores, RLE masks and verdicts; a rejected input is
    rejected with the reason the build wrote to rejected/. (``sample_out``: manifests/sample-random.yaml
    built with the settings of this dict.)"""
    records, rejected = _shard_records(sample_out), _rejected(sample_out)
    dataset = manifest["input"]["dataset"]
    good = [r for r in _inputs(sample_jsonl) if make_key(dataset, r["id"]) in records]
    rows = good[:8] + [r for r in _inputs(sample_jsonl) if make_key(dataset, r["id"]) in rejected]
    samples = [{"image": sample_jsonl.parent / r["image"], "caption": r.get("caption"), "id": r["id"],
                "meta": {k: v for k, v in r.items() if k not in ("id", "image", "caption")}} for r in rows]
    results = labeler.label_many(samples, errors="return")
    assert len(results) == len(rows)
    compared = with_masks = rejections = 0
    for row, got in zip(rows, results):
        key = make_key(dataset, row["id"])
        if key in records:
            assert got == records[key], key
            compared += 1
            with_masks += bool(got["regions"])
        elif key in rejected and rejected[key].split(":")[0] not in _LISTING_ONLY:
            assert isinstance(got, Rejected) and got.reason == rejected[key] and got.key == key
            rejections += 1
    assert compared == min(8, len(good)) and with_masks >= 3 and rejections >= 3


def test_label_takes_bytes_and_pil_images(sample_out, labeler, manifest, sample_jsonl):
    from PIL import Image

    records = _shard_records(sample_out)
    row = next(r for r in _inputs(sample_jsonl)
               if records.get(make_key(manifest["input"]["dataset"], r["id"]), {}).get("regions"))
    want = records[make_key(manifest["input"]["dataset"], row["id"])]
    path = sample_jsonl.parent / row["image"]
    # the file's bytes are the same input as the file: the same record
    assert labeler.label(path.read_bytes(), row["caption"], id=row["id"]) == want
    # a PIL image is encoded losslessly first; the record describes the same picture
    got = labeler.label(Image.open(path), row["caption"], id=row["id"])
    assert got["key"] == want["key"]
    assert (got["image"]["width"], got["image"]["height"]) == (want["image"]["width"], want["image"]["height"])
    assert [e["phrase"] for e in got["entities"]] == [e["phrase"] for e in want["entities"]]
    mask = decode_mask(want["regions"][0])
    assert mask.shape == (want["image"]["height"], want["image"]["width"]) and mask.dtype == bool
    assert int(mask.sum()) == want["regions"][0]["area"]


def test_rejected_samples_raise_with_the_reason(labeler, sample_jsonl):
    image = next(sample_jsonl.parent.glob("images/scene-01.*"))
    with pytest.raises(Rejected, match="empty_caption") as err:
        labeler.label(image, "   ")
    assert err.value.reason.startswith("empty_caption:")
    with pytest.raises(Rejected, match=r"^lookandlearn-sample-x: (truncated|unreadable)"):
        labeler.label(image.read_bytes()[:200], "a red circle", id="x")
    with pytest.raises(Rejected, match="missing_file"):
        labeler.label(sample_jsonl.parent / "images" / "nope.jpg", "a red circle")
    assert labeler.label_many([(image, "")], errors="return")[0].reason.startswith("empty_caption")


def test_module_label_loads_the_models_once(manifest, sample_jsonl, monkeypatch):
    from lookandlearn import api

    image = next(sample_jsonl.parent.glob("images/scene-01.*"))
    first = lookandlearn.label(image, "a red circle above a small blue square", manifest=manifest, id="one")
    held = api._LAST[1]
    monkeypatch.setattr(api, "Labeler", lambda *a, **k: pytest.fail("models loaded again"))
    again = lookandlearn.label(image, "a red circle above a small blue square", manifest=manifest, id="one")
    assert api._LAST[1] is held and again == first and first["key"] == "lookandlearn-sample-one"


@pytest.mark.parametrize("change, field", [
    ({"detect": {"box_thresold": 0.3}}, "detect.box_thresold: unknown field"),
    ({"detect": {"box_threshold": "high"}}, "detect.box_threshold"),
    ({"runtime": {"executor": "spark"}}, "runtime.executor"),
])
def test_a_bad_dict_field_is_a_manifest_error_naming_it(manifest, change, field, tmp_path):
    bad = {**manifest, **{k: {**manifest.get(k, {}), **v} for k, v in change.items()}}
    with pytest.raises(ManifestError, match=re.escape(field)):
        build(bad, out=tmp_path / "out")
    with pytest.raises(ManifestError, match=re.escape(field)):
        Labeler(bad)
    assert not (tmp_path / "out").exists()


def test_overrides_and_missing_fields_are_checked_too(manifest, tmp_path):
    with pytest.raises(ManifestError, match=re.escape("runtime.cpu_batch_size")):
        build(manifest, out=tmp_path, overrides={"runtime.cpu_batch_size": 0})
    with pytest.raises(ManifestError, match=re.escape("name: required field is missing")):
        build({k: v for k, v in manifest.items() if k != "name"}, out=tmp_path)
    with pytest.raises(ManifestError, match="manifest not found"):
        build(tmp_path / "nope.yaml")
    # a manifest only for labelling needs no input; a YAML path and --set-style overrides work
    assert lookandlearn.load({k: v for k, v in manifest.items() if k != "input"}, input_optional=True).name == "sample"
    m = lookandlearn.load(REPO / "manifests" / "sample-random.yaml", overrides=["detect.box_threshold=0.5"], out=tmp_path)
    assert m.detect.box_threshold == 0.5 and m.output.path == str(tmp_path)
    assert lookandlearn.__version__ == __import__("pipeline").__version__


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- api-example -->\s*```python\n(.*?)```\s*<!-- /api-example -->", text, re.S)
    assert found, "README.md has no <!-- api-example --> python block"
    return found.group(1)


def test_the_readme_example_runs(tiny_models, sample_jsonl, tmp_path, monkeypatch, capsys):
    """The README's Python API example, run as written from a folder laid out as after
    `make sample-assets` (.cache/tiny-models, .cache/sample-data), so the README cannot drift."""
    det, _ = _models(tiny_models)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "tiny-models").symlink_to(det.parent, target_is_directory=True)
    (tmp_path / ".cache" / "sample-data").symlink_to(sample_jsonl.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md:api-example", "exec"), namespace)
    printed = capsys.readouterr().out
    result, record = namespace["result"], namespace["record"]
    assert result.path == Path("out/demo") and result.shards
    # the labelled record is the one the example's build wrote for the same input
    assert record == _shard_records(result.path)[record["key"]]
    assert "unknown field" in printed and "detect.box_treshold" in printed


def test_the_data_path_needs_no_train_extra(tiny_models, sample_jsonl):
    """With peft, accelerate and scikit-image (and scipy) not importable, as in a data-only install,
    labelling runs every stage and ``lookandlearn train`` says which extra to install."""
    det, sam = _models(tiny_models)
    code = f"""
import sys
for name in ("peft", "accelerate", "skimage", "scipy"):
    sys.modules[name] = None          # import fails, find_spec says not installed
import lookandlearn
m = {{"name": "d", "detect": {{"model": {str(det)!r}, "box_threshold": 0.82, "text_threshold": 0.8}},
     "segment": {{"model": {str(sam)!r}}}, "adjudicate": {{"min_det_score": 0.84}}}}
record = lookandlearn.label({str(next(sample_jsonl.parent.glob("images/scene-01.*")))!r}, "a red circle", manifest=m)
assert record["entities"] and record["provenance"]["detector"], record
from pipeline.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""
    train_yaml = Path(sample_jsonl.parent.parent / "train-no-extra.yaml")
    train_yaml.write_text(yaml.safe_dump({"name": "t", "model": {"path": str(train_yaml.parent / "no-model")},
                                          "data": {"shards": str(train_yaml.parent)},
                                          "train": {"output_dir": str(train_yaml.parent / "t-out")}}))
    proc = subprocess.run([sys.executable, "-c", code, str(train_yaml)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "lookandlearn train needs accelerate" in proc.stderr
    assert "pip install 'look-and-learn[train]'" in proc.stderr
