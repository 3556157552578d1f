"""Sources: turn the manifest's ``input`` into work items (the images are read by ``stages/read.py``).

:func:`list_items` runs on the driver. It reads only the index of the input (JSONL lines, a LLaVA
JSON list, COCO caption annotations, or WebDataset tar *headers*) and returns one JSON-ready item
per sample, in input order, with its ``seq``, ``shard`` and key fixed before any work is done.
Nothing here decodes an image. Problems with one sample (a bad JSON line, an empty caption, a
duplicate id, an image path that resolves outside ``input.image_root``) become a ``precheck``
reason on that item so that the read stage (:class:`stages.read.ReadStage`) rejects it into
``rejected/``; only an unusable input as a whole (missing file, not JSON at all) raises
:class:`SourceError`. Text is cleaned as it is read (lone surrogates -> U+FFFD, NULs removed).

Item shape (what :func:`list_items` returns, and what travels JSON-encoded in ``item``)::

    {"seq": 0, "shard": 0, "key": "sample-img001",
     "source": {"dataset": "sample", "id": "img001"},
     "image_ref": {"path": "/abs/img.jpg",            # or {"tar", "member", "offset", "size"}
                   "root": "/real/image/root"}        # (absent with input.allow_outside_image_root)
     "text": {"caption": "..."}                        # or {"conversations": [...]}
     "precheck": None}                                 # or "reason: detail"
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator


from pipeline.manifest import ManifestError
from stages.read import READ_REASONS, inside_root
from stages.record import ASSISTANT_ROLES, IMAGE_EXTS, KNOWN_ROLES, make_key, sanitize_key, speaker
from stages.record.shards import shard_paths

# Reason prefixes (``prefix: detail``). Precheck reasons come from list_items, the rest from ReadStage.
REJECT_REASONS = (
    # list_items (precheck)
    "bad_json", "bad_item", "bad_tar", "missing_image", "missing_caption", "empty_caption",
    "caption_not_text", "bad_conversation", "no_assistant_turn", "duplicate_id", "outside_image_root",
) + tuple(r for r in READ_REASONS if r not in ("bad_item", "missing_image", "outside_image_root"))

_MAX_TEXT_MEMBER = 16 * 1024 * 1024                   # bigger .txt/.json tar members are not captions
_MAX_TEXT_DEPTH = 100                                 # deeper id/caption/conversations nesting is bad_json
_BAD_CHARS = re.compile("[\ud800-\udfff\x00]")       # lone surrogates (a JSON "\\ud800") and NULs


class SourceError(ManifestError, FileNotFoundError):
    """The input as a whole cannot be read (missing file, not JSON, no tar files).

    A :class:`~pipeline.manifest.ManifestError` (the CLI exits with code 2) and a
    ``FileNotFoundError``; the message names the manifest field (``input.path`` ...).
    """


# =====================================================================================
# 1. list_items: the input index -> items (driver side, no image decoding)
# =====================================================================================

def list_items(manifest) -> list[dict]:
    """One item per sample of ``manifest.input``, in deterministic input order, ``limit`` applied.

    Keys are ``make_key(input.dataset or name, source id)``; a repeated source id keeps the key
    for its first occurrence, later ones get ``precheck = "duplicate_id: <id>"`` and a key with
    a ``-dupN`` suffix so that every row stays distinct.
    """
    cfg = manifest.input
    dataset = cfg.dataset or manifest.name
    per_shard = manifest.output.samples_per_shard
    readers = {"jsonl": _jsonl_entries, "llava": _llava_entries,
               "coco-captions": _coco_entries, "webdataset": _webdataset_entries}
    entries = readers[cfg.format](cfg)

    items: list[dict] = []
    seen_ids: set = set()
    taken_keys: set[str] = set()
    for entry in entries:
        if cfg.limit is not None and len(items) >= cfg.limit:
            break
        key, precheck = _assign_key(dataset, entry, seen_ids, taken_keys)
        seq = len(items)
        source = {"dataset": dataset, "id": entry["id"], **entry.get("source_extra", {})}
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


def _entry(source_id: Any, image_ref: dict | None, text: dict, precheck: str | None,
           key_parts: tuple | None = None, identity: Any = None, source_extra: dict | None = None) -> dict:
    """A reader's raw output: everything an item needs except seq, shard and key."""
    source_id = str(source_id)
    return {"id": source_id, "key_parts": key_parts or (source_id,), "identity": identity or ("id", source_id),
            "image_ref": image_ref, "text": text, "precheck": precheck, "source_extra": source_extra or {}}


# --- input paths -------------------------------------------------------------------------

