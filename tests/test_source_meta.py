"""source.meta: every input format's extra fields reach the sample (issue 13, item 1), bounded and
JSON-safe; and input.coco_per_image (one sample per image with all its captions)."""
from __future__ import annotations

import datetime as dt
import io
import json
import math
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.manifest import Manifest, ManifestError, load_manifest
from pipeline.source_text import MAX_META_BYTES, MAX_META_STRING, META_DROPPED, source_meta
from pipeline.sources import SourceError, list_items
from stages.read import ImageConfig, ReadStage, read_batch


def make_manifest(fmt: str, path, **input_kw) -> Manifest:
    return Manifest.model_validate({"name": "sample", "input": {"format": fmt, "path": str(path), **input_kw}})


def _png(size=(64, 48), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _records(items) -> dict[str, dict]:
    stage = ReadStage(ImageConfig())
    stage.setup()
    out = stage(read_batch(items))
    assert set(out["status"]) == {"ok"}, list(zip(out["key"], out["reason"]))
    return {k: json.loads(r) for k, r in zip(out["key"], out["record"])}


# --- source_meta ---------------------------------------------------------------------------

def test_source_meta_is_json_safe_and_bounded():
    meta = source_meta({
        "id": "x", "url": "https://e.com/a\x00.jpg", "similarity": 0.3, "nan": math.nan, "when": dt.date(2024, 5, 1),
        "blob": b"\x00\x01", "nested": {"a": [1, {"b": "c\ud800"}]}, "long": "y" * (MAX_META_STRING + 50),
        "deep": [[[[[[[[[[1]]]]]]]]]],
    }, exclude=("id",))
    assert "id" not in meta
    assert meta["url"] == "https://e.com/a.jpg"                       # NUL removed
    assert meta["similarity"] == 0.3 and meta["nan"] is None and meta["when"] == "2024-05-01"
    assert meta["nested"] == {"a": [1, {"b": "c\ufffd"}]}              # lone surrogate replaced
    assert len(meta["long"]) == MAX_META_STRING and meta["long"].endswith("\u2026")
    assert meta[META_DROPPED] == ["blob", "deep"]                       # no JSON form / too deep
    json.dumps(meta, allow_nan=False)

    big = source_meta({f"k{i}": "v" * 1000 for i in range(40)})
    assert len(json.dumps(big, ensure_ascii=False, separators=(",", ":")).encode()) <= MAX_META_BYTES + 1024
    kept = [k for k in big if k != META_DROPPED]
    assert 10 <= len(kept) < 40 and big[META_DROPPED] == [f"k{i}" for i in range(len(kept), 40)]


# --- every format's extra fields ----------------------------------------------------------

def test_jsonl_and_llava_extra_keys_become_meta(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "in.jsonl").write_text(json.dumps(
        {"id": "a", "image": "a.png", "caption": "a red square", "url": "https://e.com/a.png",
         "license": "cc-by-4.0", "tags": ["x", "y"]}) + "\n")
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": "a", "image": "a.png", "model": "gpt-4v", "source_split": "train",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A red square."}]}]))
    jsonl = list_items(make_manifest("jsonl", tmp_path / "in.jsonl"))
    assert jsonl[0]["source"] == {"dataset": "sample", "id": "a", "meta": {
        "url": "https://e.com/a.png", "license": "cc-by-4.0", "tags": ["x", "y"]}}
    llava = list_items(make_manifest("llava", tmp_path / "llava.json"))
    assert llava[0]["source"]["meta"] == {"model": "gpt-4v", "source_split": "train"}
    record = _records(jsonl)["sample-a"]                               # ... and into the record
    assert record["source"]["meta"]["url"] == "https://e.com/a.png"


def _laion_tar(folder: Path) -> Path:
    tar = folder / "00000.tar"
    _tar(tar, [
        ("000000000.jpg", _jpg()), ("000000000.txt", b"a red square"),
        ("000000000.json", json.dumps({"key": "000000000", "caption": "a red square", "url": "https://e.com/0.jpg",
                                       "similarity": 0.334, "LICENSE": "?", "NSFW": "UNLIKELY", "width": 64}).encode()),
        ("000000001.jpg", _jpg("blue")), ("000000001.txt", b"a blue square"),
    ])
    return tar


