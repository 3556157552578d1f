"""write: one shard at a time, in the output layout of docs/schema.md.

A shard is written as: rejected/ → logs/ → stats/ → index/ → shards/*.tar → done/*.json, each
file under a temporary name in its own folder and renamed when whole. The completion record
``done/{n}.json`` comes last: the size and sha256 of each other file, and the build's settings
(``fingerprint`` + the readable ``settings``). :meth:`ShardWriter.check` says why a shard is not
complete (no record, a missing file, a size or hash that differs), and a rerun redoes it.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.judges.stats import shard_judge_stats
from stages.record import ROW_OK, check_record, loads
from stages.record.shards import DONE, DONE_VERSION, LAYOUT, check_shard, file_digest, output_paths, read_done, sample_members, write_tar

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("n_entities", pa.int32()),
    ("n_grounded", pa.int32()), ("status", pa.string()), ("reasons", pa.list_(pa.string())),
    # the source: dataset name, source id, and source.meta as JSON text (its fields differ per input)
    ("dataset", pa.string()), ("source_id", pa.string()), ("meta", pa.string()),
])
LOG_SCHEMA = pa.schema([
    ("shard", pa.int32()), ("key", pa.string()), ("entity", pa.int32()), ("phrase", pa.string()),
    ("root", pa.string()), ("region", pa.int32()), ("det_score", pa.float32()),
    ("mask_score", pa.float32()), ("inputs", pa.string()), ("raw", pa.string()),
    ("accept", pa.bool_()), ("reason", pa.string()), ("model", pa.string()),
    ("prompt", pa.string()), ("latency_ms", pa.float32()), ("tokens", pa.int32()),
    ("error", pa.string()),
    # who decided (rules | llm | fallback_rules | fallback_reject), and the LLM judge's cache key
    # (model, prompt_hash, input_hash) and request numbers (see stages/judges/)
    ("decided_by", pa.string()), ("cached", pa.bool_()), ("prompt_hash", pa.string()),
    ("input_hash", pa.string()), ("attempts", pa.int32()), ("attempt_errors", pa.string()),
    ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()), ("visual", pa.bool_()),
])
REJECTED_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("key", pa.string()), ("reason", pa.string()), ("item", pa.string()),
])


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename: readers never see half a file. On any
    failure (a full disk, Ctrl-C) the temp file is removed; an ``OSError`` names the file."""
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and str(path) not in str(exc):
            if exc.errno is None:  # e.g. pyarrow's own IO errors
                raise OSError(f"{exc} (writing {path})") from exc
            raise OSError(exc.errno, f"{exc.strerror or exc} (writing {path})") from exc
        raise


