"""lookandlearn publish: --dry-run, an fsspec local destination, the Hub path (mocked), the card."""
from __future__ import annotations

import json
import shutil
import socket

import pytest

from pipeline import publish
from pipeline.cli import main

TOKEN = "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"


def _expected_files(out) -> dict[str, int]:
    """What belongs in a published dataset (see pipeline/publish.py)."""
    want = {}
    for pattern in ("shards/*.tar", "index/*.parquet", "logs/*.parquet", "rejected/*.parquet", "stats/*.json"):
        for p in out.glob(pattern):
            want[p.relative_to(out).as_posix()] = p.stat().st_size
    for name in ("stats.json", "manifest.resolved.yaml", "README.md"):
        want[name] = (out / name).stat().st_size
    return want


@pytest.fixture
def out(sample_out, tmp_path):
    """A copy with things that must never be published: the gallery and a temp file."""
    dst = tmp_path / "out"
    shutil.copytree(sample_out, dst)
    (dst / "gallery.html").write_text("<html></html>")
    (dst / "shards" / ".sample-000009.tar.tmp").write_bytes(b"partial")
    return dst


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or build a Hub client fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("dry run must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def test_dry_run_prints_exactly_what_would_be_uploaded(out, no_network, capsys):
    assert main(["publish", str(out), "--repo", "someone/grounded-sample", "--private", "--dry-run"]) == 0
    text = capsys.readouterr().out
    want = _expected_files(out)
    listed = {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 3 and parts[2] == "B":
            listed[parts[0]] = int(parts[1])
    assert listed == want
    lines = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert lines[0].startswith("shards/") and lines[-1] == "README.md"  # data first, card last
    assert "https://huggingface.co/datasets/someone/grounded-sample" in text and "private" in text
    assert f"would upload {len(want)} files" in text and f"{sum(want.values())} bytes" in text
    not_uploaded = text.split("not uploaded: ")[1]
    assert "gallery.html" in not_uploaded and ".sample-000009.tar.tmp" in not_uploaded
    assert "nothing was uploaded" in text
    assert TOKEN not in text


def test_dry_run_exclude(out, no_network, capsys):
    assert main(["publish", str(out), "--to", str(out.parent / "dest"), "--dry-run", "--exclude", "logs/*"]) == 0
    text = capsys.readouterr().out
    assert "logs/adjudication-000000.parquet" in text.split("not uploaded:")[1]
    assert "  logs/" not in text.split("not uploaded:")[0]
    assert not (out.parent / "dest").exists()


def test_fsspec_local_destination_card_and_load_dataset(out, tmp_path, capsys, sample_out):
    dest = tmp_path / "published"
    assert main(["publish", str(out), "--to", dest.as_uri()]) == 0
    want = _expected_files(out)
    got = {p.relative_to(dest).as_posix(): p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    assert got == want
    for rel in want:
        assert (dest / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert f"copied {len(want)} files" in capsys.readouterr().out

    # a rerun resumes: data already there is skipped, a half-copied shard is redone
    shard = dest / "shards" / "sample-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["publish", str(out), "--to", str(dest)]) == 0
    assert f"copied 4 files to {dest} ({len(want) - 4} already there)" in capsys.readouterr().out
    assert shard.read_bytes() == (out / "shards" / "sample-000001.tar").read_bytes()

    # the card: valid Hub YAML whose configs entry points at the shards ...
    from huggingface_hub import DatasetCard, DatasetCardData

    card = DatasetCard.load(dest / "README.md")
    assert isinstance(card.data, DatasetCardData)
    meta = card.data.to_dict()
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}]
    assert meta["pretty_name"] == "sample" and meta["license"] == "other"
    assert meta["task_categories"] and meta["size_categories"] == ["n<1K"]
    # ... plus the stats, the manifest, the models with revisions and the prompt version
    stats = json.loads((out / "stats.json").read_text())
    body = card.text
    assert f"| samples written | {stats['samples_out']} |" in body
    assert f"| judge accept share | {stats['rates']['judge_accept']} |" in body
    import yaml

    resolved = yaml.safe_load((out / "manifest.resolved.yaml").read_text())
    for rev in (resolved["resolved"]["detector_revision"], resolved["resolved"]["segmenter_revision"]):
        assert f"(revision `{rev}`)" in body
    assert "prompt version `rules.v2`" in body
    manifest_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(manifest_block) == resolved
    assert "randomly initialised" in body

    # ... and that makes datasets.load_dataset(<repo or folder>) read the shards, not the parquet files
    from datasets import load_dataset

    ds = load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == stats["samples_out"]
    assert {"json", "jpg"} <= set(ds.column_names)
    assert ds[0]["json"]["key"] == ds[0]["__key__"]


class FakeHfApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        FakeHfApi.calls.append(("init", args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))



class FakeOldHfApi(FakeHfApi):
    """huggingface_hub < 1.x, which has upload_large_folder."""

    def upload_large_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_large_folder", kwargs))


@pytest.mark.parametrize("has_large_folder", [True, False])
def test_hub_upload_goes_through_huggingface_hub(out, monkeypatch, capsys, has_large_folder):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeOldHfApi if has_large_folder else FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["publish", str(out), "--repo", "someone/grounded-sample", "--private"]) == 0
    text = capsys.readouterr()
    assert TOKEN not in text.out + text.err
    kinds = [c[0] for c in FakeHfApi.calls]
    assert kinds == ["init", "create_repo", "upload_large_folder" if has_large_folder else "upload_folder"]
    _, repo_id, kwargs = FakeHfApi.calls[1]
    assert repo_id == "someone/grounded-sample" and kwargs == {"repo_type": "dataset", "private": True, "exist_ok": True}
    upload = FakeHfApi.calls[2][1]
    assert upload["repo_type"] == "dataset" and upload["folder_path"] == str(out)
    # the patterns the uploader applies select exactly the planned files
    everything = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    selected = set(filter_repo_objects(everything, allow_patterns=upload["allow_patterns"],
                                       ignore_patterns=upload["ignore_patterns"]))
    assert selected == set(_expected_files(out))


def test_refusals(out, tmp_path, capsys):
    assert main(["publish", str(out), "--repo", "not a repo id", "--dry-run"]) == 2
    assert "USER/NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["publish", str(out), "--repo", "a/b", "--to", str(tmp_path)])
    assert exc.value.code == 2
    assert main(["publish", str(out), "--to", str(tmp_path / "d"), "--exclude", "README.md"]) == 2
    assert main(["publish", str(tmp_path / "nothing"), "--to", str(tmp_path / "d")]) == 2
    (out / "index" / "sample-000002.parquet").unlink()
    assert main(["publish", str(out), "--to", str(tmp_path / "d"), "--dry-run"]) == 2
    assert "incomplete shard" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert publish.safe_url("s3://KEY:SECRET@bucket/path?token=x") == "s3://bucket/path?…"


def test_a_copy_inside_the_output_is_not_published_again(out, capsys):
    """``*`` matches one path segment: ``shards/*.tar`` is not ``shards/copy/shards/x.tar``."""
    from huggingface_hub.utils import filter_repo_objects

    assert main(["publish", str(out), "--to", str(out / "shards" / "copy")]) == 0
    assert list((out / "shards" / "copy").rglob("*.tar"))
    capsys.readouterr()
    p = publish.plan(out)
    planned = {rel: size for rel, size in p.files}
    assert planned == _expected_files(out)
    assert "shards/copy/README.md" in p.left_out
    # the Hub uploader's own glob patterns select the very same files
    everything = [q.relative_to(out).as_posix() for q in out.rglob("*") if q.is_file()]
    selected = set(filter_repo_objects(everything, allow_patterns=list(publish.INCLUDE),
                                       ignore_patterns=p.ignore_patterns))
    assert selected == set(planned)
    # and publishing again uploads each file once
    assert main(["publish", str(out), "--to", str(out / "shards" / "copy"), "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(planned)
