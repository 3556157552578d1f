"""Controlled experiment data: scenes of simple coloured shapes with exact masks, captions naming
them ("a red circle above a small blue square") and questions ("what colour is the square?"),
written as WebDataset shards in the build's sample schema (docs/schema.md)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from stages.record import rle, shards

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (10, 14), "large": (18, 24)}  # half-extent range in pixels on a 112 canvas


def _shape_mask(kind: str, cy: int, cx: int, r: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    # triangle pointing up
    top, bottom = cy - r, cy + r
    half = (yy - top) / max(2 * r, 1) * r
    return (yy >= top) & (yy <= bottom) & (abs(xx - cx) <= half)


def make_scene(rng: np.random.Generator, size: int = 112) -> dict:
    """Two distinct shapes (different kind) at non-overlapping places on a grey canvas."""
    while True:
        kinds = rng.choice(len(SHAPES), 2, replace=False)
        colours = rng.choice(list(COLOURS), 2, replace=False)
        sizes = rng.choice(list(SIZES), 2)
        objs = []
        for k, c, s in zip(kinds, colours, sizes):
            r = int(rng.integers(*SIZES[s]))
            cy, cx = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
            objs.append({"shape": SHAPES[k], "colour": str(c), "size": str(s), "r": r, "cy": cy, "cx": cx})
        a, b = objs
        if max(abs(a["cy"] - b["cy"]), abs(a["cx"] - b["cx"])) > a["r"] + b["r"] + 4:
            break
    img = np.full((size, size, 3), 128, np.uint8)
    for o in objs:
        m = _shape_mask(o["shape"], o["cy"], o["cx"], o["r"], size, size)
        o["mask"] = m
        img[m] = COLOURS[o["colour"]]
    dy, dx = b["cy"] - a["cy"], b["cx"] - a["cx"]
    rel = ("above" if dy > 0 else "below") if abs(dy) >= abs(dx) else ("left of" if dx > 0 else "right of")
    return {"image": img, "objects": objs, "relation": rel}


def phrase(o: dict) -> str:
    return f"a {o['size']} {o['colour']} {o['shape']}"


def scene_record(key: str, scene: dict, question: int | None = None) -> tuple[dict, bytes]:
    """A sample record (caption sample, or a question conversation when ``question`` is the index
    of the object asked about) and its PNG bytes."""
    from PIL import Image

    img = scene["image"]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    data = buf.getvalue()
    h, w = img.shape[:2]
    a, b = scene["objects"]
    rec = {"key": key, "source": {"dataset": "shapes", "id": key},
           "image": {"width": w, "height": h, "sha256": hashlib.sha256(data).hexdigest()},
           "entities": [], "regions": [], "provenance": {"pipeline": "shapes-generator"}}
    if question is None:
        pa, pb = phrase(a), phrase(b)
        caption = f"{pa} {scene['relation']} {pb}."
        rec["text"] = {"caption": caption}
        spans = [(0, len(pa)), (len(pa) + len(scene["relation"]) + 2, len(pa) + len(scene["relation"]) + 2 + len(pb))]
        turn = None
    else:
        o = scene["objects"][question]
        answer = o["colour"]
        rec["text"] = {"conversations": [{"from": "human", "value": f"<image>\nwhat colour is the {o['shape']}?"},
                                         {"from": "gpt", "value": answer}]}
        spans, turn = [], None
        rec["question"] = {"shape": o["shape"], "answer": answer}
    for i, (s, e) in enumerate(spans):
        o = scene["objects"][i]
        text = rec["text"]["caption"]
        assert text[s:e] == phrase(o)
        (mask_rle,) = rle.encode(o["mask"][None])
        rec["regions"].append({"id": i, "entity": i, "box_xyxy": [0, 0, w, h], "det_score": 1.0, "mask_rle": mask_rle,
                               "mask_score": 1.0, "area": int(o["mask"].sum()),
                               "verdict": {"accept": True, "reason": "exact (generated)", "judge": "generator",
                                           "prompt": "none"}})
        rec["entities"].append({"id": i, "phrase": text[s:e], "start": s, "end": e, "turn": turn,
                                "root": o["shape"], "plural": False, "status": "grounded", "regions": [i]})
    return rec, data


def write_shard(path: str | Path, items: list[tuple[dict, bytes]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tar.tmp")
    shards.write_tar(tmp, (member for rec, data in items
                           for member in shards.sample_members(rec["key"], "png", data, json.dumps(rec))))
    tmp.replace(path)
    return path


def scenes(n: int, seed: int, size: int = 112) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size) for _ in range(n)]
