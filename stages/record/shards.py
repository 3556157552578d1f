"""The shard format (docs/schema.md): file layout, writer, reader.

* Layout: shard ``n`` of dataset ``name`` is six files, :data:`LAYOUT` (:func:`output_paths` for
  the writer, :func:`shard_files` for inspect, the gallery and publish). The last one written is the
  completion record ``done/{n}.json``: the size and sha256 of each other file, and the settings
  fingerprint of the build. A shard is complete when its record exists and every file matches it
  (:func:`check_shard`: sizes always, sha256 with ``hashes=True``); anything else is incomplete.
* Writer: :func:`write_tar`, an uncompressed USTAR archive of ``{key}.{ext}`` image members and
  ``{key}.json`` records, byte for byte what ``tarfile`` writes (mtime 0, mode 0644, no owner).
* Reader: :func:`iter_samples` (``(key, {ext: bytes})``) and :func:`iter_records`
  (``(record, image_bytes, ext)``), built on the ``webdataset`` package's tar iterator, over the
  files that :func:`shard_paths` names.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from stages.record.schema import IMAGE_EXTS

RECORD_EXT = "json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# kind -> (folder, file name of shard ``n`` of dataset ``name``); the writer writes them in this order
LAYOUT = {
    "rejected": ("rejected", "{n:06d}.parquet"),
    "log": ("logs", "adjudication-{n:06d}.parquet"),
    "stats": ("stats", "{n:06d}.json"),
    "index": ("index", "{name}-{n:06d}.parquet"),
    "tar": ("shards", "{name}-{n:06d}.tar"),
    "done": ("done", "{n:06d}.json"),  # the completion record, written last
}
DONE = "done"
DONE_VERSION = 1
_SHARD_NUM = re.compile(r"(\d{6})$")


class NotAnOutputError(ValueError):
    """The folder is not a Look&Learn output folder (exit code 2)."""


# --- layout -----------------------------------------------------------------------------------

def output_paths(out: str | os.PathLike, name: str, shard: int) -> dict[str, Path]:
    """``{kind: path}`` of the files of one shard (see :data:`LAYOUT`)."""
    return {kind: Path(out) / folder / pattern.format(name=name, n=shard)
            for kind, (folder, pattern) in LAYOUT.items()}


def dataset_name(tar_path: str | os.PathLike) -> str:
    """The dataset name a shard file is named after (``{name}-000003.tar`` -> ``name``)."""
    return Path(tar_path).stem.rsplit("-", 1)[0]


def file_digest(path: str | os.PathLike) -> dict:
    """``{"size", "sha256"}`` of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def read_done(path: str | os.PathLike) -> dict | None:
    """A completion record, or None when it is missing or not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def check_shard(files: dict[str, Path], hashes: bool = False) -> str | None:
    """None when the shard whose ``{kind: path}`` are ``files`` is complete; else the reason
    (``no_completion_record``, ``missing: <kind>``, ``size: <kind>``, ``sha256: <kind>``)."""
    done = read_done(files[DONE]) if files.get(DONE) and Path(files[DONE]).exists() else None
    if done is None:
        return "no_completion_record"
    for kind in LAYOUT:
        if kind == DONE:
            continue
        want = done["files"].get(kind)
        path = files.get(kind)
        if not want or not path or not Path(path).is_file():
            return f"missing: {kind}"
        if os.path.getsize(path) != want.get("size"):
            return f"size: {kind}"
        if hashes and file_digest(path)["sha256"] != want.get("sha256"):
            return f"sha256: {kind}"
    return None


def shard_files(out: str | os.PathLike, verify: bool = True, hashes: bool = False
                ) -> tuple[dict[int, dict[str, Path]], list[int]]:
    """``({shard: {tar, index, log, stats, rejected, done}}, [incomplete shard numbers])`` of an
    output folder; temporary files of an interrupted write are not counted. With ``verify`` a shard
    is complete only when :func:`check_shard` passes (``hashes``: sha256 too, as inspect and
    publish do); a shard that fails it is listed as incomplete."""
    out = Path(out)
    if not (out / "shards").is_dir():
        raise NotAnOutputError(f"{out} is not a Look&Learn output folder (no shards/ in it)")
    found: dict[int, dict[str, Path]] = defaultdict(dict)
    for kind, (folder, pattern) in LAYOUT.items():
        for path in (out / folder).glob(re.sub(r"(\{name\}-)?\{n:06d\}", "*", pattern)) if (out / folder).is_dir() else ():
            match = _SHARD_NUM.search(path.stem)
            if match and not path.name.startswith("."):
                found[int(match.group(1))][kind] = path
    complete = {n: files for n, files in sorted(found.items()) if len(files) == len(LAYOUT)
                and (not verify or check_shard(files, hashes=hashes) is None)}
    return complete, sorted(n for n in found if n not in complete)


def shard_paths(spec: str | os.PathLike) -> list[Path]:
    """The tar files ``spec`` names: a tar, a folder of tars, a build output folder (its ``shards/``),
    a brace pattern (``shard-{000..009}.tar``) or a glob. FileNotFoundError when there are none."""
    spec = str(spec)
    if "{" in spec:
        from braceexpand import braceexpand

        paths = [Path(p) for p in braceexpand(spec)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} tar file(s) of {spec!r} do not exist (first: {missing[0]!r})")
        return paths
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"no tar files match {spec!r}")
        return paths
    path = Path(spec)
    if path.is_dir():
        folder = path / "shards" if (path / "shards").is_dir() else path
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"folder {str(folder)!r} has no .tar files")
        return paths
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r} does not exist")
    return [path]


# --- writer -----------------------------------------------------------------------------------

def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0  # reproducible shards: same inputs, same bytes
    info.mode = 0o644
    return info


_HEADER_TEMPLATE: bytes | None = None


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header ``tarfile`` writes for a regular file (mode 0644, mtime 0, no
    owner), built from a template: ``tarfile``'s own header code costs more than the data copy."""
    global _HEADER_TEMPLATE
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:  # prefix split / big sizes: let tarfile do it
        return _member_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    if _HEADER_TEMPLATE is None:
        _HEADER_TEMPLATE = _member_info("x", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    buf = bytearray(_HEADER_TEMPLATE)
    buf[0:100] = raw.ljust(100, b"\0")
    buf[124:136] = b"%011o\0" % size
    buf[148:156] = b"        "
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


def write_tar(path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``(name, bytes)`` members as an uncompressed USTAR archive to ``path`` (or a binary
    file object), byte for byte what ``tarfile.open(path, "w", format=USTAR_FORMAT)`` +
    ``addfile`` writes (tests/test_write_tar.py)."""
    if not isinstance(path, (str, os.PathLike)):
        return _write_members(path, members)
    with open(path, "wb", buffering=1 << 20) as fh:
        _write_members(fh, members)


def _write_members(fh, members: Iterable[tuple[str, bytes]]) -> None:
    block, record = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
    offset = 0
    for name, data in members:
        fh.write(_ustar_header(name, len(data)))
        fh.write(data)
        pad = -len(data) % block
        if pad:
            fh.write(b"\0" * pad)
        offset += block + len(data) + pad
    offset += 2 * block
    fh.write(b"\0" * (2 * block + (-offset % record)))


def sample_members(key: str, ext: str, image: bytes, record_json: str | bytes) -> Iterator[tuple[str, bytes]]:
    """The tar members of one sample, in shard order: ``{key}.{ext}`` then ``{key}.json``."""
    yield f"{key}.{ext}", bytes(image)
    yield f"{key}.{RECORD_EXT}", record_json if isinstance(record_json, bytes) else record_json.encode("utf-8")


# --- reader -----------------------------------------------------------------------------------

def _as_paths(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def iter_samples(paths, images: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of the tars (a path or a list), in shard order, by
    the ``webdataset`` package's tar iterator. ``images=False`` skips the image members."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    select = None if images else (lambda name: name.rpartition(".")[2].lower() not in IMAGE_EXTS)
    for path in _as_paths(paths):
        with open(path, "rb") as fh:
            files = tar_file_expander([{"url": str(path), "stream": fh}], select_files=select)
            for sample in group_by_keys(files):
                key = sample.pop("__key__")
                yield key, {ext: data for ext, data in sample.items() if not ext.startswith("__")}


def iter_records(paths, images: bool = False) -> Iterator[tuple[dict, bytes | None, str | None]]:
    """``(record, image_bytes, ext)`` for each sample of the tars (a path or a list), in shard
    order; ``image_bytes`` and ``ext`` are None without ``images`` (the image members are skipped)
    and for a sample that has no image member. A sample without a record is an error."""
    for key, parts in iter_samples(paths, images=images):
        if RECORD_EXT not in parts:
            raise ValueError(f"sample {key}: no .{RECORD_EXT} record member (has: {', '.join(sorted(parts))})")
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        yield json.loads(parts[RECORD_EXT]), parts.get(ext) if ext else None, ext
