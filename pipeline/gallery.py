"""``lookandlearn inspect OUT --html FILE``: one self-contained HTML page to look at samples.

Everything is inside the file (no network, no external resources): each sample's image is a
downscaled JPEG data URI; each candidate region's mask is a small 1-bit PNG data URI (decoded by
stages/record/rle.py, drawn with PIL at display size, opaque inside), which the page uses as a CSS
``mask-image`` over a layer of the entity's colour; boxes and their labels are drawn as SVG. The
colours and verdict styles, the label placement and the URL state live in the page's script. The
samples are one JSON blob that the script pages through client-side (24 per page), so the browser
decodes only the images of the page on screen. Filters: entity status checkboxes and a
phrase/root text filter. The page itself (styles, script) is the template
pipeline/templates/gallery.html (package data).

A run of many thousands of samples is subsampled evenly to ``max_samples`` (the page says so).
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from stages.record import CAPTION_TURN, ENTITY_STATUSES, is_caption_turn, speaker
from stages.record import rle as rle_codec
from stages.record.shards import iter_records, shard_files

def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _display_size(width: int, height: int, max_width: int) -> tuple[int, int]:
    if width <= max_width:
        return width, height
    return max_width, max(1, round(height * max_width / width))


def _image_uri(image: bytes, size: tuple[int, int], quality: int) -> str:
    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
    return _data_uri("image/jpeg", buf.getvalue())


def _mask_uri(rle: dict, size: tuple[int, int]) -> str | None:
    """A 1-bit palette PNG at display size: transparent outside, opaque white inside (an alpha
    mask; the page colours it by entity)."""
    try:
        mask = rle_codec.decode(rle)
    except Exception:  # noqa: BLE001 — a broken mask must not stop the page; the region shows without one
        return None
    im = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    im = im.point(lambda v: 1 if v >= 128 else 0).convert("P")
    im.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0, bits=1, optimize=True)
    return _data_uri("image/png", buf.getvalue())


def _text_blocks(record: dict) -> list[dict]:
    text = record.get("text", {})
    if "conversations" in text:
        return [{"turn": i, "label": str(speaker(t) or ""), "text": str(t.get("value", ""))}
                for i, t in enumerate(text["conversations"])]
    if isinstance(text.get("captions"), list):
        return [{"turn": i, "label": f"caption {i + 1}", "text": str(c)} for i, c in enumerate(text["captions"])]
    return [{"turn": CAPTION_TURN, "label": "caption", "text": str(text.get("caption", ""))}]


def _entity(e: dict) -> dict:
    out = {k: e.get(k) for k in ("id", "phrase", "start", "end", "turn", "root", "plural", "status",
                                 "reason", "regions")}
    if is_caption_turn(out["turn"]):
        out["turn"] = CAPTION_TURN   # schema-1 records wrote null
    return out


def _sample(record: dict, image: bytes | None, shard: str, max_width: int, quality: int) -> dict:
    width, height = int(record["image"]["width"]), int(record["image"]["height"])
    size = _display_size(width, height, max_width)
    scale = size[0] / width
    regions = []
    for r in record.get("regions", []):
        verdict = r.get("verdict") or {}
        accept = bool(verdict.get("accept"))
        regions.append({
            "id": r["id"], "entity": r["entity"],
            "box": [round(float(v) * scale, 1) for v in r["box_xyxy"]],
            "det": r.get("det_score"), "mask_score": r.get("mask_score"), "accept": accept,
            "reason": verdict.get("reason", ""), "judge": verdict.get("judge", ""),
            "prompt": verdict.get("prompt", ""),
            "mask": _mask_uri(r["mask_rle"], size) if r.get("mask_rle") else None,
        })
    entities = [_entity(e) for e in record.get("entities", [])]
    return {
        "key": record["key"], "shard": shard, "source": record.get("source", {}),
        "width": width, "height": height, "w": size[0], "h": size[1],
        "img": _image_uri(image, size, quality) if image else None,
        "text": _text_blocks(record), "entities": entities, "regions": regions,
    }


def _template() -> str:
    """The page (pipeline/templates/gallery.html, package data): styles and the paging script, with
    ``__TITLE__`` (HTML-escaped text) and ``__DATA__`` (the JSON blob, ``<``, ``>``, ``&`` escaped) to fill."""
    return resources.files("pipeline").joinpath("templates/gallery.html").read_text(encoding="utf-8")


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace each ``__NAME__`` in one pass, so that text put in is never searched again."""
    return re.sub("__(" + "|".join(map(re.escape, values)) + ")__", lambda m: values[m.group(1)], template)


def _select(n: int, limit: int) -> set[int]:
    if n <= limit:
        return set(range(n))
    if limit <= 1:
        return {0}
    return {round(i * (n - 1) / (limit - 1)) for i in range(limit)}


def write_gallery(out: str | Path, html_path: str | Path, max_samples: int = 1000, per_page: int = 24,
                  max_width: int = 384, quality: int = 80, report: dict | None = None) -> dict:
    """Write the gallery page; returns ``{"path", "samples", "shown", "bytes"}``."""
    import pyarrow.parquet as pq

    out, html_path = Path(out), Path(html_path)
    files, incomplete = shard_files(out)
    total = sum(pq.read_metadata(f["index"]).num_rows for f in files.values())
    chosen = _select(total, max_samples)
    samples, seq = [], 0
    for f in files.values():
        for record, image, _ in iter_records(f["tar"], images=True):
            if seq in chosen:
                samples.append(_sample(record, image, f["tar"].name, max_width, quality))
            seq += 1
    name = (report or {}).get("name") or (out.name if not files else next(iter(files.values()))["tar"].stem.rsplit("-", 1)[0])
    meta = {
        "name": name, "out": str(out), "total": seq, "shown": len(samples), "per_page": per_page,
        "statuses": list(ENTITY_STATUSES), "incomplete_shards": incomplete,
        "overall": (report or {}).get("overall"),
    }
    blob = json.dumps({"meta": meta, "samples": samples}, ensure_ascii=False, separators=(",", ":"))
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = _fill(_template(), {"TITLE": html.escape(f"{name} — Look&Learn gallery"), "DATA": blob})
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    return {"path": str(html_path), "samples": seq, "shown": len(samples), "bytes": html_path.stat().st_size}

