"""The sample record: the schema every stage reads and writes (DESIGN.md, "Sample in a shard").

A record is a JSON-ready dict. Between stages it travels as a JSON string in the ``record``
column of a columnar batch so that Arrow never has to infer a schema for the ragged
entities/regions lists. The other columns are:

``key``      sample key (no dots, no ``/``)
``shard``    shard number the sample belongs to (fixed before any work, from input order)
``seq``      position of the sample in the input (global, 0-based)
``status``   ``ok`` or ``rejected`` (a rejected row carries ``reason`` and is written to rejected/)
``reason``   rejection reason ('' when ok)
``image``    stored image bytes (source bytes unless re-encoding was needed)
``ext``      stored image extension: jpg | png | webp
``pixels``   decoded RGB uint8 array (H, W, 3); dropped before writing
``record``   the sample record as JSON text
``item``     the source item as JSON text (what the reader was given; kept for rejected/)
``log``      JSON list of adjudication log rows for this sample (filled by adjudicate)
``times``    JSON ``{stage: seconds}`` this row spent in each stage (filled by the runner)

Stage conventions
-----------------
* Rows whose ``status`` is ``rejected`` pass through every later stage untouched.
* A stage that must drop a sample sets ``status='rejected'`` and ``reason='<short_snake_case>: detail'``
  instead of removing the row: the writer puts it in ``rejected/`` (nothing is lost silently).
* parse fills ``record['entities']``; each entity is
  ``{"id", "phrase", "start", "end", "turn", "root", "plural", "status", "regions", "reason",
  "expression"}`` where ``status`` is ``None`` (a candidate for grounding) or ``"skipped"``
  (``reason`` says why), and ``expression`` is the GRIT-style referring expression
  ``{"start", "end", "text"}`` that contains the phrase.
* ground appends ``record['regions']`` ``{"id", "entity", "box_xyxy", "det_score"}`` for candidate
  entities; segment adds ``mask_rle``, ``mask_score``, ``area``; adjudicate adds ``verdict`` and
  sets every entity's final ``status``/``regions``/``reason``.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable

import numpy as np

SCHEMA_VERSION = 1
PIPELINE_VERSION = "0.1.0"

ENTITY_STATUSES = ("grounded", "rejected", "ungrounded", "skipped")
ROW_OK = "ok"
ROW_REJECTED = "rejected"

BATCH_COLUMNS = ("key", "shard", "seq", "status", "reason", "image", "ext", "pixels", "record", "item", "log", "times")

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


# Tar member names are "{key}.{ext}" and USTAR stores at most 100 bytes of a name without a
# "/" to split on: 90 characters leave room for ".json" / ".webp".
MAX_KEY_LEN = 90


def sanitize_key(text: str, max_len: int = MAX_KEY_LEN) -> str:
    """Make a WebDataset-safe key: letters, digits, ``_`` and ``-`` only (no dots, no ``/``).
    A longer key is cut and ends in a hash of the whole, so distinct long ids stay distinct."""
    key = _KEY_BAD.sub("-", str(text)).strip("-")
    if not key:
        raise ValueError(f"cannot derive a key from {text!r}")
    if len(key) > max_len:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        key = f"{key[:max_len - 9].rstrip('-')}-{digest}"
    return key


def make_key(dataset: str, source_id: str, suffix: str | int | None = None) -> str:
    """Deterministic key from the source dataset name and source id (plus an optional suffix,
    e.g. the caption index for COCO where one image has five captions)."""
    parts = [dataset, str(source_id)] + ([] if suffix is None else [str(suffix)])
    return sanitize_key("-".join(parts))


def new_record(key: str, source: dict, width: int, height: int, sha256: str, text: dict) -> dict:
    return {
        "key": key,
        "source": dict(source),
        "image": {"width": int(width), "height": int(height), "sha256": sha256},
        "text": dict(text),
        "entities": [],
        "regions": [],
        "provenance": {"pipeline": PIPELINE_VERSION},
    }


def entity_text(record: dict, entity: dict) -> str:
    """The text an entity's offsets index into: the caption or its conversation turn."""
    text = record["text"]
    if entity.get("turn") is None:
        return text["caption"]
    return text["conversations"][entity["turn"]]["value"]


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def loads(text: str) -> dict:
    return json.loads(text)


# --- columnar batches -------------------------------------------------------------------

def batch_len(batch: dict) -> int:
    for value in batch.values():
        return len(value)
    return 0


def rows(batch: dict) -> list[dict]:
    """Columnar batch -> list of row dicts (numpy scalars turned into Python values)."""
    n = batch_len(batch)
    out = []
    for i in range(n):
        row = {}
        for name, col in batch.items():
            value = col[i]
            if isinstance(value, np.generic):
                value = value.item()
            row[name] = value
        out.append(row)
    return out


def columns(row_list: Iterable[dict], names: Iterable[str] | None = None) -> dict[str, list[Any]]:
    """List of row dicts -> columnar batch (dict of lists)."""
    row_list = list(row_list)
    if names is None:
        names = list(row_list[0].keys()) if row_list else []
    return {name: [row.get(name) for row in row_list] for name in names}


# --- checks used by the writer and by tests ----------------------------------------------

def check_record(record: dict) -> list[str]:
    """Schema problems of a finished record (empty list when it is valid)."""
    problems: list[str] = []
    key = record.get("key", "")
    if not key or "." in key or "/" in key:
        problems.append(f"bad key {key!r}")
    width, height = record["image"]["width"], record["image"]["height"]
    region_ids = {r["id"] for r in record["regions"]}
    for ent in record["entities"]:
        text = entity_text(record, ent)
        if text[ent["start"]:ent["end"]] != ent["phrase"]:
            problems.append(f"entity {ent['id']}: offsets do not match phrase {ent['phrase']!r}")
        if ent["status"] not in ENTITY_STATUSES:
            problems.append(f"entity {ent['id']}: unknown status {ent['status']!r}")
        own = [r for r in record["regions"] if r["entity"] == ent["id"]]
        accepted = [r for r in own if (r.get("verdict") or {}).get("accept")]
        if set(ent.get("regions", [])) != {r["id"] for r in accepted}:
            problems.append(f"entity {ent['id']}: regions list != accepted regions")
        expected = ("skipped" if ent["status"] == "skipped" else
                    "grounded" if accepted else "rejected" if own else "ungrounded")
        if ent["status"] != expected:
            problems.append(f"entity {ent['id']}: status {ent['status']} but expected {expected}")
        if not set(ent.get("regions", [])) <= region_ids:
            problems.append(f"entity {ent['id']}: unknown region ids")
    for reg in record["regions"]:
        x0, y0, x1, y1 = reg["box_xyxy"]
        if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            problems.append(f"region {reg['id']}: box {reg['box_xyxy']} outside {width}x{height}")
        rle = reg.get("mask_rle")
        if rle is not None and list(rle["size"]) != [height, width]:
            problems.append(f"region {reg['id']}: mask size {rle['size']} != [{height}, {width}]")
    return problems
