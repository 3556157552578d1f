"""The fast shard tar writer (stages/record/shards.py) writes exactly what tarfile writes."""
from __future__ import annotations

import io
import tarfile

import pytest

from stages.record.shards import write_tar


@pytest.mark.parametrize("members", [
    [],
    [("a.jpg", b"\xff\xd8" + b"x" * 1000), ("a.json", b'{"key":"a"}')],
    [("k" * 95 + ".json", b"{}"), ("dir/" * 20 + "q.png", b"p" * 512), ("empty.txt", b""),
     ("\u00e9t\u00e9-1.json", "caf\u00e9".encode()), ("big.jpg", bytes(range(256)) * 4000)],
])
def test_fast_tar_is_byte_identical_to_tarfile(tmp_path, members):
    want = tmp_path / "want.tar"
    with tarfile.open(want, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible: mtime 0, no owner
            tar.addfile(info, io.BytesIO(data))
    got = tmp_path / "got.tar"
    write_tar(got, iter(members))
    assert got.read_bytes() == want.read_bytes()
    buf = io.BytesIO()  # a binary file object works too (devkit builds sample input tars in memory)
    write_tar(buf, iter(members))
    assert buf.getvalue() == want.read_bytes()
    with tarfile.open(got) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