def _input_file(cfg) -> Path:
    path = Path(cfg.path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise SourceError(f"input.path: {cfg.format} input {str(path)!r} {what}")
    return path


def _image_root(cfg, input_file: Path) -> tuple[Path, str | None]:
    """The image folder, and its real (symlink-free) path that every image path must resolve
    inside (None with ``input.allow_outside_image_root``)."""
    root = input_file.parent if cfg.image_root is None else Path(cfg.image_root)
    if cfg.image_root is not None and not root.is_dir():
        raise SourceError(f"input.image_root: folder {str(root)!r} does not exist")
    return root.absolute(), None if cfg.allow_outside_image_root else os.path.realpath(root)


def _image_ref(root: Path, image: Any, confine: str | None = None) -> tuple[dict | None, str | None]:
    """``{"path": abs, "root": real root}`` for an image field, or a precheck reason when the field
    is unusable or (``confine`` set) the path resolves outside the image root."""
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if isinstance(image, list):
        return None, f"missing_image: {len(image)} images in one sample are not supported"
    if not isinstance(image, str) or not image.strip():
        return None, "missing_image: no image path in the item"
    path = os.path.normpath(os.path.join(root, image))
    if confine is None:
        return {"path": path}, None
    if not inside_root(path, confine):
        return None, f"outside_image_root: {image if len(image) <= 300 else image[:297] + '...'}"
    return {"path": path, "root": confine}, None


def _load_json_file(path: Path, cfg) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (ValueError, RecursionError) as exc:            # JSONDecodeError, UnicodeDecodeError
        raise SourceError(f"input.path: {str(path)!r} is not valid JSON ({_exc_text(exc)})") from None


# --- text cleaning and checks ------------------------------------------------------------

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


# --- jsonl -------------------------------------------------------------------------------

def _jsonl_entries(cfg) -> Iterator[dict]:
    """``{"id", "image", "caption"}`` per line; blank lines are skipped, bad lines become items."""
    path = _input_file(cfg)
    root, confine = _image_root(cfg, path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            line_id = f"line{lineno}"
            try:
                obj = json.loads(raw)
                if isinstance(obj, dict):
                    obj = _clean_fields(obj)
            except (ValueError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError, _TooDeep
                yield _entry(line_id, None, {"caption": ""}, f"bad_json: line {lineno}: {_exc_text(exc)}",
                             identity=("line", lineno))
                continue
            if not isinstance(obj, dict):
                yield _entry(line_id, None, {"caption": ""},
                             f"bad_item: line {lineno} is a {type(obj).__name__}, not an object",
                             identity=("line", lineno))
                continue
            yield _object_entry(obj, root, fallback_id=line_id, confine=confine)


def _exc_text(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep to parse"
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _object_entry(obj: dict, root: Path, fallback_id: str, confine: str | None = None) -> dict:
    """Entry for one ``{"id", "image", "caption" | "conversations"}`` object (jsonl and llava)."""
    source_id = obj.get("id")
    if source_id is None or isinstance(source_id, (dict, list)) or str(source_id).strip() == "":
        source_id = fallback_id
    image_ref, bad_image = _image_ref(root, obj.get("image"), confine)
    text, bad_text = _text_and_check(obj)
    return _entry(source_id, image_ref, text, bad_image or bad_text)


# --- llava -------------------------------------------------------------------------------

def _llava_entries(cfg) -> Iterator[dict]:
    """A JSON list of ``{"id", "image", "conversations"}``; text-only items get a precheck."""
    path = _input_file(cfg)
    root, confine = _image_root(cfg, path)
    data = _load_json_file(path, cfg)
    if not isinstance(data, list):
        raise SourceError(f"input.path: LLaVA input {str(path)!r} must be a JSON list, "
                          f"got {type(data).__name__}")
    for index, obj in enumerate(data):
        if not isinstance(obj, dict):
            yield _entry(f"item{index}", None, {"conversations": []},
                         f"bad_item: item {index} is a {type(obj).__name__}, not an object",
                         identity=("index", index))
            continue
        try:
            obj = _clean_fields(obj)
        except _TooDeep as exc:
            yield _entry(f"item{index}", None, {"conversations": []}, f"bad_json: item {index}: {exc}",
                         identity=("index", index))
            continue
        if "conversations" not in obj:
            obj = {**obj, "conversations": None}
        yield _object_entry(obj, root, fallback_id=f"item{index}", confine=confine)


# --- coco-captions -----------------------------------------------------------------------

def _coco_entries(cfg) -> Iterator[dict]:
    """COCO caption annotations: one sample per caption, keyed by image id + annotation id."""
    path = _input_file(cfg)
    root, confine = _image_root(cfg, path)
    data = _load_json_file(path, cfg)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise SourceError(f"input.path: COCO captions file {str(path)!r} needs 'images' and "
                          f"'annotations' lists")
    files = {}
    for img in data["images"]:
        if isinstance(img, dict) and "id" in img:
            files.setdefault(_clean(str(img["id"])), img.get("file_name"))
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            yield _entry(f"annotation{index}", None, {"caption": ""},
                         f"bad_item: annotation {index} is a {type(ann).__name__}, not an object",
                         identity=("index", index))
            continue
        image_id = _clean(str(ann.get("image_id")))
        ann_id = _clean(str(ann.get("id", f"a{index}")))
        if image_id in files:
            image_ref, bad_image = _image_ref(root, _clean_str(files[image_id]), confine)
        else:
            image_ref, bad_image = None, f"missing_image: image_id {image_id} is not in 'images'"
        caption = _clean_str(ann.get("caption"))
        yield _entry(image_id, image_ref, {"caption": caption}, bad_image or _check_caption(caption),
                     key_parts=(image_id, ann_id), identity=("ann", image_id, ann_id),
                     source_extra={"annotation_id": ann_id})


# --- webdataset --------------------------------------------------------------------------

_WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")     # "dir/key.ext.more" -> ("dir/key", "ext.more")


def _webdataset_files(cfg) -> list[Path]:
    """A folder of tars, a single tar, a brace pattern (``shard-{000..009}.tar``) or a glob: the
    record module's :func:`~stages.record.shards.shard_paths` (a build's output folder works too)."""
    try:
        return shard_paths(cfg.path)
    except FileNotFoundError as exc:
        raise SourceError(f"input.path: {exc}") from None


def _webdataset_entries(cfg) -> Iterator[dict]:
    """Scan tar headers; group consecutive members by WebDataset key; read only small text members."""
    for tar_path in _webdataset_files(cfg):
        yield from _tar_entries(tar_path.absolute())


def _tar_entries(tar_path: Path) -> Iterator[dict]:
    try:
        tf = tarfile.open(tar_path, mode="r:")          # uncompressed: image offsets are usable
        seekable = True
    except tarfile.ReadError:
        try:
            tf = tarfile.open(tar_path, mode="r:*")     # compressed: read members by name later
            seekable = False
        except (tarfile.TarError, OSError) as exc:
            yield _bad_tar_entry(tar_path, exc)
            return
    with tf:
        group_key, members = None, {}
        try:
            for member in tf:
                if not member.isfile():
                    continue
                match = _WDS_NAME.match(member.name)
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != group_key and members:
                    yield _wds_sample(tf, tar_path, group_key, members, seekable)
                    members = {}
                group_key = key
                members.setdefault(ext, member)
            if members:
                yield _wds_sample(tf, tar_path, group_key, members, seekable)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield _bad_tar_entry(tar_path, exc)


def _bad_tar_entry(tar_path: Path, exc: Exception) -> dict:
    return _entry(f"{tar_path.name}#error", None, {"caption": ""},
                  f"bad_tar: {tar_path}: {exc}", identity=("tar", str(tar_path)))


def _wds_sample(tf: tarfile.TarFile, tar_path: Path, key: str, members: dict, seekable: bool) -> dict:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    image_ref, bad_image = None, None
    if image_ext is None:
        bad_image = f"missing_image: no {'/'.join(IMAGE_EXTS)} member (has: {', '.join(sorted(members))})"
    else:
        m = members[image_ext]
        image_ref = {"tar": str(tar_path), "member": m.name}
        if seekable:
            image_ref.update(offset=m.offset_data, size=m.size)
    text, bad_text = _wds_text(tf, members)
    return _entry(_clean(key), image_ref, text, bad_image or bad_text)


def _wds_text(tf: tarfile.TarFile, members: dict) -> tuple[dict, str | None]:
    """Text from ``.json`` (conversations or caption) or ``.txt`` (caption)."""
    obj = None
    if "json" in members:
        raw = _read_member(tf, members["json"])
        try:
            obj = json.loads(raw)
            if isinstance(obj, dict):
                obj = _clean_fields(obj, ("caption", "conversations"))
        except (ValueError, TypeError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError, _TooDeep
            return {"caption": ""}, f"bad_json: {members['json'].name}: {_exc_text(exc)}"
        if not isinstance(obj, dict):
            return {"caption": ""}, f"bad_item: {members['json'].name} is not an object"
        if "conversations" in obj:
            return _text_and_check(obj)
    if "txt" in members:
        raw = _read_member(tf, members["txt"])
        try:
            caption = _clean(raw.decode("utf-8")) if raw is not None else None
        except UnicodeDecodeError:
            return {"caption": ""}, f"caption_not_text: {members['txt'].name} is not UTF-8"
        return {"caption": caption}, _check_caption(caption)
    if obj is not None and "caption" in obj:
        return _text_and_check(obj)
    return {"caption": ""}, "missing_caption: no .txt member and no caption/conversations in .json"


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    if member.size > _MAX_TEXT_MEMBER:
        return None
    fh = tf.extractfile(member)
    return fh.read(_MAX_TEXT_MEMBER + 1) if fh is not None else None   # never more than the limit


# =====================================================================================
# 2. ReadStage: items -> stored bytes, pixels and a record
# =====================================================================================
