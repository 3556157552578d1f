"""The sample record: the schema every stage reads and writes (docs/schema.md).

Re-exported by :mod:`stages.record`; the shard files are :mod:`stages.record.shards`, the masks
:mod:`stages.record.rle`.

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
``times``    JSON ``{stage: seconds}`` this row spent in each stage (filled by the stage base)

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
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# 2: source.meta, entity turn -1 for a caption (was null), text.captions (input.coco_per_image),
#    provenance.schema; every build has one declared schema (stages/record/features.py).
SCHEMA_VERSION = 2
# ``turn`` of an entity found in ``text.caption`` (a single caption); otherwise the index into
# ``text.conversations`` or into ``text.captions``. Schema 1 records wrote null: readers take both.
CAPTION_TURN = -1


def _pipeline_version() -> str:
    """The package version (pyproject.toml is its one source): from the installed metadata, or
    from pyproject.toml itself when the tree runs uninstalled."""
    try:
        return metadata.version("look-and-learn")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        return found.group(1) if found else "unknown"


PIPELINE_VERSION = _pipeline_version()

ENTITY_STATUSES = ("grounded", "rejected", "ungrounded", "skipped")
# Stored image members ``{key}.{ext}`` (``ext`` column), in the order a reader prefers them.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Conversation speakers. Inputs write a turn's speaker as ``from`` (LLaVA) or ``role`` (OpenAI
# style), in any case; :func:`speaker` reads either. Only assistant turns describe the image:
# human turns are questions whose noun phrases may not even be in the picture (``parse.turns: all``
# parses them anyway, for what a question names; the judge rejects what is absent).
ASSISTANT_ROLES = ("gpt", "assistant")
KNOWN_ROLES = ("human", "user", "system") + ASSISTANT_ROLES
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
    source = dict(source)
    source.setdefault("meta", {})          # every record has one, {} when the input had no extra field
    return {
        "key": key,
        "source": source,
        "image": {"width": int(width), "height": int(height), "sha256": sha256},
        "text": dict(text),
        "entities": [],
        "regions": [],
        "provenance": {"schema": SCHEMA_VERSION, "pipeline": PIPELINE_VERSION},
    }


def is_caption_turn(turn: Any) -> bool:
    """Whether an entity's ``turn`` means the single caption (``-1``; ``None`` in schema 1)."""
    return turn is None or turn == CAPTION_TURN


def entity_text(record: dict, entity: dict) -> str:
    """The text an entity's offsets index into: the caption, one of the captions, or its
    conversation turn."""
    text = record["text"]
    turn = entity.get("turn")
    if is_caption_turn(turn):
        return text["caption"]
    if "captions" in text:
        return text["captions"][turn]
    return text["conversations"][turn]["value"]


PARSE_TURNS = ("assistant", "all")   # parse.turns: which conversation turns give entities


def texts_to_parse(record: dict, turns: str = "assistant") -> list[tuple[int, str]]:
    """``(turn, text)`` of every text of a record whose noun phrases become entities: the
    caption (turn -1), each of ``captions`` (its index), or the assistant turns of a conversation
    (``turns="all"``: its human turns too, system turns never). The ``<image>`` tag of a human
    turn is blanked with as many spaces, so that offsets still index the stored value and the
    tag is no phrase."""
    if turns not in PARSE_TURNS:
        raise ValueError(f"turns must be one of {PARSE_TURNS}, got {turns!r}")
    text = record.get("text") or {}
    caption = text.get("caption")
    if isinstance(caption, str) and caption.strip():
        return [(CAPTION_TURN, caption)]
    if isinstance(text.get("captions"), list):
        return [(i, c) for i, c in enumerate(text["captions"]) if isinstance(c, str)]
    conversations = text.get("conversations")
    if turns == "assistant" or not isinstance(conversations, list):
        return [(i, str(turn.get("value") or "")) for i, turn in assistant_turns(conversations)]
    asked = {"human", "user"} | set(ASSISTANT_ROLES)
    return [(i, str(turn.get("value") or "").replace("<image>", " " * len("<image>")))
            for i, turn in enumerate(conversations) if speaker(turn) in asked]


def is_accepted(region: dict) -> bool:
    """Whether the judge accepted the region (its ``verdict``)."""
    return bool((region.get("verdict") or {}).get("accept"))


def accepted_regions(record: dict, entity: dict) -> list[dict]:
    """The regions an entity lists (``entity["regions"]``) that the judge accepted, in that order."""
    regions = {r["id"]: r for r in record.get("regions", [])}
    listed = (regions.get(rid) for rid in entity.get("regions") or [])
    return [r for r in listed if r is not None and is_accepted(r)]


def speaker(turn: Any) -> str | None:
    """The speaker of a conversation turn, lower case (``from`` or ``role``); None when absent."""
    if not isinstance(turn, dict):
        return None
    role = turn.get("from", turn.get("role"))
    return role.lower() if isinstance(role, str) else None


def assistant_turns(conversations: Any) -> list[tuple[int, dict]]:
    """``(index, turn)`` of the assistant turns of a conversation (the turns whose text is parsed)."""
    if not isinstance(conversations, list):
        return []
    return [(i, turn) for i, turn in enumerate(conversations) if speaker(turn) in ASSISTANT_ROLES]


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
        accepted = [r for r in own if is_accepted(r)]
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
