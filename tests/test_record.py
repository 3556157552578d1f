"""The record module (stages/record/): schema helpers, the version, the RLE codec, the shard format."""
import json
import tarfile

import numpy as np
import pytest

from stages.record import MAX_KEY_LEN, make_key, rle, sanitize_key, shards
from stages.write import ShardWriter


def test_keys_are_webdataset_safe():
    assert sanitize_key("coco/2017.val image#3") == "coco-2017-val-image-3"
    assert make_key("coco2017", "000000391895", 0) == "coco2017-000000391895-0"


def test_long_ids_give_short_distinct_keys_that_fit_a_tar_name(tmp_path):
    a = make_key("dataset", "x" * 300 + "a")
    b = make_key("dataset", "x" * 300 + "b")
    assert a != b and len(a) <= MAX_KEY_LEN and len(b) <= MAX_KEY_LEN
    assert a == make_key("dataset", "x" * 300 + "a")  # deterministic
    assert "." not in a and "/" not in a
    # a shard with such a key can be written (USTAR names are limited to 100 bytes)
    from test_write import _ok_row

    writer = ShardWriter(tmp_path, "demo")
    writer.write_shard(0, [_ok_row(0, a), _ok_row(1, b)])
    assert writer.is_complete(0)


# --- one version string ----------------------------------------------------------------------

def test_one_version_from_pyproject():
    import re
    from importlib.metadata import version
    from pathlib import Path

    import pipeline
    from stages import record as rec

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert rec.PIPELINE_VERSION == version("look-and-learn") == pipeline.__version__
    assert re.search(r'(?m)^version = "([^"]+)"', pyproject).group(1) == rec.PIPELINE_VERSION
    assert rec.new_record("k", {}, 1, 1, "", {"caption": "x"})["provenance"] == {
        "schema": rec.SCHEMA_VERSION, "pipeline": rec.PIPELINE_VERSION}


def test_accepted_regions_follow_the_entity_and_the_verdicts():
    from stages import record as rec

    record = {"regions": [{"id": 0, "verdict": {"accept": True}}, {"id": 1, "verdict": {"accept": False}},
                          {"id": 2}, {"id": 3, "verdict": {"accept": True}}]}
    assert [r["id"] for r in rec.accepted_regions(record, {"regions": [3, 1, 2, 0, 9]})] == [3, 0]
    assert rec.accepted_regions(record, {"regions": None}) == [] and rec.accepted_regions({}, {"regions": [0]}) == []


# --- masks: stages/record/rle.py -------------------------------------------------------------

@pytest.mark.parametrize("shape, density", [((7, 11), 0.5), ((480, 640), 0.001), ((480, 640), 0.5),
                                            ((300, 200), 0.999), ((1, 1), 1.0), ((2000, 1500), 0.3)])
def test_rle_encode_is_pycocotools_and_decodes_back(shape, density):
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    h, w = shape
    masks = [rng.random(shape) < density, np.zeros(shape, bool), np.ones(shape, bool)]
    blob = np.zeros(shape, bool)
    blob[h // 4: 3 * h // 4 + 1, w // 5: w // 2 + 1] = True
    masks.append(blob)
    stacked = np.stack(masks)
    want = mask_utils.encode(np.asfortranarray(np.transpose(stacked.astype(np.uint8), (1, 2, 0))))
    got = rle.encode(stacked)
    assert json.loads(json.dumps(got)) == got  # JSON-ready: str counts, int sizes
    for g, w_, m in zip(got, want, masks):
        assert g["size"] == [int(v) for v in w_["size"]]
        assert g["counts"] == w_["counts"].decode("ascii")
        back = rle.decode(g)
        assert back.dtype == bool and np.array_equal(back, m)
        assert np.array_equal(rle.decode({"size": g["size"], "counts": g["counts"].encode()}), m)  # bytes too
        assert rle.area(g) == int(m.sum())
    assert rle.encode(np.zeros((0, 4, 4), bool)) == []


def test_rle_iou():
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:5, :5] = True
    ra, rb, rc = rle.encode(np.stack([a, b, ~a]))
    ious = rle.iou([ra], [ra, rb, rc])
    assert ious.shape == (1, 3)
    assert np.allclose(ious, [[1.0, 0.5, 0.0]])
    assert rle.iou([ra], []).shape == (1, 0)


