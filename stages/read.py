"""read: the first stage. Reads each item's image bytes (a file, or a member of a WebDataset tar),
decodes them once, applies the :class:`ImageConfig` policy, and emits the stored bytes, the RGB
pixels and a fresh sample record.

It never raises on bad data: every failure is a ``rejected`` row whose ``reason`` starts with
one of :data:`READ_REASONS` (or the listing's precheck reason the item carries).

Policy, in order: size on disk (``max_bytes``), header size (``max_side``, ``max_aspect``,
``min_side``, before any pixels are decoded), animation, truncation, pixel mode (``modes``),
EXIF orientation, then the stored format (``store_format``): sources already in it keep their
bytes, anything that had to change (orientation, mode, format) is re-encoded and the record
says why (``image.reencoded``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pydantic import Field

from stages.base import Resources, Row, Stage
from stages.config import StageConfig
from stages.record import ROW_OK, dumps, new_record

# Reason prefixes of this stage (``prefix: detail``).
READ_REASONS = ("missing_file", "read_error", "empty_file", "file_too_large", "unreadable", "truncated",
                "too_large", "bad_aspect", "too_small", "animated", "unsupported_mode", "read_failed",
                "bad_item", "missing_image", "outside_image_root")


class ImageConfig(StageConfig):
    min_side: int = Field(16, ge=1, description="smaller images are rejected")
    max_side: int = Field(8192, ge=16, description="larger images are rejected")
    max_aspect: float = Field(20.0, gt=1, description="images more elongated than this are rejected")
    max_bytes: int = Field(50_000_000, ge=1024, description="bigger image files are rejected")
    modes: Literal["convert", "reject"] = Field(
        "convert",
        description="unusual pixel modes (CMYK, 16-bit, alpha RGBA/LA/PA, palette P, ...): convert = convert to "
                    "8-bit RGB (alpha composited on white, 16-bit scaled) and re-encode; reject = reject the "
                    "image with 'unsupported_mode: MODE'. Grayscale (L, 1) is always converted")
    store_format: Literal["jpg", "png", "webp", "keep"] = Field(
        "jpg",
        description="format of the stored image: sources already in it keep their bytes, others are "
                    "re-encoded (JPEG/WebP at quality 95, PNG lossless). One format for the whole "
                    "dataset is what datasets.load_dataset('webdataset') needs; keep = never re-encode "
                    "for format (a dataset with mixed .jpg/.png reads in webdataset and Ray, not in datasets)")


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


class ReadStage(Stage):
    """First stage: read and decode each item's image once, apply the image policy, start the record.

    Input columns ``seq``, ``shard``, ``key``, ``item`` (JSON text from the source listing); any
    other input column passes through. Output: every column of ``BATCH_COLUMNS`` (``pixels``
    as a numpy object array of ``(H, W, 3)`` uint8 arrays).
    """

    name = "read"

    def __init__(self, config: ImageConfig | None = None):
        self.cfg = config if config is not None else ImageConfig()
        self.resources = Resources("cpu")

    def setup(self) -> None:
        # Truncated files must fail to load; PIL's own bomb guard sits above what the policy allows.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        Image.MAX_IMAGE_PIXELS = max(int(self.cfg.max_side) ** 2, 1 << 24)

    def process(self, rows: list[Row]) -> None:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        tars = _TarReader()
        try:
            for row in rows:
                try:
                    for name, value in self._read_row(row, tars).items():
                        row[name] = value
                except _Reject as rej:
                    for name, value in _EMPTY_ROW.items():
                        row[name] = value
                    row.reject(rej.reason)
                except Exception as exc:  # never raise on bad data: anything unforeseen is a rejected row
                    for name, value in _EMPTY_ROW.items():
                        row[name] = value
                    row.reject(f"read_failed: {type(exc).__name__}: {_short(exc)}")
        finally:
            tars.close()

    # --- one row -------------------------------------------------------------------------

    def _read_row(self, row: Row, tars: "_TarReader") -> dict:
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

    def _read_bytes(self, ref: dict, tars: "_TarReader") -> bytes:
        if "path" in ref:
            path = str(ref["path"])
            where = path
            if ref.get("root") is not None:
                # Re-checked here, not only when listed: a symlink can change between the two. The
                # resolved path is what is opened, so what was checked is what is read.
                where = os.path.realpath(path)
                if not inside_root(where, str(ref["root"])):
                    raise _Reject(f"outside_image_root: {path}")
            try:
                size = os.stat(where).st_size
                if not os.path.isfile(where):
                    raise _Reject(f"read_error: {path} is not a file")
                self._check_file_size(size, path)
                with open(where, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                raise _Reject(f"missing_file: {path}") from None
            except OSError as exc:
                raise _Reject(f"read_error: {path}: {exc.strerror or exc}") from None
        elif "tar" in ref and "member" in ref:
            where = f"{ref['tar']}:{ref['member']}"
            if ref.get("size") is not None:
                self._check_file_size(int(ref["size"]), where)
            data = tars.read(ref, self.cfg.max_bytes)
            self._check_file_size(len(data), where)
        elif isinstance(ref.get("bytes"), (bytes, bytearray)):
            # image bytes in memory (the Python API's Labeler; never in a JSON item)
            data = bytes(ref["bytes"])
            self._check_file_size(len(data), "image bytes")
        else:
            raise _Reject("missing_image: image_ref has neither path, tar/member nor bytes")
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


def inside_root(path: str, real_root: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to the real folder ``real_root`` or below."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


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

    def read(self, ref: dict, limit: int | None = None) -> bytes:
        """The member's bytes; with ``limit``, a member over it is rejected from its header size
        before any byte is read, and at most ``limit + 1`` bytes are ever read (a compressed tar)."""
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
                if limit is not None and member.size > limit:
                    raise _Reject(f"file_too_large: {member.size} bytes > image.max_bytes {limit}")
                fh = tf.extractfile(member)
                if fh is None:
                    raise _Reject(f"read_error: {ref['member']} in {tar} is not a file")
                return fh.read(limit + 1 if limit is not None else -1)
        except FileNotFoundError:
            raise _Reject(f"missing_file: {tar}") from None
        except (OSError, tarfile.TarError) as exc:
            raise _Reject(f"read_error: {tar}:{ref['member']}: {exc}") from None

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

_EMPTY_ROW = {"image": b"", "ext": "", "pixels": np.zeros((0, 0, 3), np.uint8), "record": "", "log": "[]"}


def read_batch(items: list[dict]) -> dict:
    """The ReadStage input batch for items from the source listing (for tests and the local loop)."""
    return {"seq": [it["seq"] for it in items], "shard": [it["shard"] for it in items],
            "key": [it["key"] for it in items],
            "item": [json.dumps(it, ensure_ascii=False) for it in items], "times": ["{}"] * len(items)}


__all__ = ["ImageConfig", "ReadStage", "READ_REASONS", "inside_root", "read_batch"]