class ShardWriter:
    def __init__(self, out_dir: str | os.PathLike, name: str, settings: dict | None = None):
        """``settings``: ``{"fingerprint": str, "settings": dict}`` stored in each completion record."""
        self.out = Path(out_dir)
        self.name = name
        self.settings = settings or {"fingerprint": None, "settings": {}}
        for folder, _ in LAYOUT.values():
            (self.out / folder).mkdir(parents=True, exist_ok=True)
        self.remove_temp_files()

    def remove_temp_files(self) -> None:
        """Remove the temp files an earlier killed run left (beside complete shards too)."""
        for folder, _ in LAYOUT.values():
            for tmp in (self.out / folder).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    @property
    def location(self) -> str:
        """Where the shards are, for messages (a URL for a build into object storage)."""
        return str(self.out)

    def paths(self, shard: int) -> dict[str, Path]:
        return output_paths(self.out, self.name, shard)

    def has_files(self, shard: int) -> bool:
        """Whether any file of the shard exists (complete or not)."""
        return any(p.exists() for p in self.paths(shard).values())

    def check(self, shard: int, hashes: bool = False) -> str | None:
        """None when the shard is complete, else why not (see ``check_shard``)."""
        return check_shard(self.paths(shard), hashes=hashes)

    def is_complete(self, shard: int, hashes: bool = False) -> bool:
        return self.check(shard, hashes=hashes) is None

    def done_record(self, shard: int) -> dict | None:
        return read_done(self.paths(shard)[DONE])

    def clear(self, shard: int) -> None:
        """Remove what an interrupted run left of a shard (complete files and temp files)."""
        for path in self.paths(shard).values():
            for p in (path, _temp_name(path)):
                if p.exists():
                    p.unlink()

    def write_shard(self, shard: int, rows: list[dict]) -> dict:
        """Write one shard from its rows (dicts with the batch columns), in ``seq`` order."""
        rows = sorted(rows, key=lambda r: r["seq"])
        paths = self.paths(shard)
        shard_file = paths["tar"].name
        ok = [r for r in rows if r["status"] == ROW_OK]
        rejected = [r for r in rows if r["status"] != ROW_OK]

        records = []
        for row in ok:
            record = loads(row["record"])
            problems = check_record(record)
            if problems:
                # A stage bug must not produce a silently broken sample.
                raise ValueError(f"sample {record['key']} breaks the schema: {problems}")
            records.append(record)

        rej_table = pa.table({
            "seq": [int(r["seq"]) for r in rejected],
            "key": [str(r["key"]) for r in rejected],
            "reason": [str(r["reason"]) for r in rejected],
            "item": [str(r.get("item") or "") for r in rejected],
        }, schema=REJECTED_SCHEMA)
        _atomic_write(paths["rejected"], lambda p: pq.write_table(rej_table, p))

        log_rows = []
        for row in ok:
            for entry in json.loads(row.get("log") or "[]"):
                log_rows.append({"shard": shard, **entry})
        log_table = pa.Table.from_pylist(log_rows, schema=LOG_SCHEMA) if log_rows else LOG_SCHEMA.empty_table()
        _atomic_write(paths["log"], lambda p: pq.write_table(log_table, p))

        stats = shard_stats(shard, rows, records, log_rows)
        _atomic_write(paths["stats"], lambda p: p.write_text(json.dumps(stats, indent=1, sort_keys=True)))

        index_rows = []
        for record in records:
            n_grounded = sum(e["status"] == "grounded" for e in record["entities"])
            reasons = sorted({(e.get("reason") or "").split(":")[0] for e in record["entities"]} - {""})
            source = record.get("source") or {}
            index_rows.append({
                "key": record["key"], "shard": shard_file, "n_entities": len(record["entities"]),
                "n_grounded": n_grounded, "status": "grounded" if n_grounded else "not_grounded",
                "reasons": reasons, "dataset": str(source.get("dataset", "")), "source_id": str(source.get("id", "")),
                "meta": json.dumps(source.get("meta") or {}, ensure_ascii=False, sort_keys=True),
            })
        index_table = pa.Table.from_pylist(index_rows, schema=INDEX_SCHEMA) if index_rows else INDEX_SCHEMA.empty_table()
        _atomic_write(paths["index"], lambda p: pq.write_table(index_table, p))

        def members():
            for row, record in zip(ok, records):
                # the record column already is the sample's JSON (checked above): stored as is
                yield from sample_members(record["key"], row["ext"], row["image"], row["record"])

        _atomic_write(paths["tar"], lambda path: write_tar(path, members()))
        done = {"version": DONE_VERSION, "shard": shard, **self.settings,
                "files": {kind: {"path": f"{LAYOUT[kind][0]}/{path.name}", **file_digest(path)}
                          for kind, path in paths.items() if kind != DONE}}
        _atomic_write(paths[DONE], lambda p: p.write_text(json.dumps(done, indent=1, sort_keys=True)))
        return stats


def shard_stats(shard: int, rows: list[dict], records: list[dict], log_rows: list[dict]) -> dict:
    """Counts for one shard; stats.json is the sum over shards (see pipeline/stats.py)."""
    entity_status = Counter(e["status"] for r in records for e in r["entities"])
    skip_reasons = Counter((e.get("reason") or "").split(":")[0]
                           for r in records for e in r["entities"] if e["status"] == "skipped")
    rejected_reasons = Counter(str(r["reason"]).split(":")[0] for r in rows if r["status"] != ROW_OK)
    verdict_reasons = Counter(l["reason"].split(":")[0] for l in log_rows)
    stage_seconds: Counter = Counter()
    for r in rows:
        for stage, seconds in json.loads(r.get("times") or "{}").items():
            stage_seconds[stage] += seconds
    return {
        "shard": shard,
        "samples_in": len(rows),
        "samples_out": len(records),
        "samples_rejected": len(rows) - len(records),
        "rejected_by_reason": dict(rejected_reasons),
        "samples_with_grounding": sum(any(e["status"] == "grounded" for e in r["entities"]) for r in records),
        "entities": sum(entity_status.values()),
        "entities_by_status": dict(entity_status),
        "skipped_by_reason": dict(skip_reasons),
        "regions": len(log_rows),
        "regions_accepted": sum(1 for l in log_rows if l["accept"]),
        "verdicts_by_reason": dict(verdict_reasons),
        "stage_seconds": {k: round(v, 4) for k, v in stage_seconds.items()},
        "judge": shard_judge_stats(log_rows),
    }
