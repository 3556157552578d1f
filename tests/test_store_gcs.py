"""`--out gs://...`: a build into Google Cloud Storage, against a GCS emulator on 127.0.0.1
(``gcp-storage-emulator``, in memory) through gcsfs: the build equals a local build, inspect reads
it, a rerun redoes only the shard whose object is gone."""
from __future__ import annotations

import json
import os

import pytest

# gcsfs >= 2026 asks GCS over gRPC what kind of bucket it is (60 s timeouts per call against an
# emulator that only speaks JSON over HTTP); real GCS answers. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

from pipeline.cli import main  # noqa: E402
from test_store_s3 import _assert_equals_local, _build, _free_port, local_out, overrides  # noqa: E402,F401

BUCKET = "gbuilds"


@pytest.fixture(scope="module")
def gcs():
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "token": "anon", "project": "test"}
    fs = gcsfs.GCSFileSystem(**options)
    fs.mkdir(BUCKET)
    yield {"fs": fs, "options": options}
    server.stop()


def test_build_into_gcs_equals_local_and_resumes_only_the_missing_shard(gcs, overrides, local_out, capsys):  # noqa: F811
    fs, url, prefix = gcs["fs"], f"gs://{BUCKET}/one", f"{BUCKET}/one"
    opts = f"output.storage_options={json.dumps(gcs['options'])}"
    stats = _build(url, overrides, [opts])
    assert stats["shards"] == 3 and stats["last_run"]["shards_written"] == 3
    _assert_equals_local(fs, prefix, local_out)

    fs.rm(f"{prefix}/shards/sample-000001.tar")
    stats = _build(url, overrides, [opts])
    assert stats["last_run"]["shards_written"] == 1 and stats["last_run"]["shards_skipped"] == 2
    _assert_equals_local(fs, prefix, local_out)

    capsys.readouterr()
    os.environ["STORAGE_EMULATOR_HOST"] = gcs["options"]["endpoint_url"]   # inspect has no storage options
    try:
        assert main(["inspect", url, "--json"]) == 0
    finally:
        del os.environ["STORAGE_EMULATOR_HOST"]
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == {"complete": 3, "incomplete": []}


def test_a_missing_gcs_bucket_is_a_clear_error(gcs, overrides, capsys):  # noqa: F811
    opts = f"output.storage_options={json.dumps(gcs['options'])}"
    from pipeline.manifest import ManifestError

    with pytest.raises(ManifestError, match="the bucket 'no-such-bucket' does not exist"):
        _build("gs://no-such-bucket/x", overrides, [opts])
