import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.record import dumps, new_record
from stages.write import ShardWriter


def _png(w=12, h=10):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _ok_row(seq, key):
    rec = new_record(key, {"dataset": "t", "id": str(seq)}, 12, 10, "0" * 64, {"caption": "a dog"})
    rec["entities"] = [{"id": 0, "phrase": "a dog", "start": 0, "end": 5, "turn": None, "root": "dog",
                        "plural": False, "status": "ungrounded", "regions": [],
                        "reason": "no_box_above_thresholds", "expression": None}]
    log = [{"key": key, "entity": 0, "phrase": "a dog", "root": "dog", "region": 0, "det_score": 0.5,
            "mask_score": 0.5, "inputs": "{}", "raw": "", "accept": False, "reason": "low_det_score: x",
            "model": "rules", "prompt": "rules.v1", "latency_ms": 0.1, "tokens": 0, "error": ""}]
    return {"seq": seq, "shard": 0, "key": key, "status": "ok", "reason": "", "image": _png(),
            "ext": "png", "record": dumps(rec), "item": "{}", "log": json.dumps(log),
            "times": json.dumps({"read": 0.5})}


def _rejected_row(seq, key, reason):
    return {"seq": seq, "shard": 0, "key": key, "status": "rejected", "reason": reason, "image": b"",
            "ext": "", "record": "", "item": json.dumps({"id": key}), "log": "[]", "times": "{}"}


def test_shard_layout_and_contents(tmp_path):
    writer = ShardWriter(tmp_path, "demo")
    rows = [_ok_row(1, "t-b"), _rejected_row(2, "t-c", "zero_byte: empty file"), _ok_row(0, "t-a")]
    stats = writer.write_shard(0, rows)
    paths = writer.paths(0)
    assert writer.is_complete(0)
    assert paths["tar"].name == "demo-000000.tar"
    with tarfile.open(paths["tar"]) as tar:
        names = tar.getnames()
    assert names == ["t-a.png", "t-a.json", "t-b.png", "t-b.json"]  # input order, image before json
    index = pq.read_table(paths["index"]).to_pylist()
    assert [r["key"] for r in index] == ["t-a", "t-b"]
    assert index[0]["reasons"] == ["no_box_above_thresholds"] and index[0]["status"] == "not_grounded"
    rejected = pq.read_table(paths["rejected"]).to_pylist()
    assert rejected == [{"seq": 2, "key": "t-c", "reason": "zero_byte: empty file", "item": '{"id": "t-c"}'}]
    assert pq.read_table(paths["log"]).num_rows == 2
    assert stats["samples_in"] == 3 and stats["samples_out"] == 2
    assert stats["rejected_by_reason"] == {"zero_byte": 1}
    assert stats["stage_seconds"] == {"read": 1.0}
    assert not list(tmp_path.rglob(".*.tmp"))


def test_index_carries_the_source_and_its_meta(tmp_path):
    """source.meta (an input's extra fields: url, similarity, license ...) reaches the index as
    JSON text, with the dataset and source id, so it can be filtered without opening shards."""
    meta = {"url": "https://example.com/a.jpg", "similarity": 0.31, "LICENSE": "cc-by", "NSFW": "UNLIKELY"}
    row = _ok_row(0, "t-a")
    rec = json.loads(row["record"])
    rec["source"] = {"dataset": "laion", "id": "000123", "meta": meta}
    row["record"] = dumps(rec)
    writer = ShardWriter(tmp_path, "demo")
    writer.write_shard(0, [row, _ok_row(1, "t-b")])
    index = pq.read_table(writer.paths(0)["index"]).to_pylist()
    assert [(r["dataset"], r["source_id"]) for r in index] == [("laion", "000123"), ("t", "1")]
    assert json.loads(index[0]["meta"]) == meta and json.loads(index[1]["meta"]) == {}
    with tarfile.open(writer.paths(0)["tar"]) as tar:
        stored = json.loads(tar.extractfile("t-a.json").read())
    assert stored["source"]["meta"] == meta


