"""A build into object storage (``output.path: s3://bucket/prefix``; the store: ``pipeline/store.py``).

The Ray workers run the stages and hand their batches to the driver, as for a local folder; the
driver writes each complete shard with the very same :class:`~stages.write.ShardWriter` into a
local staging folder (temp file + rename, so the bytes equal a local build's) and then uploads its
files straight to the store, one whole object each, the completion record ``done/{n}.json`` LAST:
a shard whose upload was cut off has no record (or files that differ from it) and is redone by the
next run. The staging folder keeps only the small per-shard stats and logs for the run-level
files (stats.json, card, resolved manifest), which are uploaded at the end.

Resume reads the completion records and the object sizes from the store (:meth:`check`), as a local
build reads its folder; the settings fingerprint and the layout checks are the same.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipeline.manifest import ManifestError
from pipeline.outdir import BUILD_FILES
from pipeline.store import Store, open_store, pid_alive, remote_lock
from stages.record.shards import DONE, LAYOUT
from stages.write import ShardWriter

log = logging.getLogger("lookandlearn")
_KEEP_LOCAL = ("stats", "log", DONE)   # what the run-level files read; the rest is removed once uploaded


def check_is_build_store(store: Store) -> None:
    """Refuse a missing bucket, and a non-empty prefix that is not a Look&Learn build; touch nothing."""
    bucket = store.root.split("/", 1)[0]
    if not store.fs.exists(bucket):
        raise ManifestError(f"output.path {store.url}: the bucket {bucket!r} does not exist or these "
                            f"credentials cannot see it (AWS_* of the environment or output.storage_options)")
    entries = store.top_level()
    if not entries:
        return
    ours = {"manifest.resolved.yaml", ".lock"} | {folder for folder, _ in LAYOUT.values()}
    if not entries & ours:
        raise ManifestError(
            f"{store.url} is not empty and is not a Look&Learn build (no manifest.resolved.yaml, shards/ or "
            f"done/ in it); nothing was touched. Choose an empty or new output prefix.")


def clear_store_build(store: Store) -> None:
    """``--overwrite``: remove the build's own objects (completion records first), nothing else."""
    for folder in [DONE] + [folder for folder, _ in LAYOUT.values() if folder != DONE]:
        store.remove_tree(folder)
    for name in BUILD_FILES:
        store.remove(name)
    store.refresh()


def _rel(name: str, shard: int) -> dict[str, str]:
    return {kind: f"{folder}/{pattern.format(name=name, n=shard)}" for kind, (folder, pattern) in LAYOUT.items()}


class RemoteShardWriter(ShardWriter):
    """A :class:`ShardWriter` whose shards live in a :class:`Store`; ``staging`` is a local folder."""

    def __init__(self, store: Store, staging: Path, name: str, settings: dict | None = None):
        super().__init__(staging, name, settings)
        self.store = store
        self._sizes: dict[str, dict[str, int]] | None = None

    @property
    def location(self) -> str:
        return self.store.url

    def _listing(self) -> dict[str, dict[str, int]]:
        if self._sizes is None:
            self.store.refresh()
            self._sizes = {folder: self.store.sizes(folder) for folder, _ in LAYOUT.values()}
        return self._sizes

    def _size(self, rel: str) -> int | None:
        folder, _, name = rel.partition("/")
        return self._listing().get(folder, {}).get(name)

    def done_record(self, shard: int) -> dict | None:
        data = self.store.read_json(_rel(self.name, shard)[DONE])
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None

    def check(self, shard: int, hashes: bool = False) -> str | None:
        """None when the shard is complete in the store (record + sizes; ``hashes`` is not
        checked remotely: the record's sha256 is verified by inspect/publish on their copy)."""
        rel = _rel(self.name, shard)
        if self._size(rel[DONE]) is None:
            return "no_completion_record"
        done = self.done_record(shard)
        if done is None:
            return "no_completion_record"
        for kind, path in rel.items():
            if kind == DONE:
                continue
            want, got = done["files"].get(kind), self._size(path)
            if not want or got is None:
                return f"missing: {kind}"
            if got != want.get("size"):
                return f"size: {kind}"
        return None

    def has_files(self, shard: int) -> bool:
        return any(self._size(path) is not None for path in _rel(self.name, shard).values())

    def clear(self, shard: int) -> None:
        rel = _rel(self.name, shard)
        for kind in [DONE] + [k for k in rel if k != DONE]:   # the record first: never a record without its files
            if self._size(rel[kind]) is not None:
                self.store.remove(rel[kind])
                folder, _, name = rel[kind].partition("/")
                self._listing()[folder].pop(name, None)
        super().clear(shard)

    def write_shard(self, shard: int, rows: list[dict]) -> dict:
        stats = super().write_shard(shard, rows)   # into staging: the same bytes as a local build
        local, rel = self.paths(shard), _rel(self.name, shard)
        for kind in [k for k in LAYOUT if k != DONE] + [DONE]:   # the completion record last
            self.store.put_file(local[kind], rel[kind])
        for kind, path in local.items():
            if kind not in _KEEP_LOCAL:
                path.unlink(missing_ok=True)
        return stats


