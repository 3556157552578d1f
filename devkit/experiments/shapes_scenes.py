"""Controlled experiment data: scenes of the scene generator (``devkit/scenes.py``) narrowed to two
coloured shapes with exact masks, captions naming them ("a small red circle above a large blue
square") and questions ("what colour is the square?"), written as WebDataset shards in the
build's sample schema (docs/schema.md)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from devkit.scenes import Scene, SceneConfig, generate
from stages.record import rle, shards

# The experiment's narrow slice of the scene generator (devkit/scenes.py): two shapes of
# different kinds (four colours, three shapes, a size word each) apart on a grey canvas.
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (10, 14), "large": (18, 24)}  # half-extent range in pixels on a 112 canvas


def config(size: int = 112) -> SceneConfig:
    """The experiment's :class:`SceneConfig` on a ``size`` x ``size`` canvas."""
    return SceneConfig(objects=(2, 2), colours=COLOURS, shapes=SHAPES, size=(size, size),
                       size_ranges={w: (lo / 112, hi / 112) for w, (lo, hi) in SIZES.items()},
                       backgrounds=("plain",), plain_rgb=(128, 128, 128), plural_p=0.0, distractor_p=0.0,
                       occlusion_p=0.0, inside_p=0.0, hallucinate_p=0.0, distinct_shapes=True,
                       distinct_colours=True, gap=4)


def from_scene(scene: Scene) -> dict:
    """The experiment's view of a generated scene: image, two objects (shape, colour, size word,
    mask, centre, half-extent) and where the first is relative to the second."""
    objs = []
    for inst in scene.instances:
        x0, y0, x1, y1 = inst.box
        objs.append({"shape": inst.shape, "colour": inst.colour, "size": inst.size, "mask": inst.mask,
                     "cx": (x0 + x1 - 1) // 2, "cy": (y0 + y1 - 1) // 2, "r": (x1 - x0) // 2})
    a, b = objs
    dy, dx = b["cy"] - a["cy"], b["cx"] - a["cx"]
    rel = ("above" if dy > 0 else "below") if abs(dy) >= abs(dx) else ("left of" if dx > 0 else "right of")
    return {"image": scene.image, "objects": objs, "relation": rel}


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
        turn = -1  # the caption (stages.record.CAPTION_TURN)
    else:
        o = scene["objects"][question]
        answer = o["colour"]
        rec["text"] = {"conversations": [{"from": "human", "value": f"<image>\nwhat colour is the {o['shape']}?"},
                                         {"from": "gpt", "value": answer}]}
        spans, turn = [], -1
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


def scenes(n: int, seed: int, size: int = 112, split: str = "train") -> list[dict]:
    """The first ``n`` scenes of the generator's ``split`` stream for ``seed``, experiment-shaped."""
    cfg = config(size)
    return [from_scene(generate(seed, split, i, cfg)) for i in range(n)]
