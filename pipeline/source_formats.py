"""The input format readers behind :func:`pipeline.sources.list_items`: ``jsonl``, ``llava``,
``coco-captions`` (one sample per caption, or per image with ``input.coco_per_image``) and
``webdataset`` (with an img2dataset ``.parquet`` beside a tar read as well).

Each reader yields *entries* (:func:`_entry`): everything an item needs except ``seq``,
``shard`` and the key, which ``list_items`` fixes. Every extra field of the input (not the id,
image or text) goes into ``meta`` (:func:`pipeline.source_text.source_meta`), which becomes the
sample's ``source.meta``.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.manifest import ManifestError
from pipeline.source_text import (_check_caption, _clean, _clean_fields, _clean_str, _exc_text, _text_and_check,
                                  _TooDeep, source_meta)
from stages.read import inside_root
from stages.record import IMAGE_EXTS
from stages.record.shards import shard_paths

_MAX_TEXT_MEMBER = 16 * 1024 * 1024                   # bigger .txt/.json tar members are not captions

# Fields that are the sample itself, not meta (per format).
_OBJECT_FIELDS = ("id", "image", "caption", "conversations")
_COCO_IMAGE_FIELDS = ("id", "file_name")
_COCO_ANN_FIELDS = ("id", "image_id", "caption")
_WDS_JSON_FIELDS = ("caption", "conversations")
_IMG2DATASET_FIELDS = ("key", "caption")


class SourceError(ManifestError, FileNotFoundError):
    """The input as a whole cannot be read (missing file, not JSON, no tar files).

    A :class:`~pipeline.manifest.ManifestError` (the CLI exits with code 2) and a
    ``FileNotFoundError``; the message names the manifest field (``input.path`` ...).
    """


def _entry(source_id: Any, image_ref: dict | None, text: dict, precheck: str | None,
           key_parts: tuple | None = None, identity: Any = None, source_extra: dict | None = None,
           meta: dict | None = None) -> dict:
    """A reader's raw output: everything an item needs except seq, shard and key."""
    source_id = str(source_id)
    return {"id": source_id, "key_parts": key_parts or (source_id,), "identity": identity or ("id", source_id),
            "image_ref": image_ref, "text": text, "precheck": precheck, "source_extra": source_extra or {},
            "meta": meta or {}}


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


def _object_entry(obj: dict, root: Path, fallback_id: str, confine: str | None = None) -> dict:
    """Entry for one ``{"id", "image", "caption" | "conversations"}`` object (jsonl and llava);
    its other fields are the meta."""
    source_id = obj.get("id")
    if source_id is None or isinstance(source_id, (dict, list)) or str(source_id).strip() == "":
        source_id = fallback_id
    image_ref, bad_image = _image_ref(root, obj.get("image"), confine)
    text, bad_text = _text_and_check(obj)
    return _entry(source_id, image_ref, text, bad_image or bad_text, meta=source_meta(obj, _OBJECT_FIELDS))


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
    """COCO caption annotations: one sample per caption (keyed by image id + annotation id), or
    with ``input.coco_per_image`` one sample per image holding all its captions. The image's
    other fields (``coco_url``, ``license`` with its name and url from ``licenses``, ...) are the meta."""
    path = _input_file(cfg)
    root, confine = _image_root(cfg, path)
    data = _load_json_file(path, cfg)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise SourceError(f"input.path: COCO captions file {str(path)!r} needs 'images' and "
                          f"'annotations' lists")
    licenses = {}
    for lic in data.get("licenses") or []:
        if isinstance(lic, dict) and "id" in lic:
            licenses.setdefault(str(lic["id"]), lic)
    images: dict[str, dict] = {}
    for img in data["images"]:
        if isinstance(img, dict) and "id" in img:
            images.setdefault(_clean(str(img["id"])), img)

    def image_of(image_id: str) -> tuple[dict | None, str | None, dict]:
        if image_id not in images:
            return None, f"missing_image: image_id {image_id} is not in 'images'", {}
        img = images[image_id]
        image_ref, bad = _image_ref(root, _clean_str(img.get("file_name")), confine)
        return image_ref, bad, _coco_image_fields(img, licenses)

    if getattr(cfg, "coco_per_image", False):
        yield from _coco_per_image(data["annotations"], image_of)
        return
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            yield _entry(f"annotation{index}", None, {"caption": ""},
                         f"bad_item: annotation {index} is a {type(ann).__name__}, not an object",
                         identity=("index", index))
            continue
        image_id = _clean(str(ann.get("image_id")))
        ann_id = _clean(str(ann.get("id", f"a{index}")))
        image_ref, bad_image, fields = image_of(image_id)
        caption = _clean_str(ann.get("caption"))
        fields.update((k, v) for k, v in ann.items() if k not in _COCO_ANN_FIELDS)
        yield _entry(image_id, image_ref, {"caption": caption}, bad_image or _check_caption(caption),
                     key_parts=(image_id, ann_id), identity=("ann", image_id, ann_id),
                     source_extra={"annotation_id": ann_id}, meta=source_meta(fields))


def _coco_image_fields(img: dict, licenses: dict) -> dict:
    """A COCO image's fields for ``source.meta`` (not ``id``/``file_name``), with its license's
    ``name`` and ``url`` from the file's ``licenses`` list (a fresh dict)."""
    fields = {k: v for k, v in img.items() if k not in _COCO_IMAGE_FIELDS}
    lic = licenses.get(str(img.get("license"))) if img.get("license") is not None else None
    if lic is not None:
        fields.setdefault("license_name", lic.get("name"))
        fields.setdefault("license_url", lic.get("url"))
    return fields


