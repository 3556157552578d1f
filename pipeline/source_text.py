"""Text of the input as the source readers take it: cleaning, the caption/conversation checks,
and ``source.meta`` (every extra field of an input, made JSON-safe and bounded).

Used by :mod:`pipeline.source_formats` (the readers) and re-exported by :mod:`pipeline.sources`.
"""
from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
import re
from typing import Any, Iterable, Mapping

from stages.record import ASSISTANT_ROLES, KNOWN_ROLES, speaker

_MAX_TEXT_DEPTH = 100                                 # deeper id/caption/conversations nesting is bad_json
_BAD_CHARS = re.compile("[\ud800-\udfff\x00]")       # lone surrogates (a JSON "\\ud800") and NULs

# source.meta bounds (README "Output", docs/schema.md)
MAX_META_BYTES = 16 * 1024       # compact UTF-8 JSON of the whole meta object
MAX_META_STRING = 4096           # a longer string value is cut and ends in "…"
MAX_META_KEY = 128               # a longer field name is cut
MAX_META_DEPTH = 8               # a value nested deeper is left out
META_DROPPED = "_dropped"        # names of the fields left out (not JSON, too deep, over the size cap)


class _TooDeep(ValueError):
    """Text fields nested deeper than _MAX_TEXT_DEPTH (a bad_json line, not a crash later)."""


def _clean(value: Any, depth: int = 0) -> Any:
    """Strings made safe to encode: lone surrogates become U+FFFD, NULs are removed; lists and
    dicts are walked (deeper than _MAX_TEXT_DEPTH raises _TooDeep). Ordinary text is unchanged."""
    if isinstance(value, str):
        if _BAD_CHARS.search(value) is None:
            return value
        return _BAD_CHARS.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)
    if depth >= _MAX_TEXT_DEPTH and isinstance(value, (list, dict)):
        raise _TooDeep(f"nested deeper than {_MAX_TEXT_DEPTH} levels")
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_clean(k, depth + 1): _clean(v, depth + 1) for k, v in value.items()}
    return value


def _clean_str(value: Any) -> Any:
    return _clean(value) if isinstance(value, str) else value


def _clean_fields(obj: dict, names: tuple = ("id", "image", "caption", "conversations")) -> dict:
    """``obj`` with the fields an item carries cleaned (:func:`_clean`); may raise _TooDeep."""
    return {**obj, **{name: _clean(obj[name]) for name in names if name in obj}}


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep to parse"
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _check_caption(caption: Any) -> str | None:
    if caption is None:
        return "missing_caption: no caption in the item"
    if not isinstance(caption, str):
        return f"caption_not_text: caption is a {type(caption).__name__}"
    if not caption.strip():
        return "empty_caption: caption is empty or whitespace"
    return None


def _check_conversations(conv: Any) -> str | None:
    if conv is None:
        return "missing_caption: no conversations in the item"
    if not isinstance(conv, list) or not conv:
        return "bad_conversation: conversations must be a non-empty list of turns"
    has_assistant = False
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return f"bad_conversation: turn {i} is not an object"
        role, value = speaker(turn), turn.get("value")
        if role not in KNOWN_ROLES:
            return f"bad_conversation: turn {i} has unknown speaker {turn.get('from', turn.get('role'))!r}"
        if not isinstance(value, str):
            return f"bad_conversation: turn {i} value is a {type(value).__name__}, not text"
        if role in ASSISTANT_ROLES and value.strip():
            has_assistant = True
    if not has_assistant:
        return "no_assistant_turn: no non-empty gpt/assistant turn"
    return None


def _text_and_check(obj: dict) -> tuple[dict, str | None]:
    """The item text (caption or conversations) from a JSON object, and its precheck."""
    if "conversations" in obj:
        conv = obj["conversations"]
        return {"conversations": conv}, _check_conversations(conv)
    caption = obj.get("caption")
    return {"caption": caption}, _check_caption(caption)


# --- source.meta -------------------------------------------------------------------------

class _NotJson(ValueError):
    """A value that has no faithful JSON form (bytes, an object) or is nested too deep."""


def _meta_value(value: Any, depth: int = 0) -> Any:
    """A JSON value for ``value``: strings cleaned and cut, NaN/inf -> None, dates as ISO text,
    numpy/Arrow scalars as Python values; raises _NotJson for anything else."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        value = _clean(value)
        return value if len(value) <= MAX_META_STRING else value[:MAX_META_STRING - 1] + "\u2026"
    if isinstance(value, decimal.Decimal):
        return _meta_value(float(value), depth)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if depth >= MAX_META_DEPTH:
        raise _NotJson(f"nested deeper than {MAX_META_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        return [_meta_value(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {_meta_key(k): _meta_value(v, depth + 1) for k, v in value.items()}
    item = getattr(value, "item", None)          # numpy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        return _meta_value(item(), depth)
    tolist = getattr(value, "tolist", None)      # numpy arrays
    if callable(tolist):
        return _meta_value(tolist(), depth)
    raise _NotJson(f"a {type(value).__name__} is not JSON")


def _meta_key(name: Any) -> str:
    key = _clean(str(name))
    return key if len(key) <= MAX_META_KEY else key[:MAX_META_KEY]


def _json_size(key: str, value: Any) -> int:
    return len(json.dumps({key: value}, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def source_meta(fields: Mapping | Iterable[tuple[Any, Any]] | None, exclude: Iterable[str] = ()) -> dict:
    """``source.meta`` from an input's extra fields (the ones not in ``exclude``), in input order.

    Values become JSON (see :func:`_meta_value`); a field without a JSON form, nested deeper
    than :data:`MAX_META_DEPTH`, or that would take the object past :data:`MAX_META_BYTES` is
    left out and its name listed under :data:`META_DROPPED`. Never raises on data.
    """
    if fields is None:
        return {}
    pairs = fields.items() if isinstance(fields, Mapping) else fields
    skip = set(exclude)
    meta: dict = {}
    dropped: list[str] = []
    size = 2                                            # "{}"
    for name, value in pairs:
        if name in skip:
            continue
        key = _meta_key(name)
        try:
            value = _meta_value(value)
            cost = _json_size(key, value)
        except (_NotJson, RecursionError, TypeError, ValueError):
            dropped.append(key)
            continue
        if size + cost > MAX_META_BYTES or key == META_DROPPED:
            dropped.append(key)
            continue
        meta[key] = value
        size += cost
    if dropped:
        names: list[str] = []
        for name in dropped:                            # the list of names is bounded too
            if size + _json_size(META_DROPPED, names + [name]) > MAX_META_BYTES + 1024:
                break
            names.append(name)
        meta[META_DROPPED] = names
    return meta