def _jpg(colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_webdataset_json_fields_become_meta(tmp_path):
    """A LAION-style shard: the .json beside each image carries url, similarity, LICENSE, NSFW."""
    items = list_items(make_manifest("webdataset", _laion_tar(tmp_path)))
    meta = items[0]["source"]["meta"]
    assert meta == {"key": "000000000", "url": "https://e.com/0.jpg", "similarity": 0.334, "LICENSE": "?",
                    "NSFW": "UNLIKELY", "width": 64}
    assert items[0]["text"] == {"caption": "a red square"} and items[1]["source"]["meta"] == {}


def test_img2dataset_parquet_columns_become_meta(tmp_path):
    """img2dataset writes 00000.parquet beside 00000.tar (one row per sample by key, with the
    --save_additional_columns); its columns reach source.meta, the .json's fields win."""
    tar = _laion_tar(tmp_path)
    pq.write_table(pa.table({
        "key": ["000000000", "000000001", "000000002"], "url": ["https://p.com/0", "https://p.com/1", "https://p.com/2"],
        "caption": ["a red square", "a blue square", "never downloaded"],
        "status": ["success", "success", "failed_to_download"], "aesthetic": [5.5, 6.25, None],
        "fetched": [dt.datetime(2024, 1, 2, 3, 4, 5)] * 3,
    }), tar.with_suffix(".parquet"))
    items = list_items(make_manifest("webdataset", tmp_path))
    assert len(items) == 2                                              # rows without a tar sample: nothing
    first, second = (it["source"]["meta"] for it in items)
    assert first["url"] == "https://e.com/0.jpg" and first["similarity"] == 0.334   # .json over parquet
    assert first["aesthetic"] == 5.5 and first["status"] == "success"
    assert second == {"url": "https://p.com/1", "status": "success", "aesthetic": 6.25,
                      "fetched": "2024-01-02T03:04:05"}                # no "key" / "caption" columns
    records = _records(items)
    assert records["sample-000000001"]["source"]["meta"]["aesthetic"] == 6.25

    tar.with_suffix(".parquet").write_bytes(b"PAR1 broken")
    with pytest.raises(SourceError, match=r"input\.path: img2dataset parquet .*00000\.parquet"):
        list_items(make_manifest("webdataset", tmp_path))


# --- COCO: image fields, and one sample per image --------------------------------------------

def _coco(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for name, colour in (("1.png", "red"), ("2.png", "blue"), ("3.png", "green")):
        (tmp_path / "images" / name).write_bytes(_png(colour=colour))
    coco = {
        "licenses": [{"id": 4, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"}],
        "images": [{"id": 1, "file_name": "1.png", "license": 4, "coco_url": "http://images.cocodataset.org/1.png",
                    "height": 48, "width": 64},
                   {"id": 2, "file_name": "2.png"}, {"id": 3, "file_name": "3.png"}],
        "annotations": [{"id": 11, "image_id": 1, "caption": "A red square."},
                        {"id": 21, "image_id": 2, "caption": "A blue square.", "lang": "en"},
                        {"id": 12, "image_id": 1, "caption": "A square that is red."},
                        {"id": 13, "image_id": 1, "caption": "   "},
                        {"id": 31, "image_id": 3, "caption": ""},
                        {"id": 41, "image_id": 9, "caption": "No such image."}],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_image_fields_become_meta(tmp_path):
    items = list_items(make_manifest("coco-captions", _coco(tmp_path), image_root=str(tmp_path / "images")))
    assert len(items) == 6                                              # one per caption (the default)
    assert items[0]["source"] == {"dataset": "sample", "id": "1", "annotation_id": "11", "meta": {
        "license": 4, "coco_url": "http://images.cocodataset.org/1.png", "height": 48, "width": 64,
        "license_name": "Attribution License", "license_url": "http://creativecommons.org/licenses/by/2.0/"}}
    assert items[1]["source"]["meta"] == {"lang": "en"}                  # the annotation's other keys too


def test_coco_per_image_groups_all_captions(tmp_path):
    items = list_items(make_manifest("coco-captions", _coco(tmp_path), image_root=str(tmp_path / "images"),
                                     coco_per_image=True))
    by_id = {it["source"]["id"]: it for it in items}
    assert [it["source"]["id"] for it in items] == ["1", "2", "3", "9"]  # order of first caption
    one = by_id["1"]
    assert one["key"] == "sample-1" and one["precheck"] is None
    assert one["text"] == {"captions": ["A red square.", "A square that is red."]}   # blank one left out
    assert one["source"]["annotation_ids"] == ["11", "12"]
    assert one["source"]["meta"]["license_name"] == "Attribution License"
    assert by_id["2"]["source"]["meta"] == {}                          # per image: the image's fields only
    assert by_id["3"]["precheck"].startswith("empty_caption:")          # no usable caption at all
    assert by_id["9"]["precheck"].startswith("missing_image:")
    records = _records(items[:2])
    assert records["sample-1"]["text"]["captions"] == ["A red square.", "A square that is red."]


def test_coco_per_image_needs_coco_format(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: x\ninput: {format: jsonl, path: in.jsonl, coco_per_image: true}\n")
    with pytest.raises(ManifestError, match="coco_per_image is only for input.format coco-captions"):
        load_manifest(manifest)
