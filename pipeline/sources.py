"""Sources: turn the manifest's ``input`` into work items, and items into decoded images.

Two halves, read top to bottom:

1. :func:`list_items` runs on the driver. It reads only the index of the input (JSONL lines,
   a LLaVA JSON list, COCO caption annotations, or WebDataset tar *headers*) and returns one
   JSON-ready item per sample, in input order, with its ``seq``, ``shard`` and key fixed
   before any work is done. Nothing here decodes an image. Problems with one sample (a bad
   JSON line, an empty caption, a duplicate id) become a ``precheck`` reason on that item so
   that the read stage can reject it into ``rejected/``; only an unusable input as a whole
   (missing file, not JSON at all) raises :class:`SourceError`.

2. :class:`ReadStage` is the first pipeline stage. For each item it reads the image bytes,
   decodes them once, applies the :class:`~pipeline.manifest.ImageConfig` policy, and emits
   the stored bytes, the RGB pixels and a fresh sample record. It never raises on bad data:
   every failure is a ``rejected`` row whose ``reason`` starts with one of
   :data:`REJECT_REASONS`.

Item shape (what :func:`list_items` returns, and what travels JSON-encoded in ``item``)::

    {"seq": 0, "shard": 0, "key": "sample-img001",
     "source": {"dataset": "sample", "id": "img001"},
     "image_ref": {"path": "/abs/img.jpg"}            # or {"tar", "member", "offset", "size"}
     "text": {"caption": "..."}                        # or {"conversations": [...]}
     "precheck": None}                                 # or "reason: detail"
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.manifest import ImageConfig, ManifestError
from stages.record import BATCH_COLUMNS, ROW_OK, ROW_REJECTED, dumps, make_key, new_record, sanitize_key

# Reason prefixes (``prefix: detail``). Precheck reasons come from list_items, the rest from ReadStage.
REJECT_REASONS = (
    # list_items (precheck)
    "bad_json", "bad_item", "bad_tar", "missing_image", "missing_caption", "empty_caption",
    "caption_not_text", "bad_conversation", "no_assistant_turn", "duplicate_id",
    # ReadStage
    "missing_file", "read_error", "empty_file", "file_too_large", "unreadable", "truncated",
    "too_large", "bad_aspect", "too_small", "animated", "unsupported_mode", "read_failed",
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")          # WebDataset image members, in preference order
ASSISTANT_ROLES = ("gpt", "assistant")
KNOWN_ROLES = ("human", "user", "system") + ASSISTANT_ROLES
_MAX_TEXT_MEMBER = 16 * 1024 * 1024                   # bigger .txt/.json tar members are not captions


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


def _image_root(cfg, input_file: Path) -> Path:
    if cfg.image_root is None:
        return input_file.parent.absolute()
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise SourceError(f"input.image_root: folder {str(root)!r} does not exist")
    return root.absolute()


def _image_ref(root: Path, image: Any) -> tuple[dict | None, str | None]:
    """``{"path": abs}`` for an image field, or a precheck reason when the field is unusable."""
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if isinstance(image, list):
        return None, f"missing_image: {len(image)} images in one sample are not supported"
    if not isinstance(image, str) or not image.strip():
        return None, "missing_image: no image path in the item"
    return {"path": os.path.normpath(os.path.join(root, image))}, None


def _load_json_file(path: Path, cfg) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"input.path: {str(path)!r} is not valid JSON ({exc})") from None


# --- text checks -------------------------------------------------------------------------

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
        role, value = turn.get("from", turn.get("role")), turn.get("value")
        if not isinstance(role, str) or role.lower() not in KNOWN_ROLES:
            return f"bad_conversation: turn {i} has unknown speaker {role!r}"
        if not isinstance(value, str):
            return f"bad_conversation: turn {i} value is a {type(value).__name__}, not text"
        if role.lower() in ASSISTANT_ROLES and value.strip():
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
    root = _image_root(cfg, path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            line_id = f"line{lineno}"
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield _entry(line_id, None, {"caption": ""}, f"bad_json: line {lineno}: {exc}",
                             identity=("line", lineno))
                continue
            if not isinstance(obj, dict):
                yield _entry(line_id, None, {"caption": ""},
                             f"bad_item: line {lineno} is a {type(obj).__name__}, not an object",
                             identity=("line", lineno))
                continue
            yield _object_entry(obj, root, fallback_id=line_id)


def _object_entry(obj: dict, root: Path, fallback_id: str) -> dict:
    """Entry for one ``{"id", "image", "caption" | "conversations"}`` object (jsonl and llava)."""
    source_id = obj.get("id")
    if source_id is None or isinstance(source_id, (dict, list)) or str(source_id).strip() == "":
        source_id = fallback_id
    image_ref, bad_image = _image_ref(root, obj.get("image"))
    text, bad_text = _text_and_check(obj)
    return _entry(source_id, image_ref, text, bad_image or bad_text)


# --- llava -------------------------------------------------------------------------------

def _llava_entries(cfg) -> Iterator[dict]:
    """A JSON list of ``{"id", "image", "conversations"}``; text-only items get a precheck."""
    path = _input_file(cfg)
    root = _image_root(cfg, path)
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
        if "conversations" not in obj:
            obj = {**obj, "conversations": None}
        yield _object_entry(obj, root, fallback_id=f"item{index}")


# --- coco-captions -----------------------------------------------------------------------

def _coco_entries(cfg) -> Iterator[dict]:
    """COCO caption annotations: one sample per caption, keyed by image id + annotation id."""
    path = _input_file(cfg)
    root = _image_root(cfg, path)
    data = _load_json_file(path, cfg)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise SourceError(f"input.path: COCO captions file {str(path)!r} needs 'images' and "
                          f"'annotations' lists")
    files = {}
    for img in data["images"]:
        if isinstance(img, dict) and "id" in img:
            files.setdefault(str(img["id"]), img.get("file_name"))
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            yield _entry(f"annotation{index}", None, {"caption": ""},
                         f"bad_item: annotation {index} is a {type(ann).__name__}, not an object",
                         identity=("index", index))
            continue
        image_id = str(ann.get("image_id"))
        ann_id = str(ann.get("id", f"a{index}"))
        if image_id in files:
            image_ref, bad_image = _image_ref(root, files[image_id])
        else:
            image_ref, bad_image = None, f"missing_image: image_id {image_id} is not in 'images'"
        caption = ann.get("caption")
        yield _entry(image_id, image_ref, {"caption": caption}, bad_image or _check_caption(caption),
                     key_parts=(image_id, ann_id), identity=("ann", image_id, ann_id),
                     source_extra={"annotation_id": ann_id})


# --- webdataset --------------------------------------------------------------------------

_WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")     # "dir/key.ext.more" -> ("dir/key", "ext.more")


def _webdataset_files(cfg) -> list[Path]:
    """A folder of tars, a single tar, a brace pattern (``shard-{000..009}.tar``) or a glob."""
    spec = cfg.path
    if "{" in spec:
        from braceexpand import braceexpand

        paths = [Path(p) for p in braceexpand(spec)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"input.path: {len(missing)} tar file(s) of {spec!r} do not exist "
                              f"(first: {missing[0]!r})")
        return paths
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise SourceError(f"input.path: no tar files match {spec!r}")
        return paths
    path = Path(spec)
    if path.is_dir():
        paths = sorted(p for p in path.iterdir()
                       if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz")))
        if not paths:
            raise SourceError(f"input.path: folder {spec!r} has no .tar files")
        return paths
    if not path.is_file():
        raise SourceError(f"input.path: webdataset input {spec!r} does not exist")
    return [path]


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
    return _entry(key, image_ref, text, bad_image or bad_text)


def _wds_text(tf: tarfile.TarFile, members: dict) -> tuple[dict, str | None]:
    """Text from ``.json`` (conversations or caption) or ``.txt`` (caption)."""
    obj = None
    if "json" in members:
        raw = _read_member(tf, members["json"])
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
            return {"caption": ""}, f"bad_json: {members['json'].name}: {exc}"
        if not isinstance(obj, dict):
            return {"caption": ""}, f"bad_item: {members['json'].name} is not an object"
        if "conversations" in obj:
            return _text_and_check(obj)
    if "txt" in members:
        raw = _read_member(tf, members["txt"])
        try:
            caption = raw.decode("utf-8") if raw is not None else None
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
    return fh.read() if fh is not None else None


# =====================================================================================
# 2. ReadStage: items -> stored bytes, pixels and a record
# =====================================================================================

class _Reject(Exception):
    """Internal: stop processing this row with ``reason`` (``prefix: detail``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_OPEN_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]   # never EPS/PSD/...; JPEG covers MPO
