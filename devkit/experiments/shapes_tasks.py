"""The shapes instrument's task: scenes, captions and questions, all from the scene generator.

Scenes come from ``devkit/scenes.py`` (deterministic by split, seed and index; the ``train``,
``val`` and ``test`` streams never share a scene), narrowed to one to three shapes of different
kinds and colours on a grey canvas. Each scene gives

* a caption naming every shape, each name an entity with its exact mask: "a small red circle
  above a large blue square and a large green triangle" (the relation word between the first
  two);
* questions whose answer is one word read off the scene (and is never in the question):

  ============  ==================================================  =========================
  type          question                                            answers
  ============  ==================================================  =========================
  colour        what colour is the circle?                          red, green, blue, yellow
  shape         what shape is the red one?                          circle, square, triangle
  count         how many shapes are there?                          one, two, three
  relation      where is the circle relative to the square?         above, below, left, right
  ============  ==================================================  =========================

  (relation: scenes with two or more shapes; the dominant axis of the centres' offset, as the
  caption's relation word). Every answer needs the image: the question text alone tells at
  most the answer's type.

Records follow the build's sample schema (docs/schema.md) without the image bytes: the training
and evaluation code hands the rendered array to ``stages.train.data.build_example`` directly.
"""
from __future__ import annotations

import numpy as np

from devkit.experiments.shapes_scenes import COLOURS, SHAPES, SIZES
from devkit.scenes import Scene, SceneConfig, generate
from stages.record import rle

QUESTION_TYPES = ("colour", "shape", "count", "relation")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("above", "below", "left", "right")
ANSWERS = {"colour": COLOURS, "shape": SHAPES, "count": tuple(COUNT_WORDS.values()), "relation": RELATIONS}


def config(size: int = 112, objects: tuple[int, int] = (1, 3)) -> SceneConfig:
    """The instrument's :class:`SceneConfig`: ``objects`` shapes of different kinds and colours,
    apart, on a plain grey ``size`` x ``size`` canvas (size words small / large as in
    ``shapes_scenes``)."""
    return SceneConfig(objects=objects, colours=COLOURS, shapes=SHAPES, size=(size, size),
                       size_ranges={w: (lo / 112, hi / 112) for w, (lo, hi) in SIZES.items()},
                       backgrounds=("plain",), plain_rgb=(128, 128, 128), plural_p=0.0, distractor_p=0.0,
                       occlusion_p=0.0, inside_p=0.0, hallucinate_p=0.0, distinct_shapes=True,
                       distinct_colours=True, gap=4)


def scene(seed: int, split: str, index: int, size: int = 112) -> Scene:
    """Scene ``index`` of the ``split`` stream for ``seed``."""
    return generate(seed, split, index, config(size))


def objects(sc: Scene) -> list[dict]:
    """Shape, colour, size word, mask and centre of each shape, in the generator's order."""
    out = []
    for inst in sc.instances:
        x0, y0, x1, y1 = inst.box
        out.append({"shape": inst.shape, "colour": inst.colour, "size": inst.size, "mask": inst.mask,
                    "cx": (x0 + x1 - 1) / 2, "cy": (y0 + y1 - 1) / 2})
    return out


def relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis of the offset between their centres."""
    dy, dx = a["cy"] - b["cy"], a["cx"] - b["cx"]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left" if dx < 0 else "right"


def phrase(o: dict) -> str:
    return f"a {o['size']} {o['colour']} {o['shape']}"


def caption(objs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The caption and the character span of each object's phrase."""
    parts = [phrase(o) for o in objs]
    text, spans = parts[0], [(0, len(parts[0]))]
    if len(objs) >= 2:
        rel = relation(objs[0], objs[1])
        text += f" {rel if rel in ('above', 'below') else rel + ' of'} "
        spans.append((len(text), len(text) + len(parts[1])))
        text += parts[1]
    if len(objs) == 3:
        text += " and "
        spans.append((len(text), len(text) + len(parts[2])))
        text += parts[2]
    return text + ".", spans


def ask(objs: list[dict], qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    """A question of type ``qtype`` about the scene and its one-word answer."""
    if qtype == "colour":
        o = objs[int(rng.integers(len(objs)))]
        return f"what colour is the {o['shape']}?", o["colour"]
    if qtype == "shape":
        o = objs[int(rng.integers(len(objs)))]
        return f"what shape is the {o['colour']} one?", o["shape"]
    if qtype == "count":
        return "how many shapes are there?", COUNT_WORDS[len(objs)]
    if qtype == "relation":
        if len(objs) < 2:
            raise ValueError("a relation question needs two shapes")
        i, j = (int(v) for v in rng.permutation(len(objs))[:2])
        return f"where is the {objs[i]['shape']} relative to the {objs[j]['shape']}?", relation(objs[i], objs[j])
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def question(objs: list[dict], rng: np.random.Generator) -> tuple[str, str, str]:
    """A question of a random type (uniform over the types the scene allows): (type, text, answer)."""
    allowed = [t for t in QUESTION_TYPES if t != "relation" or len(objs) >= 2]
    qtype = allowed[int(rng.integers(len(allowed)))]
    text, answer = ask(objs, qtype, rng)
    return qtype, text, answer


def question_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of the questions about one scene (apart from the scene's own)."""
    return np.random.default_rng([7, {"train": 0, "val": 1, "test": 2}[split], int(seed), int(index)])


def _record(key: str, sc: Scene) -> dict:
    h, w = sc.image.shape[:2]
    return {"key": key, "source": {"dataset": "shapes", "id": key}, "image": {"width": w, "height": h},
            "entities": [], "regions": [], "provenance": {"pipeline": "shapes-generator"}}


def caption_record(key: str, sc: Scene) -> dict:
    """A caption sample: every shape's phrase is a grounded entity with its exact mask."""
    objs = objects(sc)
    text, spans = caption(objs)
    rec = _record(key, sc)
    rec["text"] = {"caption": text}
    h, w = sc.image.shape[:2]
    for i, ((s, e), o) in enumerate(zip(spans, objs)):
        assert text[s:e] == phrase(o)
        (mask_rle,) = rle.encode(o["mask"][None])
        rec["regions"].append({"id": i, "entity": i, "box_xyxy": [0, 0, w, h], "det_score": 1.0,
                               "mask_rle": mask_rle, "mask_score": 1.0, "area": int(o["mask"].sum()),
                               "verdict": {"accept": True, "reason": "exact (generated)", "judge": "generator",
                                           "prompt": "none"}})
        rec["entities"].append({"id": i, "phrase": text[s:e], "start": s, "end": e, "turn": -1,
                                "root": o["shape"], "plural": False, "status": "grounded", "regions": [i]})
    return rec


def question_record(key: str, sc: Scene, qtype: str, text: str, answer: str) -> dict:
    """A one-turn question conversation; ``record["question"]`` holds its type and answer."""
    rec = _record(key, sc)
    rec["text"] = {"conversations": [{"from": "human", "value": f"<image>\n{text}"},
                                     {"from": "gpt", "value": answer}]}
    rec["question"] = {"type": qtype, "text": text, "answer": answer}
    return rec
