"""Verified shards, settings fingerprint, lock and foreign folders, on the offline sample build."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.manifest import ManifestError, load_manifest
from pipeline.runner import build

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "sample-random.yaml"


def _build(out: Path, overrides: list[str], overwrite: bool = False) -> dict:
    manifest = load_manifest(SAMPLE, overrides + ["runtime.executor=local"], out=str(out))
    return build(manifest, progress=False, overwrite=overwrite)


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    from devkit.sample_data import write_sample_data
    from devkit.tiny_models import write_tiny_models

    models = write_tiny_models(tmp_path_factory.mktemp("models"))
    jsonl = write_sample_data(tmp_path_factory.mktemp("data"))
    det = next(p for k, p in models.items() if "dino" in k)
    sam = next(p for k, p in models.items() if "sam" in k)
    return [f"input.path={jsonl}", f"detect.model={det}", f"segment.model={sam}", "output.samples_per_shard=8"]


@pytest.fixture(scope="module")
def built(overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "sample"
    _build(out, overrides)
    return out


@pytest.fixture
def out(built, tmp_path):
    copy = tmp_path / "sample"
    shutil.copytree(built, copy)
    return copy


def _tars(out):
    return sorted((out / "shards").glob("*.tar"))


def test_every_shard_has_a_completion_record(built):
    records = sorted((built / "done").glob("*.json"))
    assert len(records) == len(_tars(built)) > 1
    rec = json.loads(records[0].read_text())
    assert rec["files"]["tar"]["size"] == _tars(built)[0].stat().st_size
    assert len(rec["fingerprint"]) == 64
    assert rec["settings"]["adjudicate.min_det_score"] == 0.84  # manifests/sample-random.yaml
    assert not any(k.startswith("runtime.") for k in rec["settings"]) and "output.path" not in rec["settings"]


@pytest.mark.parametrize("damage", ["zero", "truncate"])
def test_damaged_tar_is_redone_on_resume(out, overrides, damage):
    from pipeline.inspect import analyze
    from pipeline.publish import PublishError, plan

    tar = _tars(out)[0]
    want = tar.read_bytes()
    tar.write_bytes(b"" if damage == "zero" else want[:1000])
    assert analyze(out)["shards"]["incomplete"] == [0]      # listed, not read (no crash)
    with pytest.raises(PublishError, match="incomplete"):
        plan(out)
    stats = _build(out, overrides)
    assert stats["last_run"]["shards_redone"] == {"size": 1}
    assert stats["last_run"]["shards_written"] == 1
    assert tar.read_bytes() == want


def test_garbage_index_is_seen_by_the_hash_check(out):
    from stages.record.shards import shard_files

    index = sorted((out / "index").glob("*.parquet"))[0]
    index.write_bytes(b"x" * index.stat().st_size)
    assert 0 not in shard_files(out)[1]                   # sizes only (resume)
    assert 0 in shard_files(out, hashes=True)[1]          # inspect / publish
    from pipeline.inspect import analyze
    from pipeline.publish import PublishError, plan

    assert analyze(out)["shards"]["incomplete"] == [0]
    with pytest.raises(PublishError, match="incomplete"):
        plan(out)


def test_old_build_without_completion_records_is_redone(out, overrides):
    shutil.rmtree(out / "done")
    stats = _build(out, overrides)
    n = len(_tars(out))
    assert stats["last_run"]["shards_redone"] == {"no_completion_record": n}
    assert stats["last_run"]["shards_written"] == n


def test_other_threshold_is_refused_and_nothing_is_rewritten(out, overrides):
    before = {p: p.read_bytes() for p in [out / "manifest.resolved.yaml", out / "README.md", *_tars(out)]}
    with pytest.raises(ManifestError) as err:
        _build(out, overrides + ["adjudicate.min_det_score=0.9"])
    assert "adjudicate.min_det_score: 0.84 -> 0.9" in str(err.value) and "--overwrite" in str(err.value)
    assert {p: p.read_bytes() for p in before} == before


def test_overwrite_rebuilds_with_the_new_settings(out, overrides):
    (out / "shards" / "mine.txt").write_text("not ours")  # a layout folder is the build's own
    stats = _build(out, overrides + ["adjudicate.min_det_score=0.9"], overwrite=True)
    assert stats["last_run"]["shards_skipped"] == 0
    assert "min_det_score: 0.9" in (out / "manifest.resolved.yaml").read_text()
    rec = json.loads(sorted((out / "done").glob("*.json"))[0].read_text())
    assert rec["settings"]["adjudicate.min_det_score"] == 0.9


def test_runtime_settings_do_not_count(out, overrides):
    stats = _build(out, overrides + ["runtime.cpu_batch_size=3", "adjudicate.timeout_s=5"])
    assert stats["last_run"]["samples_processed"] == 0


def test_a_foreign_folder_is_refused_and_untouched(tmp_path, overrides):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "stats.json").write_text("{}")
    with pytest.raises(ManifestError, match="not a Look&Learn build"):
        _build(out, overrides)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "stats.json"]
    assert (out / "README.md").read_text() == "my notes"


def test_a_running_build_holds_the_folder(out, overrides):
    from pipeline.outdir import lock

    with lock(out):
        started = time.perf_counter()
        with pytest.raises(ManifestError, match=str(out)):
            _build(out, overrides)
        assert time.perf_counter() - started < 30
    _build(out, overrides)  # released: the next build goes in


def test_cli_refusals_are_exit_2_and_overwrite_flag(out, overrides, tmp_path, capsys):
    from pipeline.cli import main

    def args(o, sets, *extra):
        return ["build", str(SAMPLE), "--out", str(o), "--no-progress", *extra,
                *[x for s in sets + ["runtime.executor=local"] for x in ("--set", s)]]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(args(mine, overrides)) == 2
    assert "not a Look&Learn build" in capsys.readouterr().err and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main(args(out, overrides + ["parse.max_caption_chars=100"])) == 2
    assert "parse.max_caption_chars" in capsys.readouterr().err
    assert main(args(out, overrides + ["parse.max_caption_chars=100"], "--overwrite")) == 0


def test_cli_summary_counts_redone_shards(out, overrides, capsys):
    from pipeline.cli import main

    _tars(out)[1].write_bytes(b"")
    sets = overrides + ["runtime.executor=local"]
    assert main(["build", str(SAMPLE), "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)]]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # the summary table may wrap its cells
    assert "1 redone (1 size: incomplete or corrupt" in printed
