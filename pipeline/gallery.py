"""``lookandlearn inspect OUT --html FILE``: one self-contained HTML page to look at samples.

Everything is inside the file (no network, no external resources): each sample's image is a
downscaled JPEG data URI; each candidate region's mask is a small PNG data URI (rendered here
with pycocotools + PIL at display size, coloured by verdict: accepted green, rejected red)
stacked over the image with CSS opacity; boxes are drawn as SVG. The samples are one JSON blob
that a small script pages through client-side (24 per page), so the browser decodes only the
images of the page on screen. Filters: entity status checkboxes and a phrase/root text filter.

A run of many thousands of samples is subsampled evenly to ``max_samples`` (the page says so).
"""
from __future__ import annotations

import base64
import html
import io
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.inspect import ENTITY_STATUSES, shard_files, iter_records

ACCEPT_RGB = (34, 197, 94)
REJECT_RGB = (239, 68, 68)


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


def _mask_uri(rle: dict, size: tuple[int, int], rgb: tuple[int, int, int]) -> str | None:
    """A 1-bit palette PNG (transparent outside, ``rgb`` inside) at display size."""
    from pycocotools import mask as mask_utils

    try:
        rle = dict(rle)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        with warnings.catch_warnings():  # pycocotools' own numpy-2 DeprecationWarning, once per mask
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except Exception:  # noqa: BLE001 — a broken mask must not stop the page; the region shows without one
        return None
    if mask.ndim == 3:
        mask = mask[..., 0]
    im = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    im = im.point(lambda v: 1 if v >= 128 else 0).convert("P")
    im.putpalette([0, 0, 0, *rgb])
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0, bits=1, optimize=True)
    return _data_uri("image/png", buf.getvalue())