_SIMPLE_MODES = {"RGB", "L", "1"}          # converted to RGB whatever image.modes says
_TRANSPOSE_TAGS = {2, 3, 4, 5, 6, 7, 8}    # EXIF orientations that change the pixel layout
_ORIENTATION = 0x0112


class ReadStage:
    """First stage: read and decode each item's image once, apply the image policy, start the record.

    Input columns ``seq``, ``shard``, ``key``, ``item`` (JSON text from :func:`list_items`); any
    other input column passes through. Output: every column of ``BATCH_COLUMNS`` as lists
    (``pixels`` as a numpy object array of ``(H, W, 3)`` uint8 arrays).
    """

    def __init__(self, image: ImageConfig | None = None):
        self.cfg = image if image is not None else ImageConfig()
        self._ready = False

    def setup(self) -> None:
        # Truncated files must fail to load; PIL's own bomb guard sits above what the policy allows.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        Image.MAX_IMAGE_PIXELS = max(int(self.cfg.max_side) ** 2, 1 << 24)
        self._ready = True

    def __call__(self, batch: dict) -> dict:
        if not self._ready:
            self.setup()
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        n = len(batch["key"])
        out: dict[str, list] = {name: [] for name in BATCH_COLUMNS}
        for name in batch:
            out.setdefault(name, [])
        tars = _TarReader()
        try:
            for i in range(n):
                row = {name: _plain(batch[name][i]) for name in batch}
                row.update(self._read_row(row, tars))
                for name in out:
                    out[name].append(row.get(name))
        finally:
            tars.close()
        pixels = np.empty(n, dtype=object)
        for i, value in enumerate(out["pixels"]):
            pixels[i] = value
        out["pixels"] = pixels
        return out

    # --- one row -------------------------------------------------------------------------

    def _read_row(self, row: dict, tars: "_TarReader") -> dict:
        try:
            item = row.get("item")
            if isinstance(item, (str, bytes)):
                try:
                    item = json.loads(item)
                except ValueError as exc:
                    raise _Reject(f"bad_item: item is not valid JSON ({exc})") from None
            if not isinstance(item, dict):
                raise _Reject("bad_item: item is not a JSON object")
            if item.get("precheck"):
                raise _Reject(str(item["precheck"]))
            ref = item.get("image_ref")
            if not isinstance(ref, dict):
                raise _Reject("missing_image: item has no image_ref")
            data = self._read_bytes(ref, tars)
            image, ext, pixels, info = self._decode(data)
            record = new_record(row["key"], item.get("source") or {}, pixels.shape[1], pixels.shape[0],
                                hashlib.sha256(image).hexdigest(), item.get("text") or {})
            record["image"].update(info)
            return {"status": ROW_OK, "reason": "", "image": image, "ext": ext, "pixels": pixels,
                    "record": dumps(record), "log": "[]"}
        except _Reject as rej:
            return _rejected(rej.reason)
        except Exception as exc:  # never raise on bad data: anything unforeseen is a rejected row
            return _rejected(f"read_failed: {type(exc).__name__}: {_short(exc)}")

    def _read_bytes(self, ref: dict, tars: "_TarReader") -> bytes:
        if "path" in ref:
            path = str(ref["path"])
            try:
                size = os.stat(path).st_size
                if not os.path.isfile(path):
                    raise _Reject(f"read_error: {path} is not a file")
                self._check_file_size(size, path)
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                raise _Reject(f"missing_file: {path}") from None
            except OSError as exc:
                raise _Reject(f"read_error: {path}: {exc.strerror or exc}") from None
        elif "tar" in ref and "member" in ref:
            where = f"{ref['tar']}:{ref['member']}"
            if ref.get("size") is not None:
                self._check_file_size(int(ref["size"]), where)
            data = tars.read(ref)
            self._check_file_size(len(data), where)
        else:
            raise _Reject("missing_image: image_ref has neither path nor tar/member")
        if len(data) == 0:
            raise _Reject(f"empty_file: {ref.get('path') or ref.get('member')}")
        return data

    def _check_file_size(self, size: int, where: str) -> None:
        if size == 0:
            raise _Reject(f"empty_file: {where}")
        if size > self.cfg.max_bytes:
            raise _Reject(f"file_too_large: {size} bytes > image.max_bytes {self.cfg.max_bytes}")

    # --- decoding ------------------------------------------------------------------------

    def _decode(self, data: bytes) -> tuple[bytes, str, np.ndarray, dict]:
        """Bytes -> (stored bytes, ext, RGB pixels, extra record["image"] fields). Decodes once."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                      # bomb/EXIF warnings: we check ourselves
            try:
                img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
            except Image.DecompressionBombError as exc:
                raise _Reject(f"too_large: {exc}") from None
            except Exception as exc:
                raise _Reject(f"unreadable: {_short(exc)}") from None
            fmt = img.format or "?"
            self._check_size(*img.size)                          # header size, before any pixels
            try:                                                 # MPO: a camera JPEG + its previews
                frames = getattr(img, "n_frames", 1) if fmt != "MPO" else 1
            except Exception as exc:
                raise _Reject(f"unreadable: {_short(exc)}") from None
            if frames > 1:
                raise _Reject(f"animated: {fmt} with {frames} frames")
            try:
                img.load()
            except Exception as exc:
                msg = _short(exc)
                raise _Reject(("truncated: " if "truncat" in msg.lower() else "unreadable: ") + msg) from None

            mode = _mode_label(img, data)
            if mode not in _SIMPLE_MODES and self.cfg.modes == "reject":
                raise _Reject(f"unsupported_mode: {mode}")
            why: list[str] = []
            orientation = _orientation(img)
            icc = img.info.get("icc_profile") if img.mode == "RGB" else None
            if orientation in _TRANSPOSE_TAGS:
                img = ImageOps.exif_transpose(img)
                why.append(f"exif orientation {orientation}")
            rgb = _to_rgb(img)
            if mode != "RGB":
                why.append(f"mode {mode}")
            if fmt not in _KEEP_FORMATS:
                why.append(f"format {fmt}")
            elif self.cfg.store_format != "keep" and _KEEP_FORMATS[fmt] != self.cfg.store_format:
                why.append(f"format {fmt} -> image.store_format {self.cfg.store_format}")

            info: dict[str, Any] = {}
            if mode != "RGB":
                info["original_mode"] = mode
            if not why:
                stored, ext = data, _KEEP_FORMATS[fmt]
            else:
                target = self.cfg.store_format
                if target == "keep":
                    target = "jpg" if fmt in ("JPEG", "MPO") else "png"
                stored, ext = _encode(rgb, target, icc=icc)
                info["reencoded"] = "; ".join(why)
            pixels = np.array(rgb, dtype=np.uint8)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise _Reject(f"unreadable: decoded to shape {pixels.shape}")
        return stored, ext, pixels, info

    def _check_size(self, width: int, height: int) -> None:
        cfg = self.cfg
        if width <= 0 or height <= 0:
            raise _Reject(f"unreadable: image size {width}x{height}")
        if max(width, height) > cfg.max_side:
            raise _Reject(f"too_large: {width}x{height} > image.max_side {cfg.max_side}")
        aspect = max(width, height) / min(width, height)
        if aspect > cfg.max_aspect:
            raise _Reject(f"bad_aspect: {width}x{height} aspect {aspect:.1f} > image.max_aspect {cfg.max_aspect:g}")
        if min(width, height) < cfg.min_side:
            raise _Reject(f"too_small: {width}x{height} < image.min_side {cfg.min_side}")


def _rejected(reason: str) -> dict:
    return {"status": ROW_REJECTED, "reason": reason, "image": b"", "ext": "",
            "pixels": np.zeros((0, 0, 3), np.uint8), "record": "", "log": "[]"}


def _plain(value: Any) -> Any:
    """numpy scalars (what Ray hands over) -> Python values."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _mode_label(img: Image.Image, data: bytes) -> str:
    """PIL's mode, plus ';16' for 16-bit RGB/RGBA PNGs (PIL hands those over as 8-bit)."""
    mode = img.mode
    if mode in ("RGB", "RGBA") and _png_bit_depth(data) == 16:
        return f"{mode};16"
    return mode


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:                # malformed EXIF never rejects an image; it just isn't rotated
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Faithful 8-bit RGB: alpha over white, 16/32-bit scaled, CMYK through its ICC profile."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:
            pass                     # unusable profile: PIL's plain conversion below
    return img.convert("RGB")