# --- shards: stages/record/shards.py ---------------------------------------------------------

def _written(tmp_path, name="demo", shards_rows=((0, ("t-a", "t-b")), (1, ("t-c",)))):
    from test_write import _ok_row

    writer = ShardWriter(tmp_path, name)
    for shard, keys in shards_rows:
        writer.write_shard(shard, [_ok_row(i, k) for i, k in enumerate(keys)])
    return writer


def test_layout_names_the_writer_files(tmp_path):
    writer = _written(tmp_path)
    paths = shards.output_paths(tmp_path, "demo", 1)
    assert paths == writer.paths(1)
    assert {k: str(p.relative_to(tmp_path)) for k, p in paths.items()} == {
        "rejected": "rejected/000001.parquet", "log": "logs/adjudication-000001.parquet",
        "stats": "stats/000001.json", "index": "index/demo-000001.parquet", "tar": "shards/demo-000001.tar",
            "done": "done/000001.json"}
    assert shards.dataset_name(paths["tar"]) == "demo"
    complete, incomplete = shards.shard_files(tmp_path)
    assert list(complete) == [0, 1] and incomplete == [] and complete[1] == paths
    paths["stats"].unlink()
    (tmp_path / "shards" / ".demo-000002.tar.tmp").write_bytes(b"partial")  # an interrupted write
    assert shards.shard_files(tmp_path) == ({0: writer.paths(0)}, [1])
    with pytest.raises(shards.NotAnOutputError):
        shards.shard_files(tmp_path / "shards")


def test_reader_reads_what_the_writer_wrote(tmp_path):
    writer = _written(tmp_path)
    tars = shards.shard_paths(tmp_path)
    assert tars == [writer.paths(0)["tar"], writer.paths(1)["tar"]]
    samples = list(shards.iter_samples(tars))
    assert [key for key, _ in samples] == ["t-a", "t-b", "t-c"]
    with tarfile.open(tars[0]) as tar:  # the same bytes tarfile reads
        assert samples[0][1] == {"png": tar.extractfile("t-a.png").read(), "json": tar.extractfile("t-a.json").read()}
    records = list(shards.iter_records(tars, images=True))
    assert [(r["key"], ext) for r, _, ext in records] == [("t-a", "png"), ("t-b", "png"), ("t-c", "png")]
    assert records[0][1] == samples[0][1]["png"] and records[0][0] == json.loads(samples[0][1]["json"])
    # without images: the image members are skipped; one path works as well as a list
    assert [(r["key"], image, ext) for r, image, ext in shards.iter_records(tars[0])] == [("t-a", None, None),
                                                                                         ("t-b", None, None)]
    assert list(shards.iter_samples(tars[0], images=False))[0][1].keys() == {"json"}


def test_reader_rejects_a_sample_without_a_record(tmp_path):
    path = tmp_path / "bad.tar"
    shards.write_tar(path, [("a.png", b"png"), ("a.json", b'{"key": "a"}'), ("b.png", b"png")])
    with pytest.raises(ValueError, match="sample b: no .json"):
        list(shards.iter_records(path, images=True))


def test_shard_paths_names_files_folders_patterns(tmp_path):
    for name in ("s-000000.tar", "s-000001.tar", "s-000002.tar.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    tars = [tmp_path / "s-000000.tar", tmp_path / "s-000001.tar"]
    assert shards.shard_paths(tmp_path) == [*tars, tmp_path / "s-000002.tar.gz"]
    assert shards.shard_paths(tars[1]) == [tars[1]]
    assert shards.shard_paths(str(tmp_path / "s-{000000..000001}.tar")) == tars
    assert shards.shard_paths(str(tmp_path / "*.tar")) == tars
    with pytest.raises(FileNotFoundError, match="do not exist"):
        shards.shard_paths(str(tmp_path / "s-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="no tar files match"):
        shards.shard_paths(str(tmp_path / "*.tgz"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.shard_paths(tmp_path / "missing.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no .tar files"):
        shards.shard_paths(tmp_path / "empty")