def _text_blocks(record: dict) -> list[dict]:
    text = record.get("text", {})
    if "conversations" in text:
        return [{"turn": i, "label": str(t.get("from", "")), "text": str(t.get("value", ""))}
                for i, t in enumerate(text["conversations"])]
    return [{"turn": None, "label": "caption", "text": str(text.get("caption", ""))}]


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
            "mask": _mask_uri(r["mask_rle"], size, ACCEPT_RGB if accept else REJECT_RGB)
            if r.get("mask_rle") else None,
        })
    entities = [{k: e.get(k) for k in ("id", "phrase", "start", "end", "turn", "root", "plural", "status",
                                        "reason", "regions")} for e in record.get("entities", [])]
    return {
        "key": record["key"], "shard": shard, "source": record.get("source", {}),
        "width": width, "height": height, "w": size[0], "h": size[1],
        "img": _image_uri(image, size, quality) if image else None,
        "text": _text_blocks(record), "entities": entities, "regions": regions,
    }


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
    page = (_PAGE.replace("__TITLE__", html.escape(f"{name} — Look&Learn gallery"))
            .replace("__DATA__", blob))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    return {"path": str(html_path), "samples": seq, "shown": len(samples), "bytes": html_path.stat().st_size}


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>
:root { --grounded:#16a34a; --rejected:#dc2626; --ungrounded:#d97706; --skipped:#6b7280; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #111827; background: #f3f4f6; }
header { position: sticky; top: 0; z-index: 10; background: #fff; border-bottom: 1px solid #d1d5db; padding: 8px 16px; }
header h1 { font-size: 17px; margin: 0 0 4px; }
#summary { color: #4b5563; font-size: 13px; }
.controls { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: center; margin-top: 6px; }
.controls label { white-space: nowrap; cursor: pointer; }
.controls input[type=search] { width: 220px; padding: 3px 6px; }
.pager { display: flex; gap: 6px; align-items: center; }
.pager button { padding: 2px 10px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 12px; padding: 12px 16px; }
.sample { background: #fff; border: 1px solid #d1d5db; border-radius: 6px; padding: 8px; }
.sample .key { font: 12px ui-monospace, monospace; color: #374151; word-break: break-all; }
.sample .shard { color: #9ca3af; }
.view { position: relative; margin: 6px 0; background: #e5e7eb; }
.view img.base { display: block; width: 100%; height: auto; }
.view img.mask { position: absolute; left: 0; top: 0; width: 100%; height: 100%; opacity: .45; pointer-events: none; }
.view svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; overflow: visible; }
.view .noimg { padding: 30px; text-align: center; color: #6b7280; }
.hide-masks img.mask, .hide-boxes svg, .hide-rejected .cand-rejected { display: none; }
.view.focus img.mask, .view.focus svg g { opacity: .08; }
.view.focus img.mask.on { opacity: .7; }
.view.focus svg g.on { opacity: 1; }
.text { margin: 4px 0; }
.text .label { color: #6b7280; font-size: 12px; margin-right: 4px; }
.ent { border-radius: 3px; padding: 0 2px; border-bottom: 2px solid; cursor: default; }
.ent.grounded, .badge.grounded { background: #dcfce7; border-color: var(--grounded); }
.ent.rejected, .badge.rejected { background: #fee2e2; border-color: var(--rejected); }
.ent.ungrounded, .badge.ungrounded { background: #fef3c7; border-color: var(--ungrounded); }
.ent.skipped, .badge.skipped { background: #f3f4f6; border-color: var(--skipped); }
.ent.match { outline: 2px solid #2563eb; }
.ent sup { font-size: 9px; color: #6b7280; }
ul.ents { list-style: none; margin: 6px 0 0; padding: 0; font-size: 12.5px; }
ul.ents > li { margin: 3px 0; }
.badge { display: inline-block; border: 1px solid; border-radius: 9px; padding: 0 6px; font-size: 11px; margin-right: 4px; }
.reason { color: #4b5563; }
ul.regions { list-style: none; margin: 1px 0 0 14px; padding: 0; }
ul.regions li { font: 11.5px ui-monospace, monospace; }
.acc { color: var(--grounded); font-weight: 600; }
.rej { color: var(--rejected); font-weight: 600; }
#empty { padding: 40px; text-align: center; color: #6b7280; }
.legend span { margin-right: 10px; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div id="summary"></div>
  <div class="controls">
    <span id="status-filters"></span>
    <label>phrase / root <input type="search" id="phrase-filter" placeholder="e.g. dog"></label>
    <label><input type="checkbox" id="show-masks" checked> masks</label>
    <label><input type="checkbox" id="show-boxes" checked> boxes</label>
    <label><input type="checkbox" id="show-rejected" checked> rejected candidates</label>
    <span class="legend"><span class="acc">■ accepted</span><span class="rej">■ rejected</span></span>
    <span class="pager"><button id="first" title="first page">«</button><button id="prev" title="previous page">‹</button>
      <span id="page-info"></span><button id="next" title="next page">›</button><button id="last" title="last page">»</button></span>
    <span id="count"></span>
  </div>
</header>
<main id="grid"></main>
<div id="empty" hidden>No sample matches the filters.</div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("data").textContent);
  const META = DATA.meta, SAMPLES = DATA.samples, PER_PAGE = META.per_page || 24;
  const SVGNS = "http://www.w3.org/2000/svg";
  const state = { statuses: new Set(META.statuses), phrase: "", page: 0, filtered: SAMPLES };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function fmt(x) { return (x === null || x === undefined) ? "–" : Number(x).toFixed(3); }
  function pct(n, d) { return d ? (100 * n / d).toFixed(1) + "%" : "–"; }

  function entityMatches(e) {
    if (!state.statuses.has(e.status)) return false;
    if (!state.phrase) return true;
    return (e.phrase || "").toLowerCase().includes(state.phrase) || (e.root || "").toLowerCase().includes(state.phrase);
  }
  function applyFilters() {
    const all = state.statuses.size === META.statuses.length && !state.phrase;
    state.filtered = all ? SAMPLES : SAMPLES.filter(s => s.entities.some(entityMatches));
    state.page = 0;
    render();
  }

  function textBlock(sample, block) {
    const div = el("div", { class: "text" });
    if (block.label !== "caption") div.append(el("span", { class: "label", text: block.label + ":" }));
    const ents = sample.entities.filter(e => (e.turn === null ? null : e.turn) === block.turn)
      .sort((a, b) => a.start - b.start);
    let pos = 0;
    for (const e of ents) {
      if (e.start < pos || e.end > block.text.length) continue;
      div.append(block.text.slice(pos, e.start));
      const span = el("span", { class: "ent " + e.status + (state.phrase && entityMatches(e) ? " match" : ""),
        title: e.status + (e.reason ? ": " + e.reason : "") + " (root: " + e.root + ")", "data-entity": e.id,
        "data-status": e.status }, block.text.slice(e.start, e.end), el("sup", { text: "e" + e.id }));
      div.append(span);
      pos = e.end;
    }
    div.append(block.text.slice(pos));
    return div;
  }

  function card(sample) {
    const node = el("article", { class: "sample", "data-key": sample.key });
    node.append(el("div", { class: "key", text: sample.key + " " },
      el("span", { class: "shard", text: sample.shard + " · " + sample.width + "×" + sample.height })));
    const view = el("div", { class: "view" });
    if (sample.img) {
      view.append(el("img", { class: "base", src: sample.img, width: sample.w, height: sample.h, alt: sample.key }));
    } else {
      view.append(el("div", { class: "noimg", text: "(no image)" }));
    }
    const box = svg("svg", { viewBox: "0 0 " + sample.w + " " + sample.h, preserveAspectRatio: "none" });
    for (const r of sample.regions) {
      const cls = (r.accept ? "cand-accepted" : "cand-rejected");
      if (r.mask) view.append(el("img", { class: "mask " + cls, src: r.mask, alt: "", "data-entity": r.entity }));
      const g = svg("g", { class: cls, "data-entity": r.entity });
      const [x0, y0, x1, y1] = r.box;
      const colour = r.accept ? "#16a34a" : "#dc2626";
      g.append(svg("rect", { x: x0, y: y0, width: Math.max(1, x1 - x0), height: Math.max(1, y1 - y0), fill: "none",
        stroke: colour, "stroke-width": 2, "stroke-dasharray": r.accept ? "" : "5 3" }));
      const label = svg("text", { x: x0 + 3, y: Math.max(11, y0 + 11), fill: colour, "font-size": 11,
        "font-family": "monospace", "paint-order": "stroke", stroke: "#fff", "stroke-width": 3 });
      label.textContent = "e" + r.entity + " " + fmt(r.det);
      g.append(label);
      box.append(g);
    }
    view.append(box);
    node.append(view);
    for (const block of sample.text) node.append(textBlock(sample, block));
    const list = el("ul", { class: "ents" });
    for (const e of sample.entities) {
      const li = el("li", { "data-entity": e.id },
        el("span", { class: "badge " + e.status, text: e.status }),
        el("b", { text: "e" + e.id + " " }), e.phrase + " ",
        el("span", { class: "reason", text: "(root " + e.root + (e.reason ? "; " + e.reason : "") + ")" }));
      const own = sample.regions.filter(r => r.entity === e.id);
      if (own.length) {
        const ul = el("ul", { class: "regions" });
        for (const r of own) {
          ul.append(el("li", { class: r.accept ? "cand-accepted" : "cand-rejected" },
            el("span", { class: r.accept ? "acc" : "rej", text: r.accept ? "✓ accept " : "✗ reject " }),
            "r" + r.id + " det " + fmt(r.det) + " mask " + fmt(r.mask_score) + " — " + r.reason +
            (r.judge ? " [" + r.judge + (r.prompt ? " " + r.prompt : "") + "]" : "")));
        }
        li.append(ul);
      }
      list.append(li);
    }
    node.append(list);
    node.addEventListener("mouseover", ev => focusEntity(view, ev.target.closest("[data-entity]")));
    node.addEventListener("mouseout", () => focusEntity(view, null));
    return node;
  }

  function focusEntity(view, target) {
    const id = target && !view.contains(target) ? target.getAttribute("data-entity") : null;
    view.classList.toggle("focus", id !== null);
    for (const n of view.querySelectorAll("[data-entity]")) n.classList.toggle("on", id !== null && n.getAttribute("data-entity") === id);
  }

  function render() {
    const pages = Math.max(1, Math.ceil(state.filtered.length / PER_PAGE));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    const grid = document.getElementById("grid");
    const start = state.page * PER_PAGE;
    grid.replaceChildren(...state.filtered.slice(start, start + PER_PAGE).map(card));
    document.getElementById("page-info").textContent = "page " + (state.page + 1) + " / " + pages;
    document.getElementById("count").textContent = state.filtered.length + " of " + SAMPLES.length + " samples";
    document.getElementById("empty").hidden = state.filtered.length > 0;
    document.getElementById("first").disabled = document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("last").disabled = document.getElementById("next").disabled = state.page >= pages - 1;
  }

  function init() {
    document.getElementById("title").textContent = META.name + " — Look&Learn gallery";
    let summary = "Showing " + META.shown + " of " + META.total + " samples" +
      (META.shown < META.total ? " (evenly subsampled)" : "") + " from " + META.out + ".";
    const o = META.overall;
    if (o) {
      summary += " Inputs " + o.samples_in + ", written " + o.samples_out + " (" + pct(o.samples_out, o.samples_in) +
        "); entities " + o.entities + ", grounded " + pct(o.entities_by_status.grounded, o.entities - o.entities_by_status.skipped) +
        " of non-skipped; judge accepted " + o.regions_accepted + " of " + o.regions + " regions (" + pct(o.regions_accepted, o.regions) + ").";
    }
    if (META.incomplete_shards.length) summary += " Incomplete shards not shown: " + META.incomplete_shards.join(", ") + ".";
    document.getElementById("summary").textContent = summary;
    const filters = document.getElementById("status-filters");
    filters.append("entity status: ");
    for (const s of META.statuses) {
      const box = el("input", { type: "checkbox", id: "status-" + s, class: "status-filter", "data-status": s });
      box.checked = true;
      box.addEventListener("change", () => { if (box.checked) state.statuses.add(s); else state.statuses.delete(s); applyFilters(); });
      filters.append(el("label", { class: "badge " + s }, box, " " + s), " ");
    }
    const phrase = document.getElementById("phrase-filter");
    phrase.addEventListener("input", () => { state.phrase = phrase.value.trim().toLowerCase(); applyFilters(); });
    const grid = document.getElementById("grid");
    for (const [id, cls] of [["show-masks", "hide-masks"], ["show-boxes", "hide-boxes"], ["show-rejected", "hide-rejected"]]) {
      const box = document.getElementById(id);
      box.addEventListener("change", () => grid.classList.toggle(cls, !box.checked));
    }
    const go = p => { state.page = p; render(); window.scrollTo(0, 0); };
    document.getElementById("first").addEventListener("click", () => go(0));
    document.getElementById("prev").addEventListener("click", () => go(state.page - 1));
    document.getElementById("next").addEventListener("click", () => go(state.page + 1));
    document.getElementById("last").addEventListener("click", () => go(1e9));
    render();
  }
  init();
})();
</script>
</body>
</html>
"""
