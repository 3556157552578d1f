"""Write-stage benchmark: samples/s and MB/s of ``ShardWriter.write_shard`` on one CPU core.

Typical samples: a 640x480 JPEG (a photo that ships with scikit-image, resized, quality 90), a
caption with 6 noun phrases (4 candidates, 1 pronoun, 1 abstract), 4 regions with COCO-RLE masks
of object-like shapes, verdicts and adjudication log rows made by the real rules judge
(``stages.adjudicate``). The rows are built first; only ``write_shard`` (record checks, sample JSON,
tar, index/log/rejected parquet, stats; temp files renamed into place) is timed, pinned to one
core. Target: >= 1,350 samples/s (img2dataset's per-machine rate), so writing is never the
bottleneck of a build.

    python bench/write.py [--samples 4000] [--per-shard 1000] [--out bench/results/write.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 1350.0
CAPTION = "A man with a red helmet rides a small moped on a dirt road past two dogs while he smiles in the sun."
PHRASES = [("A man", None), ("a red helmet", None), ("a small moped", None), ("a dirt road", None),
           ("two dogs", None), ("he", "pronoun")]


def _jpegs(n: int = 4) -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for fn in (data.astronaut, data.chelsea, data.coffee, data.rocket)[:n]:
        img = Image.fromarray(fn()).convert("RGB").resize((640, 480), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _mask(h: int, w: int, box, rng) -> np.ndarray:
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    wobble = 1 + 0.15 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(3, 7))
    return ((xx - cx) ** 2 / rx ** 2 + (yy - cy) ** 2 / ry ** 2) <= wobble


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows as the adjudicate stage hands them to the writer."""
    from stages import record as rec
    from stages.adjudicate import AdjudicateConfig, AdjudicateStage
    from stages.record.rle import encode as encode_masks

    rng = np.random.default_rng(seed)
    jpegs = _jpegs()
    h, w = 480, 640
    templates = []  # a few distinct mask sets, reused (RLE strings are what the writer sees)
    for t in range(8):
        boxes = []
        for _ in range(4):
            x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            boxes.append([round(x0, 2), round(y0, 2), round(min(w, x0 + rng.uniform(60, 250)), 2),
                          round(min(h, y0 + rng.uniform(60, 200)), 2)])
        masks = np.stack([_mask(h, w, b, rng) for b in boxes])
        templates.append((boxes, encode_masks(masks), [int(m.sum()) for m in masks]))
    records = []
    for i in range(n):
        record = rec.new_record(f"bench-{i:07d}", {"dataset": "bench", "id": str(i)}, w, h, "%064x" % i,
                                {"caption": CAPTION})
        pos = 0
        for k, (phrase, skip) in enumerate(PHRASES):
            start = CAPTION.index(phrase, pos)
            pos = start + len(phrase)
            record["entities"].append({"id": k, "phrase": phrase, "start": start, "end": pos, "turn": -1,
                                       "root": phrase.split()[-1], "plural": phrase.endswith("s"),
                                       "status": "skipped" if skip else None, "regions": [],
                                       "reason": skip, "expression": {"start": start, "end": pos, "text": phrase}})
        boxes, rles, areas = templates[i % len(templates)]
        for r, (box, rle, area) in enumerate(zip(boxes, rles, areas)):
            record["regions"].append({"id": r, "entity": r, "box_xyxy": box, "det_score": round(0.4 + 0.1 * r, 5),
                                      "mask_rle": rle, "mask_score": 0.9, "area": area})
        record["provenance"].update(detector="IDEA-Research/grounding-dino-base@main",
                                    segmenter="facebook/sam-vit-huge@main", parser="spacy-3.8/en_core_web_sm-3.8.0")
        records.append(record)
    batch = {"seq": list(range(n)), "shard": [0] * n, "key": [r["key"] for r in records],
             "status": [rec.ROW_OK] * n, "reason": [""] * n, "image": [jpegs[i % len(jpegs)] for i in range(n)],
             "ext": ["jpg"] * n, "record": [rec.dumps(r) for r in records], "item": ["{}"] * n,
             "log": ["[]"] * n,
             "times": [json.dumps({"read": 0.004, "parse": 0.002, "ground_segment": 0.02, "adjudicate": 0.001})] * n}
    stage = AdjudicateStage(AdjudicateConfig(min_mask_score=0.0, min_det_score=0.0))
    stage.setup()
    out = stage(batch)
    return rec.rows(out)


def bench(samples: int, per_shard: int, repeats: int = 3) -> dict:
    from stages.write import ShardWriter

    rows = make_rows(per_shard)
    n_shards = max(1, samples // per_shard)
    best = None
    tmp = Path(tempfile.mkdtemp(prefix="lookandlearn-write-"))
    try:
        for rep in range(repeats):
            out = tmp / f"run{rep}"
            writer = ShardWriter(out, "bench")
            t = time.perf_counter()
            for shard in range(n_shards):
                writer.write_shard(shard, [dict(r, shard=shard) for r in rows])
            elapsed = time.perf_counter() - t
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            tar = sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))
            run = {"seconds": elapsed, "bytes": size, "tar_bytes": tar}
            if best is None or elapsed < best["seconds"]:
                best = run
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = n_shards * per_shard
    rate = n / best["seconds"]
    return {"samples": n, "samples_per_shard": per_shard, "repeats": repeats, "seconds_best": round(best["seconds"], 3),
            "samples_per_s": round(rate, 1), "mb_per_s": round(best["bytes"] / best["seconds"] / 1e6, 1),
            "bytes_per_sample": round(best["bytes"] / n), "tar_bytes_per_sample": round(best["tar_bytes"] / n),
            "target_samples_per_s": TARGET, "meets_target": rate >= TARGET}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "write.json"))
    args = ap.parse_args(argv)
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        pinned = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {pinned})  # one core: the writer runs in the driver process
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"benchmark": "write", "pinned_to_core": pinned, **bench(args.samples, args.per_shard, args.repeats)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
