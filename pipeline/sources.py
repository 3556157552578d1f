"""Sources: turn the manifest's ``input`` into work items (the images are read by ``stages/read.py``).

:func:`list_items` runs on the driver. It reads only the index of the input (JSONL lines, a LLaVA
JSON list, COCO caption annotations, or WebDataset tar *headers*) and returns one JSON-ready item
per sample, in input order, with its ``seq``, ``shard`` and key fixed before any work is done.
Nothing here decodes an image. Problems with one sample (a bad JSON line, an empty caption, a
duplicate id, an image path that resolves outside ``input.image_root``) become a ``precheck``
reason on that item so that the read stage (:class:`stages.read.ReadStage`) rejects it into
``rejected/``; only an unusable input as a whole (missing file, not JSON at all) raises
:class:`SourceError`. Text is cleaned as it is read (lone surrogates -> U+FFFD, NULs removed).
The readers of each format are :mod:`pipeline.source_formats`; cleaning, the text checks and
``source.meta`` (every extra field of the input, JSON-safe and bounded) :mod:`pipeline.source_text`.

Item shape (what :func:`list_items` returns, and what travels JSON-encoded in ``item``)::

    {"seq": 0, "shard": 0, "key": "sample-img001",
     "source": {"dataset": "sample", "id": "img001",
                "meta": {"url": "..."}},              # the input's extra fields ({} when none)
     "image_ref": {"path": "/abs/img.jpg",            # or {"tar", "member", "offset", "size"}
                   "root": "/real/image/root"}        # (absent with input.allow_outside_image_root)
     "text": {"caption": "..."}                        # or {"conversations": [...]} or {"captions": [...]}
     "precheck": None}                                 # or "reason: detail"
"""
from __future__ import annotations

from pipeline.source_formats import READERS, SourceError, _entry, img2dataset_rows  # noqa: F401 (re-exported)
from pipeline.source_text import (_check_caption, _check_conversations, _clean, _clean_fields,  # noqa: F401
                                  _clean_str, _text_and_check, _TooDeep, source_meta)
from stages.read import READ_REASONS
from stages.record import make_key, sanitize_key

# Reason prefixes (``prefix: detail``). Precheck reasons come from list_items, the rest from ReadStage.
REJECT_REASONS = (
    # list_items (precheck)
    "bad_json", "bad_item", "bad_tar", "missing_image", "missing_caption", "empty_caption",
    "caption_not_text", "bad_conversation", "no_assistant_turn", "duplicate_id", "outside_image_root",
) + tuple(r for r in READ_REASONS if r not in ("bad_item", "missing_image", "outside_image_root"))


def list_items(manifest) -> list[dict]:
    """One item per sample of ``manifest.input``, in deterministic input order, ``limit`` applied.

    Keys are ``make_key(input.dataset or name, source id)``; a repeated source id keeps the key
    for its first occurrence, later ones get ``precheck = "duplicate_id: <id>"`` and a key with
    a ``-dupN`` suffix so that every row stays distinct.
    """
    cfg = manifest.input
    dataset = cfg.dataset or manifest.name
    per_shard = manifest.output.samples_per_shard
    entries = READERS[cfg.format](cfg)

    items: list[dict] = []
    seen_ids: set = set()
    taken_keys: set[str] = set()
    for entry in entries:
        if cfg.limit is not None and len(items) >= cfg.limit:
            break
        key, precheck = _assign_key(dataset, entry, seen_ids, taken_keys)
        seq = len(items)
        source = {"dataset": dataset, "id": entry["id"], **entry.get("source_extra", {}),
                  "meta": entry.get("meta") or {}}
        items.append({"seq": seq, "shard": seq // per_shard, "key": key, "source": source,
                      "image_ref": entry["image_ref"], "text": entry["text"],
                      "precheck": entry["precheck"] or precheck})
    return items


def _assign_key(dataset: str, entry: dict, seen_ids: set, taken_keys: set) -> tuple[str, str | None]:
    """Deterministic unique key for an entry, and a ``duplicate_id`` precheck for repeats."""
    identity = entry["identity"]
    base = make_key(dataset, *entry["key_parts"])
    precheck = None
    if identity in seen_ids:
        extra = entry["key_parts"][1:]
        precheck = f"duplicate_id: {entry['id']}" + (f" (annotation {extra[0]})" if extra else "")
        key = _free_key(base, "dup", taken_keys)
    elif base in taken_keys:        # different ids that sanitize alike ("a.b" / "a-b"): disambiguate
        key = _free_key(base, "", taken_keys)
    else:
        key = base
    seen_ids.add(identity)
    taken_keys.add(key)
    return key, precheck


def _free_key(base: str, tag: str, taken: set[str]) -> str:
    n = 1
    while True:
        key = sanitize_key(f"{base[:100]}-{tag}{n}")
        if key not in taken:
            return key
        n += 1