def test_incomplete_shard_is_detected_and_cleared(tmp_path):
    writer = ShardWriter(tmp_path, "demo")
    writer.write_shard(3, [_ok_row(0, "t-a")])
    writer.paths(3)["tar"].unlink()  # as if killed before the final rename
    tmp = writer.paths(3)["tar"].with_name(".demo-000003.tar.tmp")
    tmp.write_bytes(b"partial")
    assert not writer.is_complete(3)
    writer.clear(3)
    assert not any(p.exists() for p in writer.paths(3).values()) and not tmp.exists()


def test_schema_violation_is_an_error_not_a_broken_sample(tmp_path):
    row = _ok_row(0, "t-a")
    rec = json.loads(row["record"])
    rec["entities"][0]["end"] = 3  # offsets no longer match the phrase
    row["record"] = json.dumps(rec)
    with pytest.raises(ValueError, match="offsets"):
        ShardWriter(tmp_path, "demo").write_shard(0, [row])


def test_shards_are_byte_reproducible(tmp_path):
    a = ShardWriter(tmp_path / "a", "demo")
    b = ShardWriter(tmp_path / "b", "demo")
    a.write_shard(0, [_ok_row(0, "t-a")])
    b.write_shard(0, [_ok_row(0, "t-a")])
    assert a.paths(0)["tar"].read_bytes() == b.paths(0)["tar"].read_bytes()


@pytest.mark.parametrize("target", ["tar", "parquet"])
def test_disk_full_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch, target):
    import errno

    import stages.write as write_module

    def full(path, *args, **kwargs):
        open(path, "wb").write(b"half a file")  # the temp file exists when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "tar":
        monkeypatch.setattr(write_module, "write_tar", full)
        name = "demo-000000.tar"
    else:
        monkeypatch.setattr(write_module.pq, "write_table", lambda table, path, *a, **k: full(path))
        name = "000000.parquet"
    writer = ShardWriter(tmp_path, "demo")
    with pytest.raises(OSError) as err:
        writer.write_shard(0, [_ok_row(0, "t-a")])
    assert err.value.errno == errno.ENOSPC
    assert name in str(err.value) and "No space left on device" in str(err.value)
    assert not list(tmp_path.rglob(".*.tmp"))
    assert not writer.is_complete(0)


def test_leftover_temp_files_are_removed_when_a_writer_starts(tmp_path):
    writer = ShardWriter(tmp_path, "demo")
    writer.write_shard(0, [_ok_row(0, "t-a")])
    leftovers = [p.with_name(f".{p.name}.tmp") for p in writer.paths(0).values()]
    for p in leftovers:
        p.write_bytes(b"from a killed run")
    ShardWriter(tmp_path, "demo")
    assert not any(p.exists() for p in leftovers)
    assert writer.is_complete(0)


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p["tar"].write_bytes(b""), "size: tar"),                      # zero-byte tar
    (lambda p: p["tar"].write_bytes(p["tar"].read_bytes()[:700]), "size: tar"),  # truncated tar
    (lambda p: p["index"].write_bytes(b"x" * p["index"].stat().st_size), None),  # garbage, same size
    (lambda p: p["done"].unlink(), "no_completion_record"),                  # old build / killed before it
    (lambda p: p["stats"].unlink(), "missing: stats"),
])
def test_completion_record_catches_damaged_shards(tmp_path, damage, reason):
    writer = ShardWriter(tmp_path, "demo", {"fingerprint": "abc", "settings": {"x": 1}})
    writer.write_shard(0, [_ok_row(0, "t-a")])
    done = json.loads(writer.paths(0)["done"].read_text())
    assert done["fingerprint"] == "abc" and done["settings"] == {"x": 1}
    assert set(done["files"]) == {"rejected", "log", "stats", "index", "tar"}
    assert done["files"]["tar"]["size"] == writer.paths(0)["tar"].stat().st_size
    damage(writer.paths(0))
    if reason is None:  # same size: only the hash sees it
        assert writer.is_complete(0)
        assert writer.check(0, hashes=True) == "sha256: index"
    else:
        assert writer.check(0) == reason and not writer.is_complete(0)