def _encode(rgb: Image.Image, ext: str, icc: bytes | None) -> tuple[bytes, str]:
    """Re-encode upright RGB pixels (no EXIF: the pixels are already transposed).
    JPEG/WebP at quality 95; PNG lossless."""
    buf = io.BytesIO()
    extra = {"icc_profile": icc} if icc else {}
    if ext == "jpg":
        rgb.save(buf, format="JPEG", quality=95, **extra)
    elif ext == "webp":
        rgb.save(buf, format="WEBP", quality=95, **extra)
    else:
        rgb.save(buf, format="PNG", **extra)
    return buf.getvalue(), ext


class _TarReader:
    """Reads tar members for one batch: a seek + read when list_items recorded the offset."""

    def __init__(self):
        self._files: dict[str, Any] = {}

    def read(self, ref: dict) -> bytes:
        tar = str(ref["tar"])
        try:
            if ref.get("offset") is not None and ref.get("size") is not None:
                fh = self._files.get(tar)
                if fh is None:
                    fh = self._files[tar] = open(tar, "rb")
                fh.seek(int(ref["offset"]))
                data = fh.read(int(ref["size"]))
                if len(data) != int(ref["size"]):
                    raise _Reject(f"truncated: {tar}:{ref['member']} ends early")
                return data
            with tarfile.open(tar, mode="r:*") as tf:
                try:
                    member = tf.getmember(ref["member"])
                except KeyError:
                    raise _Reject(f"missing_file: {ref['member']} not in {tar}") from None
                fh = tf.extractfile(member)
                if fh is None:
                    raise _Reject(f"read_error: {ref['member']} in {tar} is not a file")
                return fh.read()
        except FileNotFoundError:
            raise _Reject(f"missing_file: {tar}") from None
        except (OSError, tarfile.TarError) as exc:
            raise _Reject(f"read_error: {tar}:{ref['member']}: {exc}") from None

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def read_batch(items: list[dict]) -> dict:
    """The ReadStage input batch for items from :func:`list_items` (for tests and the local loop)."""
    return {"seq": [it["seq"] for it in items], "shard": [it["shard"] for it in items],
            "key": [it["key"] for it in items],
            "item": [json.dumps(it, ensure_ascii=False) for it in items]}
