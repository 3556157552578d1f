"""The build's output folder: what it may be, who holds it, and what its shards were made with.

* :func:`check_is_build_folder`: a non-empty folder that is not a Look&Learn build is refused.
* :func:`lock`: ``OUT/.lock`` held with ``fcntl.flock`` for the whole build; a second build into
  the same folder is refused; a lock left by a killed process does not block (the kernel drops it).
* :func:`settings_of`: the settings that shape shards and their fingerprint (stored in each
  shard's completion record); :func:`check_fingerprints` refuses a rerun with other settings.
* :func:`clear_build`: ``--overwrite`` removes the build's own files, nothing else.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.manifest import Manifest, ManifestError, manifest_to_dict
from stages.record.shards import LAYOUT

# Settings that do not change what a shard holds: left out of the fingerprint (README "Resume").
NOT_SHAPING = {
    "runtime": None,  # the whole section: executor, workers, device, dtype, batch sizes, seed
    "output": ("path", "storage_options"),
    "card": None,     # license, homepage, citation: only the dataset card says them
    "adjudicate": ("base_url", "api_key_env", "concurrency", "workers", "batch_size", "timeout_s",
                   "max_retries", "backoff_s", "max_backoff_s", "max_retry_after_s",
                   "requests_per_minute", "tokens_per_minute", "cache_from"),
}
BUILD_FILES = ("manifest.resolved.yaml", "README.md", "stats.json", "gallery.html")


def check_is_build_folder(out: Path) -> None:
    """Refuse a non-empty ``out`` that is not a Look&Learn build; touch nothing in it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ManifestError(f"output.path {out} is a file, not a folder")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    ours = {"manifest.resolved.yaml", ".lock"} | {folder for folder, _ in LAYOUT.values()}
    if not entries & ours:
        raise ManifestError(
            f"{out} is not empty and is not a Look&Learn build (no manifest.resolved.yaml, shards/ or "
            f"done/ in it); nothing was touched. Choose an empty or new output folder.")


@contextlib.contextmanager
def lock(out: Path):
    """Hold ``out/.lock`` (flock, exclusive) for the block; ManifestError if another build holds it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ManifestError(f"another build is running into {out} (it holds {out / '.lock'}); "
                                f"wait for it or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def settings_of(manifest: Manifest, resolved_extra: dict) -> dict:
    """``{"fingerprint": sha256 hex, "settings": {dotted.field: value}}`` of what shapes shards:
    the manifest without :data:`NOT_SHAPING`, plus ``resolved_extra`` (model revisions, judge
    prompt hash, pipeline version)."""
    data = manifest_to_dict(manifest)
    for section, fields in NOT_SHAPING.items():
        if fields is None:
            data.pop(section, None)
        else:
            for field in fields:
                data.get(section, {}).pop(field, None)
    flat: dict = {}

    def walk(prefix, node):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", data)
    for k, v in sorted(resolved_extra.items()):
        flat[f"resolved.{k}"] = v
    text = json.dumps(flat, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), "settings": flat}


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]


def check_fingerprints(out: Path, records: dict[int, dict], current: dict) -> None:
    """Refuse (ManifestError) when a complete shard's record was made with other settings."""
    for shard, record in sorted(records.items()):
        if record.get("fingerprint") != current["fingerprint"]:
            diff = differences(record.get("settings") or {}, current["settings"])
            raise ManifestError(
                f"{out} holds shards built with other settings (shard {shard}):\n  "
                + "\n  ".join(diff[:20] or ["(fingerprint differs)"])
                + f"\nRerun with --overwrite (make OVERWRITE=1) to rebuild {out} from scratch, "
                  f"or choose another output folder.")


def clear_build(out: Path) -> None:
    """Remove the build's own files (layout folders and top-level files); nothing else."""
    for folder in {folder for folder, _ in LAYOUT.values()}:
        shutil.rmtree(out / folder, ignore_errors=True)
    for name in BUILD_FILES:
        (out / name).unlink(missing_ok=True)