def _coco_per_image(annotations: list, image_of) -> Iterator[dict]:
    """One entry per image id, in order of its first annotation: ``text.captions`` lists its
    usable captions and ``source.annotation_ids`` their ids, in annotation order. A caption that
    is empty or not text is left out; an image with none left is rejected with that reason."""
    groups: dict[str, dict] = {}
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            yield _entry(f"annotation{index}", None, {"captions": []},
                         f"bad_item: annotation {index} is a {type(ann).__name__}, not an object",
                         identity=("index", index))
            continue
        image_id = _clean(str(ann.get("image_id")))
        group = groups.setdefault(image_id, {"captions": [], "ids": [], "bad": None})
        caption = _clean_str(ann.get("caption"))
        bad = _check_caption(caption)
        if bad is not None:
            group["bad"] = group["bad"] or bad
            continue
        group["captions"].append(caption)
        group["ids"].append(_clean(str(ann.get("id", f"a{index}"))))
    for image_id, group in groups.items():
        image_ref, bad_image, fields = image_of(image_id)
        precheck = bad_image or (None if group["captions"] else group["bad"])
        yield _entry(image_id, image_ref, {"captions": group["captions"]}, precheck,
                     identity=("image", image_id), source_extra={"annotation_ids": group["ids"]},
                     meta=source_meta(fields))


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


def img2dataset_rows(tar_path: Path) -> dict[str, dict]:
    """The rows of the img2dataset ``.parquet`` beside a shard tar (``00000.tar`` ->
    ``00000.parquet``), by ``key``; ``{}`` when there is none. Its columns other than ``key`` and
    ``caption`` (``url``, ``status``, ``--save_additional_columns`` ...) become ``source.meta``."""
    path = tar_path.with_name(tar_path.name.split(".", 1)[0] + ".parquet")
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 — any Arrow error: the input is unusable as given
        raise SourceError(f"input.path: img2dataset parquet {str(path)!r} cannot be read ({_exc_text(exc)})") from None
    if "key" not in table.column_names:
        raise SourceError(f"input.path: {str(path)!r} beside {tar_path.name} has no 'key' column "
                          f"(an img2dataset parquet names each sample's key)")
    return {str(row["key"]): row for row in table.to_pylist() if row.get("key") is not None}


def _tar_entries(tar_path: Path) -> Iterator[dict]:
    side = img2dataset_rows(tar_path)
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
                    yield _wds_sample(tf, tar_path, group_key, members, seekable, side)
                    members = {}
                group_key = key
                members.setdefault(ext, member)
            if members:
                yield _wds_sample(tf, tar_path, group_key, members, seekable, side)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield _bad_tar_entry(tar_path, exc)


def _bad_tar_entry(tar_path: Path, exc: Exception) -> dict:
    return _entry(f"{tar_path.name}#error", None, {"caption": ""},
                  f"bad_tar: {tar_path}: {exc}", identity=("tar", str(tar_path)))


def _wds_sample(tf: tarfile.TarFile, tar_path: Path, key: str, members: dict, seekable: bool,
                side: dict[str, dict]) -> dict:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    image_ref, bad_image = None, None
    if image_ext is None:
        bad_image = f"missing_image: no {'/'.join(IMAGE_EXTS)} member (has: {', '.join(sorted(members))})"
    else:
        m = members[image_ext]
        image_ref = {"tar": str(tar_path), "member": m.name}
        if seekable:
            image_ref.update(offset=m.offset_data, size=m.size)
    text, bad_text, obj = _wds_text(tf, members)
    row = side.get(key) or side.get(key.rsplit("/", 1)[-1]) or {}
    fields = {k: v for k, v in row.items() if k not in _IMG2DATASET_FIELDS}
    if obj is not None:
        fields.update((k, v) for k, v in obj.items() if k not in _WDS_JSON_FIELDS)
    return _entry(_clean(key), image_ref, text, bad_image or bad_text, meta=source_meta(fields))


def _wds_text(tf: tarfile.TarFile, members: dict) -> tuple[dict, str | None, dict | None]:
    """Text from ``.json`` (conversations or caption) or ``.txt`` (caption), and the ``.json``
    object (its other fields are meta)."""
    obj = None
    if "json" in members:
        raw = _read_member(tf, members["json"])
        try:
            obj = json.loads(raw)
            if isinstance(obj, dict):
                obj = _clean_fields(obj, ("caption", "conversations"))
        except (ValueError, TypeError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError, _TooDeep
            return {"caption": ""}, f"bad_json: {members['json'].name}: {_exc_text(exc)}", None
        if not isinstance(obj, dict):
            return {"caption": ""}, f"bad_item: {members['json'].name} is not an object", None
        if "conversations" in obj:
            return (*_text_and_check(obj), obj)
    if "txt" in members:
        raw = _read_member(tf, members["txt"])
        try:
            caption = _clean(raw.decode("utf-8")) if raw is not None else None
        except UnicodeDecodeError:
            return {"caption": ""}, f"caption_not_text: {members['txt'].name} is not UTF-8", obj
        return {"caption": caption}, _check_caption(caption), obj
    if obj is not None and "caption" in obj:
        return (*_text_and_check(obj), obj)
    return {"caption": ""}, "missing_caption: no .txt member and no caption/conversations in .json", obj


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | None:
    if member.size > _MAX_TEXT_MEMBER:
        return None
    fh = tf.extractfile(member)
    return fh.read(_MAX_TEXT_MEMBER + 1) if fh is not None else None   # never more than the limit


READERS = {"jsonl": _jsonl_entries, "llava": _llava_entries,
           "coco-captions": _coco_entries, "webdataset": _webdataset_entries}
