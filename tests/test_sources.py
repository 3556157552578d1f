"""Readers (list_items), the read stage (ReadStage) and the offline sample inputs."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.manifest import Manifest, ManifestError
from devkit.sample_data import (HELDOUT_SCENES, SHOWCASE_ROWS, heldout_ids, sample_scenes, write_sample_data,
                                write_sample_variants)
from pipeline.sources import REJECT_REASONS, SourceError, list_items
from stages.read import ImageConfig, ReadStage, read_batch
from stages.record import BATCH_COLUMNS

REPO = Path(__file__).resolve().parents[1]

# Expected outcome of every row of the sample's captions.jsonl under the default policy.
EXPECTED_REJECTED = {
    "empty-caption": "empty_caption:",
    "scene-01-dup1": "duplicate_id:",
    "zero-byte": "empty_file:",
    "truncated": "truncated:",
    "animated": "animated:",
    "missing": "missing_file:",
    "strip": "bad_aspect:",
}
CONVERTED = {"gray16": "I;16", "cmyk": "CMYK", "rgba": "RGBA"}


def make_manifest(fmt: str, path, per_shard: int = 1000, **input_kw) -> Manifest:
    image = input_kw.pop("image", {})
    return Manifest.model_validate({
        "name": "sample", "input": {"format": fmt, "path": str(path), **input_kw},
        "image": image, "output": {"samples_per_shard": per_shard}})


def run_read(items, image: ImageConfig | None = None) -> dict:
    # store_format=keep: these tests check which source bytes are kept as they are
    stage = ReadStage(image or ImageConfig(store_format="keep"))
    stage.setup()
    return stage(read_batch(items))


def by_key(out: dict) -> dict[str, dict]:
    return {out["key"][i]: {c: out[c][i] for c in out} for i in range(len(out["key"]))}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    write_sample_data(root)
    write_sample_variants(root)
    return root


@pytest.fixture(scope="module")
def sample_out(sample) -> dict:
    items = list_items(make_manifest("jsonl", sample / "captions.jsonl", per_shard=8))
    return by_key(run_read(items))


# --- list_items --------------------------------------------------------------------------

def test_jsonl_items_keys_order_and_shards(sample):
    m = make_manifest("jsonl", sample / "captions.jsonl", per_shard=8)
    items = list_items(m)
    assert len(items) == SHOWCASE_ROWS + HELDOUT_SCENES
    assert items == list_items(m)                                     # deterministic
    assert [it["seq"] for it in items] == list(range(len(items)))
    assert [it["shard"] for it in items] == [i // 8 for i in range(len(items))]
    keys = [it["key"] for it in items]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k for k in keys)
    first = items[0]
    assert first["key"] == "sample-scene-01"
    assert first["source"] == {"dataset": "sample", "id": "scene-01", "meta": {}}
    assert first["image_ref"] == {"path": str(sample / "images" / "scene-01.jpg"), "root": os.path.realpath(sample)}
    assert first["text"] == {"caption": sample_scenes()[0][1].caption}          # the scene generator's caption
    assert first["precheck"] is None
    json.dumps(items)                                                 # JSON-ready


def test_limit_and_dataset_name(sample):
    items = list_items(make_manifest("jsonl", sample / "captions.jsonl", limit=5, dataset="my.set/v1"))
    assert len(items) == 5
    assert items[0]["key"] == "my-set-v1-scene-01"
    assert items[0]["source"]["dataset"] == "my.set/v1"


@pytest.mark.parametrize("fmt,rel,root", [
    ("llava", "llava.json", None),
    ("coco-captions", "coco_captions.json", "images"),
    ("webdataset", "wds", None),
    ("webdataset", "wds/sample-000000.tar", None),
    ("webdataset", "wds/sample-{000000..000001}.tar", None),
    ("webdataset", "wds/*.tar", None),
])
def test_other_formats_read_ok(sample, fmt, rel, root):
    kw = {"image_root": str(sample / root)} if root else {}
    m = make_manifest(fmt, sample / rel, per_shard=4, **kw)
    items = list_items(m)
    assert items == list_items(m)
    assert len(items) >= 8
    assert [it["shard"] for it in items] == [i // 4 for i in range(len(items))]
    assert all(it["precheck"] is None for it in items)
    keys = [it["key"] for it in items]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)
    out = run_read(items)
    assert out["status"] == ["ok"] * len(items), [r for r in out["reason"] if r]
    if fmt == "webdataset":
        assert any("conversations" in it["text"] for it in items)
    limited = list_items(make_manifest(fmt, sample / rel, limit=3, **kw))
    assert limited == list_items(make_manifest(fmt, sample / rel, **kw))[:3]


def test_coco_one_sample_per_caption(sample):
    items = list_items(make_manifest("coco-captions", sample / "coco_captions.json",
                                     image_root=str(sample / "images")))
    coco = json.loads((sample / "coco_captions.json").read_text())
    assert len(items) == len(coco["annotations"])
    ann = coco["annotations"][0]
    assert items[0]["key"] == f"sample-{ann['image_id']}-{ann['id']}"
    assert items[0]["source"] == {"dataset": "sample", "id": str(ann["image_id"]), "annotation_id": str(ann["id"]),
                                  "meta": {}}
    same_image = [it for it in items if it["source"]["id"] == "1"]
    assert len(same_image) == 2 and same_image[0]["image_ref"] == same_image[1]["image_ref"]


def test_duplicates_and_sanitize_collisions(tmp_path):
    lines = [{"id": "a", "image": "x.jpg", "caption": "a cat"},
             {"id": "a", "image": "y.jpg", "caption": "a dog"},
             {"id": "a", "image": "z.jpg", "caption": "a cow"},
             {"id": "b.c", "image": "x.jpg", "caption": "a cat"},
             {"id": "b/c", "image": "x.jpg", "caption": "a cat"},
             {"id": 7, "image": "/abs/x.jpg", "caption": "a cat"}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = list_items(make_manifest("jsonl", path))
    keys = [it["key"] for it in items]
    assert keys[0] == "sample-a" and len(set(keys)) == len(keys)
    assert [it["precheck"] for it in items[:3]] == [None, "duplicate_id: a", "duplicate_id: a"]
    assert items[3]["precheck"] is None and items[4]["precheck"] is None   # different ids, similar keys
    assert keys[3] == "sample-b-c" and keys[4] != keys[3]
    assert items[5]["source"]["id"] == "7" and items[5]["image_ref"] is None    # outside the image root
    assert items[5]["precheck"] == "outside_image_root: /abs/x.jpg"
    assert items[0]["image_ref"] == {"path": str(tmp_path / "x.jpg"), "root": os.path.realpath(tmp_path)}
    allowed = list_items(make_manifest("jsonl", path, allow_outside_image_root=True))
    assert allowed[5]["image_ref"] == {"path": "/abs/x.jpg"} and allowed[5]["precheck"] is None


def test_jsonl_bad_lines_become_prechecks(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        '{"id": "ok", "image": "a.jpg", "caption": "a cat"}',
        '{"id": "broken", "image": ',
        '[1, 2]',
        '',
        '{"id": "blank", "image": "a.jpg", "caption": " \\n "}',
        '{"id": "num", "image": "a.jpg", "caption": 42}',
        '{"id": "noimg", "caption": "a cat"}',
        '{"id": "nocap", "image": "a.jpg"}',
    ]) + "\n")
    items = list_items(make_manifest("jsonl", path, image_root=str(tmp_path)))
    pre = [it["precheck"] for it in items]
    assert pre[0] is None
    assert pre[1].startswith("bad_json: line 2")
    assert pre[2].startswith("bad_item: line 3")
    assert pre[3].startswith("empty_caption:")
    assert pre[4].startswith("caption_not_text:")
    assert pre[5].startswith("missing_image:")
    assert pre[6].startswith("missing_caption:")
    assert len({it["key"] for it in items}) == len(items)
    out = run_read(items)
    assert [r.split(":")[0] for r in out["reason"][1:]] == [p.split(":")[0] for p in pre[1:]]


def test_llava_bad_items(tmp_path):
    data = [
        {"id": "good", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "textonly", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "noanswer", "image": "a.jpg", "conversations": [{"from": "human", "value": "What?"}]},
        {"id": "nonstring", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "What?"}, {"from": "gpt", "value": ["A", "cat"]}]},
        {"id": "noconv", "image": "a.jpg"},
        "not an object",
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(data))
    items = list_items(make_manifest("llava", path))
    pre = [it["precheck"] for it in items]
    assert pre[0] is None
    assert items[0]["text"]["conversations"][1]["value"] == "A cat."
    assert pre[1].startswith("missing_image:")
    assert pre[2].startswith("no_assistant_turn:")
    assert pre[3].startswith("bad_conversation:")
    assert pre[4].startswith("missing_caption:")
    assert pre[5].startswith("bad_item:")


@pytest.mark.parametrize("fmt", ["jsonl", "llava", "coco-captions", "webdataset"])
def test_missing_input_raises_source_error(tmp_path, fmt):
    with pytest.raises(SourceError, match="input.path") as err:
        list_items(make_manifest(fmt, tmp_path / "nope.json"))
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ManifestError)


def test_unusable_json_inputs_raise(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(SourceError, match="input.path"):
        list_items(make_manifest("llava", tmp_path / "a.json"))
    (tmp_path / "b.json").write_text('{"images": []}')
    with pytest.raises(SourceError, match="annotations"):
        list_items(make_manifest("coco-captions", tmp_path / "b.json"))
    with pytest.raises(SourceError, match="input.image_root"):
        list_items(make_manifest("coco-captions", tmp_path / "b.json", image_root=str(tmp_path / "no")))
    with pytest.raises(SourceError, match="do not exist"):
        list_items(make_manifest("webdataset", str(tmp_path / "s-{0..1}.tar")))


def _tar(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0) if gz else buf.getvalue())


def _png(size=(64, 48), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_webdataset_groups_and_bad_samples(tmp_path):
    _tar(tmp_path / "a.tar", [
        ("d/0001.png", _png()), ("d/0001.txt", b"a red square"),
        ("d/0002.txt", b"no image here"), ("d/0002.cls", b"3"),
        ("d/0003.jpg.json", b"{}"), ("d/0003.webp", b"garbage"), ("d/0003.json", b"{oops"),
        ("d/0004.PNG", _png(colour="blue")), ("d/0004.json", json.dumps({"caption": "a blue square"}).encode()),
        ("d/0005.png", _png()), ("d/0005.txt", b"\xff\xfe bad utf8"),
    ])
    items = list_items(make_manifest("webdataset", tmp_path / "a.tar"))
    assert [it["source"]["id"] for it in items] == ["d/0001", "d/0002", "d/0003", "d/0004", "d/0005"]
    assert [it["key"] for it in items][0] == "sample-d-0001"
    pre = [it["precheck"] for it in items]
    assert pre[0] is None and items[0]["text"] == {"caption": "a red square"}
    assert pre[1].startswith("missing_image:")
    assert pre[2].startswith("bad_json:")
    assert pre[3] is None and items[3]["text"] == {"caption": "a blue square"}
    assert pre[4].startswith("caption_not_text:")
    out = run_read(items)
    assert out["status"][0] == "ok" and out["status"][3] == "ok"
    assert out["image"][0] == _png()


def test_webdataset_gzip_and_corrupt_tar(tmp_path):
    _tar(tmp_path / "a.tar.gz", [("k1.png", _png()), ("k1.txt", b"a red square")], gz=True)
    items = list_items(make_manifest("webdataset", tmp_path / "a.tar.gz"))
    assert "offset" not in items[0]["image_ref"]
    assert run_read(items)["status"] == ["ok"]
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file at all" * 40)
    items = list_items(make_manifest("webdataset", tmp_path / "bad.tar"))
    assert len(items) == 1 and items[0]["precheck"].startswith("bad_tar:")


# --- ReadStage on the sample ------------------------------------------------------------

def test_sample_rows_rejected_with_reasons(sample_out):
    keys = {k.removeprefix("sample-"): row for k, row in sample_out.items()}
    for name, prefix in EXPECTED_REJECTED.items():
        assert keys[name]["status"] == "rejected", name
        assert keys[name]["reason"].startswith(prefix), (name, keys[name]["reason"])
    assert all(row["reason"].split(":")[0] in REJECT_REASONS for row in keys.values() if row["reason"])
    ok = {k for k, row in keys.items() if row["status"] == "ok"}
    assert ok == set(keys) - set(EXPECTED_REJECTED)
    assert {"scene-01", "scene-05", "rotated-exif6", "astronaut", "no-nouns"} <= ok
    assert len(ok) >= 18


def test_sample_ok_rows_are_consistent(sample, sample_out):
    for key, row in sample_out.items():
        assert set(BATCH_COLUMNS) <= set(row)
        if row["status"] != "ok":
            assert row["image"] == b"" and row["ext"] == "" and row["record"] == "" and row["log"] == "[]"
            assert row["pixels"].shape == (0, 0, 3)
            continue
        rec = json.loads(row["record"])
        px = row["pixels"]
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3
        assert (rec["image"]["height"], rec["image"]["width"]) == px.shape[:2]
        assert rec["image"]["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert rec["key"] == key and rec["entities"] == [] and rec["regions"] == []
        assert row["ext"] in ("jpg", "png", "webp") and row["log"] == "[]"
        stored = Image.open(io.BytesIO(row["image"]))
        assert stored.size == (px.shape[1], px.shape[0])
        assert {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}[stored.format] == row["ext"]
        item = json.loads(row["item"])
        if "reencoded" not in rec["image"]:                      # source bytes kept as they are
            assert row["image"] == Path(item["image_ref"]["path"]).read_bytes()
            assert np.array_equal(np.array(stored.convert("RGB")), px)


def test_exif_rotation_applied(sample, sample_out):
    row = sample_out["sample-rotated-exif6"]
    raw = Image.open(sample / "images" / "rotated-exif6.jpg")
    assert raw.size == (640, 480) and raw.getexif().get(0x0112) == 6
    rec = json.loads(row["record"])
    assert (rec["image"]["width"], rec["image"]["height"]) == (480, 640)
    assert rec["image"]["reencoded"].startswith("exif orientation 6")
    assert np.array_equal(row["pixels"], np.array(ImageOps.exif_transpose(raw).convert("RGB")))
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.size == (480, 640) and stored.getexif().get(0x0112) in (None, 1)
    diff = np.abs(np.array(stored.convert("RGB")).astype(int) - row["pixels"].astype(int))
    assert diff.mean() < 2.0                                         # JPEG q95 of the same pixels
    top = row["pixels"][130, 240]                                    # orange circle at the top
    assert top[0] > 200 and 100 < top[1] < 200 and top[2] < 60


def test_modes_convert_vs_reject(sample, sample_out):
    for name, mode in CONVERTED.items():
        row = sample_out[f"sample-{name}"]
        assert row["status"] == "ok", row["reason"]
        rec = json.loads(row["record"])
        assert rec["image"]["original_mode"] == mode
        assert rec["image"]["reencoded"]
    rgba = sample_out["sample-rgba"]
    assert rgba["ext"] == "png"
    assert tuple(rgba["pixels"][5, 5]) == (255, 255, 255)             # transparent -> white
    assert tuple(rgba["pixels"][150, 200]) == (30, 60, 200)          # opaque circle kept
    gray = sample_out["sample-gray16"]["pixels"]
    assert gray[128, 192].tolist() == [255, 255, 255] and gray[0, 0].tolist() == [0, 0, 0]
    assert gray[0, 200, 0] == round(200 * 120 / 257)                  # 16-bit scaled, not clipped
    cmyk = sample_out["sample-cmyk"]
    assert cmyk["ext"] == "jpg" and cmyk["pixels"][150, 110, 0] < 80  # cyan square: little red

    items = list_items(make_manifest("jsonl", sample / "captions.jsonl"))
    out = by_key(run_read(items, ImageConfig(modes="reject", store_format="keep")))
    for name, mode in CONVERTED.items():
        assert out[f"sample-{name}"]["reason"] == f"unsupported_mode: {mode}"
    assert out["sample-camera"]["status"] == "ok"                     # grayscale is always converted
    assert out["sample-scene-01"]["status"] == "ok"


# --- ReadStage on hostile input --------------------------------------------------------

def _item(key: str, ref: dict, **extra) -> dict:
    return {"seq": 0, "shard": 0, "key": key, "source": {"dataset": "t", "id": key}, "image_ref": ref,
            "text": {"caption": "a thing"}, "precheck": None, **extra}


def _png_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(_png((16, 16)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_reader_never_raises_on_garbage(tmp_path):
    rng = np.random.default_rng(0)
    blobs = {
        "random": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "text": b"hello, I am not an image\n" * 10,
        "pngjunk": _png()[:40] + rng.integers(0, 256, 400, dtype=np.uint8).tobytes(),
        "jpgjunk": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "truncpng": _png((200, 200))[:60],
        "bomb": _png_with_header_size(100_000, 100_000),
        "tiny": _png((8, 8)),
        "wide": _png((400, 10)),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    }
    items = []
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        items.append(_item(name, {"path": str(tmp_path / name)}))
    items += [_item("dir", {"path": str(tmp_path)}), _item("noref", None),
              _item("badref", {"what": 1}), _item("pre", {"path": "x"}, precheck="empty_caption: x"),
              _item("tarmissing", {"tar": str(tmp_path / "no.tar"), "member": "a.png", "offset": 0, "size": 9})]
    batch = read_batch(items)
    batch["item"].append("{this is not json")                       # a broken item row
    batch["item"].append("[1, 2]")
    batch["seq"] += [98, 99]
    batch["shard"] += [0, 0]
    batch["key"] += ["brokenjson", "list"]
    batch = {k: np.array(v, dtype=object) for k, v in batch.items()}  # what Ray hands over
    batch["times"] = np.array(["{}"] * len(batch["key"]), dtype=object)
    out = ReadStage(ImageConfig(max_side=4096, store_format="keep"))(batch)
    n = len(items) + 2
    assert all(len(out[c]) == n for c in list(BATCH_COLUMNS) + ["times"])
    assert all(set(json.loads(t)) == {"read"} for t in out["times"])   # the stage timed itself
    assert list(out["status"]) == ["rejected"] * n
    reasons = dict(zip(out["key"], out["reason"]))
    assert reasons["random"].startswith("unreadable:")
    assert reasons["text"].startswith("unreadable:")
    assert reasons["svg"].startswith("unreadable:")
    assert reasons["truncpng"].startswith(("truncated:", "unreadable:"))
    assert reasons["bomb"].startswith("too_large:")
    assert reasons["tiny"].startswith("too_small:")
    assert reasons["wide"].startswith("bad_aspect:")
    assert reasons["dir"].startswith("read_error:")
    assert reasons["noref"].startswith("missing_image:")
    assert reasons["badref"].startswith("missing_image:")
    assert reasons["pre"] == "empty_caption: x"
    assert reasons["tarmissing"].startswith("missing_file:")
    assert reasons["brokenjson"].startswith("bad_item:")
    assert reasons["list"].startswith("bad_item:")
    assert all(r.split(":")[0] in REJECT_REASONS for r in reasons.values())
    assert all(p.shape == (0, 0, 3) for p in out["pixels"])


def test_size_and_byte_limits(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big)
    item = _item("big", {"path": str(big)})
    assert run_read([item])["status"] == ["ok"]
    out = run_read([item], ImageConfig(max_bytes=1024))
    assert out["reason"][0].startswith("file_too_large:")
    out = run_read([item], ImageConfig(max_side=256))
    assert out["reason"][0] == "too_large: 300x300 > image.max_side 256"
    out = run_read([item], ImageConfig(min_side=400, max_side=1000))
    assert out["reason"][0].startswith("too_small:")


def test_non_rgb_formats_reencoded(tmp_path):
    Image.new("RGB", (40, 30), "green").save(tmp_path / "a.bmp")
    Image.new("P", (40, 30), 3).save(tmp_path / "b.gif")
    out = run_read([_item("bmp", {"path": str(tmp_path / "a.bmp")}),
                    _item("gif", {"path": str(tmp_path / "b.gif")})])
    assert out["status"] == ["ok", "ok"] and out["ext"] == ["png", "png"]
    assert json.loads(out["record"][0])["image"]["reencoded"] == "format BMP"
    assert "mode P" in json.loads(out["record"][1])["image"]["reencoded"]
    out = run_read([_item("gif", {"path": str(tmp_path / "b.gif")})], ImageConfig(modes="reject", store_format="keep"))
    assert out["reason"] == ["unsupported_mode: P"]


# --- sample data ------------------------------------------------------------------------

def test_sample_data_is_idempotent(tmp_path, sample):
    path = write_sample_data(tmp_path)
    assert path == tmp_path / "captions.jsonl"
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    assert write_sample_data(tmp_path) == path
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()} == stamp
    # identical to an independently written set, and repaired when a file is damaged
    assert path.read_bytes() == (sample / "captions.jsonl").read_bytes()
    for p in (tmp_path / "images").iterdir():
        assert p.read_bytes() == (sample / "images" / p.name).read_bytes(), p.name
    (tmp_path / "images" / "scene-01.jpg").write_bytes(b"oops")
    write_sample_data(tmp_path)
    assert (tmp_path / "images" / "scene-01.jpg").read_bytes() == (sample / "images" / "scene-01.jpg").read_bytes()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == SHOWCASE_ROWS + HELDOUT_SCENES
    assert all(os.path.isabs(r["image"]) is False for r in rows)


def test_sample_heldout_scenes_come_last_with_their_truth(sample):
    """The held-out scenes are the last rows (sample-random.yaml stops before them with input.limit),
    distinct from the showcase, and each has a truth line whose phrases are spans of its caption."""
    import yaml

    rows = [json.loads(line) for line in (sample / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows[SHOWCASE_ROWS:]] == heldout_ids()
    assert not any(r["id"].startswith("heldout-") for r in rows[:SHOWCASE_ROWS])
    manifest = yaml.safe_load((REPO / "manifests" / "sample-random.yaml").read_text())
    assert manifest["input"]["limit"] == SHOWCASE_ROWS
    assert "limit" not in yaml.safe_load((REPO / "manifests" / "sample.yaml").read_text())["input"]
    truth = {t["id"]: t for t in map(json.loads, (sample / "truth.jsonl").read_text().splitlines())}
    captions = {r["id"]: r["caption"] for r in rows}
    held = [truth[i] for i in heldout_ids()]
    for t in held:
        assert all(captions[t["id"]][e["start"]:e["end"]] == e["phrase"] for e in t["entities"])
    named = sum(e["mask"] is not None for t in held for e in t["entities"])
    nothing = sum(e["mask"] is None for t in held for e in t["entities"])
    assert named >= 300 and nothing >= 25           # enough for `evaluate labels` to show the targets
    images = {Path(r["image"]).name for r in rows[SHOWCASE_ROWS:]}
    assert len(images) == HELDOUT_SCENES and all((sample / "images" / n).is_file() for n in images)


def test_store_format_gives_one_format_per_dataset(tmp_path):
    import io as _io
    from PIL import Image as _Image
    png = tmp_path / "a.png"
    jpg = tmp_path / "b.jpg"
    _Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(png)
    _Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(jpg, quality=90)
    items = [_item("png", {"path": str(png)}), _item("jpg", {"path": str(jpg)})]
    out = run_read(items, ImageConfig(store_format="jpg"))
    assert out["ext"] == ["jpg", "jpg"]
    assert out["image"][1] == jpg.read_bytes()              # already JPEG: source bytes kept
    assert _Image.open(_io.BytesIO(out["image"][0])).format == "JPEG"
    assert "store_format" in json.loads(out["record"][0])["image"]["reencoded"]
    out = run_read(items, ImageConfig(store_format="png"))
    assert out["ext"] == ["png", "png"] and out["image"][0] == png.read_bytes()
    out = run_read(items, ImageConfig(store_format="keep"))
    assert out["ext"] == ["png", "jpg"]


def test_webdataset_gzip_member_over_max_bytes_is_not_read(tmp_path, monkeypatch):
    """A compressed tar's member is checked from its header size before a byte is read (a 6.5 MB
    .tar.gz once held a member that decompressed to GBs and was read whole before the check)."""
    big = b"\0" * 2_000_000                                       # ~2 KB gzipped, 2 MB inflated
    _tar(tmp_path / "a.tar.gz", [("k1.png", big), ("k1.txt", b"a bomb"),
                                 ("k2.png", _png()), ("k2.txt", b"a red square")], gz=True)
    items = list_items(make_manifest("webdataset", tmp_path / "a.tar.gz"))
    read_sizes = []
    real = tarfile.TarFile.extractfile

    def counting(self, member):
        fh = real(self, member)
        inner = fh.read

        def read(n=-1):
            data = inner(n)
            read_sizes.append(len(data))
            return data
        fh.read = read
        return fh
    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    out = run_read(items, ImageConfig(max_bytes=4096, store_format="keep"))
    assert out["reason"][0] == "file_too_large: 2000000 bytes > image.max_bytes 4096"
    assert out["status"][1] == "ok"
    assert all(n <= 4097 for n in read_sizes) and sum(read_sizes) < 4097 * 2