class RemoteOutput:
    """What ``pipeline.runner`` needs for a build into ``store``: the writer and the finish."""

    def __init__(self, store: Store, staging: Path):
        self.store, self.staging = store, Path(staging)

    def writer(self, name: str, settings: dict) -> RemoteShardWriter:
        return RemoteShardWriter(self.store, self.staging, name, settings)

    def finish(self, manifest, run: dict, extra: dict, version: str) -> dict:
        """stats.json, manifest.resolved.yaml and README.md from every complete shard in the store
        (the kept ones' stats and logs are fetched), written to staging, then uploaded."""
        from pipeline.stats import aggregate_stats, write_card, write_resolved_manifest

        self.store.refresh()
        complete = set()
        for name in self.store.sizes(DONE):
            stem = name.removesuffix(".json")
            if stem.isdigit():
                complete.add(int(stem))
        for shard in sorted(complete):
            rel = _rel(manifest.name, shard)
            for kind in ("stats", "log"):
                target = self.staging / rel[kind]
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.store.get_file(rel[kind], target)
        resolved = write_resolved_manifest(self.staging, manifest, extra)
        stats = aggregate_stats(self.staging, run, complete=complete)
        write_card(self.staging, manifest, stats, resolved, version, complete=complete)
        for name in ("manifest.resolved.yaml", "stats.json", "README.md"):
            self.store.put_file(self.staging / name, name)
        log.info("build written to %s (%d complete shards)", self.store.url, len(complete))
        return stats


_STAGING = "lookandlearn-staging-"


@contextlib.contextmanager
def staging_folder():
    """A fresh local staging folder named after this process (``lookandlearn-staging-{pid}-*``),
    removed on exit. A build killed with kill -9 never runs that cleanup, so this first removes the
    staging folders of processes that no longer exist (a live build's, or a reused pid's, are kept)."""
    pattern = re.compile(re.escape(_STAGING) + r"(\d+)-")
    for entry in Path(tempfile.gettempdir()).glob(_STAGING + "*"):
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not pid_alive(int(match.group(1))):
            log.info("removing the staging folder of a build that is gone: %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{_STAGING}{os.getpid()}-") as staging:
        yield Path(staging)


@contextlib.contextmanager
def remote_build(manifest, overwrite: bool, check_output_matches, check_models):
    """The checks of a local build, then the store's lock and a staging folder: yields the
    :class:`RemoteOutput` that ``pipeline.runner`` builds with (its checks are passed in)."""
    store = open_store(manifest.output.path, manifest.output.storage_options)
    check_is_build_store(store)
    if not overwrite:
        text = store.read_bytes("manifest.resolved.yaml")
        if text is not None:
            check_output_matches(store.url, manifest, text.decode())
    check_models(manifest)
    with remote_lock(store), staging_folder() as staging:
        if overwrite:
            clear_store_build(store)
        yield RemoteOutput(store, staging)
