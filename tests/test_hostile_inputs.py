"""Hostile inputs: image paths that leave ``input.image_root``, and text that breaks one row only.

Every case goes through ``list_items`` and the stages (``read_batch`` + ``ReadStage``, then
``ParseStage``) and must end as a clean rejection with a specific reason, never a crashed build
and never a published file from outside the image root.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline.manifest import Manifest
from pipeline.sources import REJECT_REASONS, list_items
from stages import record as rec
from stages.read import READ_REASONS, ReadStage, read_batch


def _manifest(path: Path, **input_kw) -> Manifest:
    return Manifest.model_validate({"name": "hostile", "input": {"format": "jsonl", "path": str(path), **input_kw},
                                    "output": {"samples_per_shard": 100}})


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _read(items: list[dict]) -> dict:
    stage = ReadStage()
    stage.setup()
    return stage(read_batch(items))


def _by_id(items: list[dict], out: dict) -> dict[str, tuple[str, str]]:
    return {it["source"]["id"]: (out["status"][i], out["reason"][i]) for i, it in enumerate(items)}


@pytest.fixture()
def layout(tmp_path) -> Path:
    """tmp/data/{in.jsonl, img.png, link.png -> ../sec/x.png}, tmp/sec/x.png (the secret)."""
    data, sec = tmp_path / "data", tmp_path / "sec"
    data.mkdir()
    sec.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(data / "img.png")
    Image.new("RGB", (64, 48), (250, 0, 0)).save(sec / "x.png")
    os.symlink(sec / "x.png", data / "link.png")
    os.symlink(sec, data / "secdir")
    return tmp_path


def _confinement_lines(tmp_path: Path) -> list[dict]:
    return [{"id": "inside", "image": "img.png", "caption": "a green square"},
            {"id": "dotdot", "image": "../sec/x.png", "caption": "a red ball"},
            {"id": "absolute", "image": str(tmp_path / "sec" / "x.png"), "caption": "a red ball"},
            {"id": "symlink", "image": "link.png", "caption": "a red ball"},
            {"id": "symlinked-dir", "image": "secdir/x.png", "caption": "a red ball"}]


# --- 1. confinement ------------------------------------------------------------------------

@pytest.mark.parametrize("explicit_root", [False, True])
def test_paths_outside_the_image_root_are_rejected(layout, explicit_root):
    path = _write_jsonl(layout / "data" / "in.jsonl", _confinement_lines(layout))
    kw = {"image_root": str(layout / "data")} if explicit_root else {}
    items = list_items(_manifest(path, **kw))
    pre = {it["source"]["id"]: it["precheck"] for it in items}
    assert pre["inside"] is None
    assert pre["dotdot"] == "outside_image_root: ../sec/x.png"
    assert pre["absolute"] == f"outside_image_root: {layout / 'sec' / 'x.png'}"
    assert pre["symlink"] == "outside_image_root: link.png"
    assert pre["symlinked-dir"] == "outside_image_root: secdir/x.png"
    out = _read(items)
    rows = _by_id(items, out)
    assert rows["inside"] == (rec.ROW_OK, "")
    for name in ("dotdot", "absolute", "symlink", "symlinked-dir"):
        status, reason = rows[name]
        assert status != rec.ROW_OK and reason.startswith("outside_image_root: "), (name, reason)
    assert "outside_image_root" in REJECT_REASONS and "outside_image_root" in READ_REASONS
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)


def test_allow_outside_image_root_reads_them(layout):
    path = _write_jsonl(layout / "data" / "in.jsonl", _confinement_lines(layout))
    items = list_items(_manifest(path, allow_outside_image_root=True))
    assert all(it["precheck"] is None for it in items)
    out = _read(items)
    assert out["status"] == [rec.ROW_OK] * len(items), out["reason"]


def test_symlink_swapped_after_listing_is_rejected_at_read_time(layout):
    data = layout / "data"
    Image.new("RGB", (64, 48), (0, 0, 200)).save(data / "blue.png")
    os.symlink(data / "blue.png", data / "swap.png")
    path = _write_jsonl(data / "in.jsonl", [{"id": "swap", "image": "swap.png", "caption": "a blue square"}])
    items = list_items(_manifest(path))
    assert items[0]["precheck"] is None
    os.remove(data / "swap.png")                              # between listing and reading
    os.symlink(layout / "sec" / "x.png", data / "swap.png")
    out = _read(items)
    assert out["status"] == [rec.ROW_REJECTED] and out["reason"][0].startswith("outside_image_root: "), out["reason"]
    assert out["image"][0] == b""


def test_coco_and_llava_are_confined_too(layout):
    data = layout / "data"
    coco = data / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "img.png"}, {"id": 2, "file_name": "../sec/x.png"}],
                                "annotations": [{"id": 10, "image_id": 1, "caption": "a square"},
                                                {"id": 11, "image_id": 2, "caption": "a ball"}]}))
    items = list_items(Manifest.model_validate({"name": "c", "input": {"format": "coco-captions", "path": str(coco)}}))
    assert [it["precheck"] for it in items] == [None, "outside_image_root: ../sec/x.png"]
    llava = data / "llava.json"
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a ball"}]
    llava.write_text(json.dumps([{"id": "a", "image": "link.png", "conversations": conv}]))
    items = list_items(Manifest.model_validate({"name": "l", "input": {"format": "llava", "path": str(llava)}}))
    assert items[0]["precheck"] == "outside_image_root: link.png"


# --- 2. row isolation for text ------------------------------------------------------------------

def test_webdataset_text_members_are_cleaned(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    members = [("a.png", buf.getvalue()), ("a.txt", b"a red ball\x00"),
               ("b.png", buf.getvalue()), ("b.json", b'{"caption": "a cat\\ud800"}'),
               ("c.png", buf.getvalue()), ("c.json", b'{"caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")]
    with tarfile.open(tmp_path / "s-000000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    items = list_items(Manifest.model_validate({"name": "w", "input": {"format": "webdataset", "path": str(tmp_path)}}))
    assert [it["text"] for it in items[:2]] == [{"caption": "a red ball"}, {"caption": "a cat\ufffd"}]
    assert items[0]["precheck"] is None and items[1]["precheck"] is None
    assert items[2]["precheck"] == "bad_json: c.json: nested too deep to parse"
    out = _read(items)
    assert out["status"] == [rec.ROW_OK, rec.ROW_OK, rec.ROW_REJECTED], out["reason"]


def test_json_inputs_nested_too_deep_reject_one_item(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    deep_turn = {"from": "gpt", "value": "a ball", "meta": json.loads("[" * 150 + "]" * 150)}
    ok_conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a ball\ud800"}]
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "deep", "image": "img.png", "conversations": [deep_turn]},
                                 {"id": "ok", "image": "img.png", "conversations": ok_conv}]))
    items = list_items(Manifest.model_validate({"name": "l", "input": {"format": "llava", "path": str(llava)}}))
    assert items[0]["precheck"] == "bad_json: item 0: nested deeper than 100 levels"
    assert items[1]["precheck"] is None and items[1]["text"]["conversations"][1]["value"] == "a ball\ufffd"
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "img.png"}],
                                "annotations": [{"id": 1, "image_id": 1, "caption": json.loads("[" * 150 + "]" * 150)},
                                                {"id": 2, "image_id": 1, "caption": "a cat\u0000"}]}))
    items = list_items(Manifest.model_validate({"name": "c", "input": {"format": "coco-captions", "path": str(coco)}}))
    assert items[0]["precheck"].startswith("caption_not_text:")
    assert items[1]["precheck"] is None and items[1]["text"] == {"caption": "a cat"}


@pytest.fixture(scope="module")
def parse_stage():
    pytest.importorskip("spacy")
    from stages.parse import ParseConfig, ParseStage
    from stages.phrases import load_spacy

    try:
        nlp = load_spacy("auto")
    except RuntimeError as exc:  # pragma: no cover - only without the model package
        pytest.skip(str(exc))
    stage = ParseStage(ParseConfig())
    stage.nlp = nlp
    stage.setup()
    return stage


def test_hostile_text_rows_are_rejected_alone(tmp_path, parse_stage):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "img.png")
    deep = '{"id": "deep", "image": "img.png", "caption": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ok", "image": "img.png", "caption": "a red ball on a green table"},
        {"id": "huge", "image": "img.png", "caption": "a red ball " * 100_001},
        '{"id": "surrogate", "image": "img.png", "caption": "a red ball\\ud800 on a table\\u0000"}',
        deep,
        {"id": "ok2", "image": "img.png", "caption": "a small dog"},
    ])
    items = list_items(_manifest(path))
    assert len(items) == 5
    assert items[3]["precheck"].startswith("bad_json: line 4")
    surrogate = items[2]["text"]["caption"]
    assert "\ud800" not in surrogate and "\x00" not in surrogate and surrogate.startswith("a red ball")
    json.dumps(items, ensure_ascii=False).encode("utf-8")        # what the runner ships to the stages
    out = parse_stage(_read(items))
    rows = _by_id(items, out)
    assert rows["ok"][0] == rec.ROW_OK and rows["ok2"][0] == rec.ROW_OK
    assert rows["surrogate"][0] == rec.ROW_OK, rows["surrogate"]
    assert rows["huge"][0] == rec.ROW_REJECTED
    assert rows["huge"][1] == "caption_too_long: 1100011 chars > parse.max_caption_chars 20000"
    assert rows["line4"][1].startswith("bad_json: line 4")               # unparsable: keyed by its line


def test_max_caption_chars_is_a_manifest_field(tmp_path, parse_stage):
    from stages.parse import ParseConfig, ParseStage

    m = Manifest.model_validate({"name": "x", "input": {"path": "in.jsonl"}, "parse": {"max_caption_chars": 30}})
    assert m.parse.max_caption_chars == 30
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "img.png")
    conv = [{"from": "human", "value": "<image> describe it " * 10},
            {"from": "gpt", "value": "a red ball on a green table, near a big blue chair"}]
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": "c", "image": "img.png", "caption": "a red ball"},
                                                {"id": "v", "image": "img.png", "conversations": conv}])
    stage = ParseStage(m.parse)
    stage.nlp = parse_stage.nlp
    stage.setup()
    out = stage(_read(list_items(_manifest(path))))
    assert out["status"] == [rec.ROW_OK, rec.ROW_REJECTED]
    assert out["reason"][1] == "caption_too_long: 50 chars > parse.max_caption_chars 30"
