"""`--out s3://...`: a build into object storage, against a real S3 server (moto) on 127.0.0.1.

A local-executor build into a bucket equals a local build (tar members, index); inspect and
publish read it; resume redoes only a shard whose object is gone; credentials never reach the
output or an error; the lock object; and (slow) a two-node loopback Ray cluster killed with -9
mid-build, resumed, equals the local build.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from pipeline.cli import main  # noqa: E402
from pipeline.manifest import ManifestError, load_manifest  # noqa: E402
from pipeline.runner import build  # noqa: E402
from test_cluster import ray_cluster  # noqa: E402,F401  (the loopback two-node cluster fixture)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "sample-random.yaml"
FAKE_KEY_ID = "AKIDLOOKANDLEARNTEST"
FAKE_SECRET = "fake-secret-3vK9qLwZ0xY7pR2u"   # must never appear in an output or an error
BUCKET = "builds"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1, credentials in the environment, one bucket."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        yield {"endpoint": endpoint, "fs": fs, "env": env}
    server.stop()


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    from devkit.sample_data import write_sample_data
    from devkit.tiny_models import write_tiny_models

    models = write_tiny_models(tmp_path_factory.mktemp("models"))
    jsonl = write_sample_data(tmp_path_factory.mktemp("data"))
    det = next(p for k, p in models.items() if "dino" in k)
    sam = next(p for k, p in models.items() if "sam" in k)
    return [f"input.path={jsonl}", f"detect.model={det}", f"segment.model={sam}", "input.limit=6",
            "output.samples_per_shard=2", "runtime.cpu_batch_size=2", "runtime.executor=local"]


def _build(out: str, overrides: list[str], extra: list[str] = ()) -> dict:
    return build(load_manifest(SAMPLE, list(overrides) + list(extra), out=out), progress=False)


@pytest.fixture(scope="module")
def local_out(overrides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "sample"
    _build(str(out), overrides)
    return out


def _members(tars: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    import io

    got = {}
    for name, data in sorted(tars.items()):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            got[name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return got


def _local_files(out: Path, folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / folder).glob("*")) if not p.name.startswith(".")}


def _bucket_files(fs, prefix: str, folder: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.find(f"{prefix}/{folder}"))}


def _index(files: dict[str, bytes]) -> list[dict]:
    import io

    return [row for _, data in sorted(files.items()) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


def _assert_equals_local(fs, prefix: str, local_out: Path, exact: bool = True) -> None:
    got_tars, want_tars = _bucket_files(fs, prefix, "shards"), _local_files(local_out, "shards")
    assert sorted(got_tars) == sorted(want_tars) and got_tars
    if exact:
        assert _members(got_tars) == _members(want_tars)
        assert got_tars == want_tars   # the same bytes: the one writer, a whole-object upload
    else:   # Ray: other batch make-ups give float noise in boxes/masks; the same samples, members
        assert {k: sorted(v) for k, v in _members(got_tars).items()} == \
               {k: sorted(v) for k, v in _members(want_tars).items()}
    got_index, want_index = _index(_bucket_files(fs, prefix, "index")), _index(_local_files(local_out, "index"))
    if exact:
        assert got_index == want_index
    else:
        assert [r["key"] for r in got_index] == [r["key"] for r in want_index]
    assert sorted(_bucket_files(fs, prefix, "done")) == sorted(_local_files(local_out, "done"))


def _no_secret_anywhere(fs, prefix: str) -> None:
    fs.invalidate_cache()
    for path in fs.find(prefix):
        assert FAKE_SECRET.encode() not in fs.cat_file(path), path
        assert FAKE_KEY_ID.encode() not in fs.cat_file(path), path


def test_build_into_s3_equals_local_build_and_is_read_by_inspect_and_publish(s3, overrides, local_out, tmp_path, capsys):
    fs, url = s3["fs"], f"s3://{BUCKET}/one"
    # storage options in the manifest (credentials too): used, never written
    opts = json.dumps({"endpoint_url": s3["endpoint"], "key": FAKE_KEY_ID, "secret": FAKE_SECRET})
    stats = _build(url, overrides, [f"output.storage_options={opts}"])
    assert stats["shards"] == 3 and stats["last_run"]["shards_written"] == 3
    _assert_equals_local(fs, f"{BUCKET}/one", local_out)
    local_stats = json.loads((local_out / "stats.json").read_text())
    remote_stats = json.loads(fs.cat_file(f"{BUCKET}/one/stats.json"))
    for key in ("shards", "samples_in", "samples_out", "samples_rejected", "entities", "regions", "rates"):
        assert remote_stats[key] == local_stats[key], key
    top = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/one", refresh=True)}
    assert {"manifest.resolved.yaml", "stats.json", "README.md", "shards", "index", "done"} <= top
    assert ".lock" not in top   # released
    assert "storage_options" not in fs.cat_file(f"{BUCKET}/one/manifest.resolved.yaml").decode()
    _no_secret_anywhere(fs, f"{BUCKET}/one")

    capsys.readouterr()
    assert main(["inspect", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(local_out), "--json"]) == 0
    local_report = json.loads(capsys.readouterr().out)
    assert report["shards"] == {"complete": 3, "incomplete": []}   # verified with sha256 (inspect's default)
    assert report["overall"] == local_report["overall"]
    assert main(["publish", url, "--to", str(tmp_path / "dest"), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "shards/sample-000002.tar" in out.out + out.err
    assert not (tmp_path / "dest").exists()
    assert FAKE_SECRET not in out.out + out.err


def test_resume_redoes_only_the_shard_whose_object_is_gone(s3, overrides, local_out):
    fs, url, prefix = s3["fs"], f"s3://{BUCKET}/resume", f"{BUCKET}/resume"
    _build(url, overrides)
    first_done = fs.info(f"{prefix}/done/000000.json")["LastModified"]
    fs.rm_file(f"{prefix}/shards/sample-000001.tar")   # a lost upload of shard 1
    stats = _build(url, overrides)
    run = stats["last_run"]
    assert (run["shards_skipped"], run["shards_written"]) == (2, 1)
    assert run["shards_redone"] == {"missing": 1}
    fs.invalidate_cache()
    assert fs.info(f"{prefix}/done/000000.json")["LastModified"] == first_done   # kept, not rewritten
    _assert_equals_local(fs, prefix, local_out)
    assert stats["shards"] == 3
    # other settings are refused, as for a local folder
    with pytest.raises(ManifestError, match="other settings"):
        _build(url, overrides, ["adjudicate.min_det_score=0.5"])


def test_credentials_never_reach_an_error(s3, overrides, capsys):
    code = main(["build", str(SAMPLE), "--out", "s3://no-such-bucket-x/out", "--no-progress",
                 *[x for s in overrides for x in ("--set", s)],
                 "--set", f"output.storage_options={json.dumps({'key': FAKE_KEY_ID, 'secret': FAKE_SECRET})}"])
    err = capsys.readouterr().err
    assert code == 2 and "output.path s3://no-such-bucket-x/out" in err and "does not exist" in err
    assert FAKE_SECRET not in err and FAKE_KEY_ID not in err


def test_lock_object_refuses_a_live_build_and_takes_over_a_dead_ones(s3):
    from pipeline.store import LOCK, open_store, remote_lock

    store = open_store(f"s3://{BUCKET}/locked")
    with remote_lock(store):
        held = store.read_json(LOCK)
        assert held["pid"] == os.getpid()
        with pytest.raises(ManifestError, match="another build is running"):
            with remote_lock(store):
                pass
    assert not store.exists(LOCK)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.put_bytes(LOCK, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "x",
                                      "heartbeat": time.time()}).encode())
    with remote_lock(store):   # its owner is dead: taken over at once
        assert store.read_json(LOCK)["pid"] == os.getpid()


@pytest.mark.slow
def test_two_node_ray_cluster_killed_and_resumed_equals_local_build(s3, overrides, ray_cluster, tmp_path):  # noqa: F811
    """The loopback cluster of tests/test_cluster.py (two ``ray start`` nodes, 1 CPU each). Eight
    shards: the nodes' tasks already running when the driver is killed still finish and write their
    shard, and with four shards that was once all of them (nothing left to resume)."""
    fs, url, prefix = s3["fs"], f"s3://{BUCKET}/cluster", f"{BUCKET}/cluster"
    sets = [s for s in overrides if not s.startswith("runtime.executor")] + [
        "runtime.executor=ray", f"runtime.ray_address={ray_cluster}", "input.limit=16"]
    args = [sys.executable, "-m", "pipeline", "build", str(SAMPLE), "--out", url, "--no-progress",
            *[x for s in sets for x in ("--set", s)]]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if fs.exists(f"{prefix}/done") and fs.ls(f"{prefix}/done", refresh=True):
            break   # a shard is complete in the bucket: kill the driver mid-build
        fs.invalidate_cache()
        time.sleep(0.2)
    assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    kept = len(fs.ls(f"{prefix}/done", refresh=True))
    assert 1 <= kept < 8
    assert fs.exists(f"{prefix}/.lock")   # left by the killed driver: taken over (its pid is dead)
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    stats = json.loads(fs.cat_file(f"{prefix}/stats.json"))
    assert stats["last_run"]["executor"] == "ray"
    assert stats["last_run"]["shards_skipped"] >= kept
    assert stats["shards"] == 8
    local16 = tmp_path / "local16"
    _build(str(local16), overrides, ["input.limit=16"])
    _assert_equals_local(fs, prefix, local16, exact=False)
    _no_secret_anywhere(fs, prefix)
    assert FAKE_SECRET not in rerun.stderr.decode() + rerun.stdout.decode()


def test_redact_hides_environment_and_storage_option_secrets(monkeypatch):
    from pipeline.store import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    text = redact(f"denied for {FAKE_SECRET} and sk-opt-9f8e7d via http://minio:9000",
                  {"client_kwargs": {"aws_secret_access_key": "sk-opt-9f8e7d"}, "endpoint_url": "http://minio:9000"})
    assert FAKE_SECRET not in text and "sk-opt-9f8e7d" not in text
    assert "http://minio:9000" in text   # not a secret: kept, the message stays useful


def test_file_url_is_the_local_folder(tmp_path):
    manifest = load_manifest(SAMPLE, [], out=(tmp_path / "x").as_uri())
    assert manifest.output.path == str(tmp_path / "x")
    from pipeline.store import is_url

    assert is_url("s3://b/p") and is_url("gs://b/p") and not is_url(manifest.output.path)


def test_ray_workers_never_get_the_storage_options():
    from pipeline.runner import worker_manifest_json

    manifest = load_manifest(SAMPLE, [f"output.storage_options={json.dumps({'key': FAKE_KEY_ID, 'secret': FAKE_SECRET})}"],
                             out=f"s3://{BUCKET}/x")
    assert manifest.output.storage_options["secret"] == FAKE_SECRET
    sent = worker_manifest_json(manifest)
    assert FAKE_SECRET not in sent and FAKE_KEY_ID not in sent
    assert json.loads(sent)["output"]["path"] == f"s3://{BUCKET}/x"


def test_staging_folders_of_dead_builds_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """kill -9 skips TemporaryDirectory's cleanup: the next remote build removes the staging folders
    whose process is gone (the pid is in the name), never a live build's, never anything else."""
    from pipeline import remote_out

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"lookandlearn-staging-{dead.pid}-abc"
    live = tmp_path / f"lookandlearn-staging-{os.getpid()}-def"
    other = tmp_path / "lookandlearn-staging-notapid-ghi"
    for folder in (stale, live, other):
        (folder / "stats").mkdir(parents=True)
        (folder / "stats" / "x.json").write_text("{}")
    with remote_out.staging_folder() as staging:
        assert staging.name.startswith(f"lookandlearn-staging-{os.getpid()}-") and staging.is_dir()
        assert not stale.exists()
        assert live.is_dir() and other.is_dir()
    assert not staging.exists()
