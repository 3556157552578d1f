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
ANSWER_FORMS = ("word", "sentence")   # the reply: the answer word alone, or a sentence naming its subject
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
    text, answer, _ = _ask(objs, qtype, rng)
    return text, answer


def name(o: dict, qtype: str) -> str:
    """How a question of ``qtype`` (and its sentence reply) names the object ``o``: by its colour
    when the shape is asked ("the red one"), else by its shape ("the circle")."""
    return f"the {o['colour']} one" if qtype == "shape" else f"the {o['shape']}"


def _ask(objs: list[dict], qtype: str, rng: np.random.Generator) -> tuple[str, str, tuple[int, ...]]:
    """(question, one-word answer, indices of the objects the question names, in order)."""
    if qtype == "colour":
        i = int(rng.integers(len(objs)))
        return f"what colour is {name(objs[i], qtype)}?", objs[i]["colour"], (i,)
    if qtype == "shape":
        i = int(rng.integers(len(objs)))
        return f"what shape is {name(objs[i], qtype)}?", objs[i]["shape"], (i,)
    if qtype == "count":
        return "how many shapes are there?", COUNT_WORDS[len(objs)], ()
    if qtype == "relation":
        if len(objs) < 2:
            raise ValueError("a relation question needs two shapes")
        i, j = (int(v) for v in rng.permutation(len(objs))[:2])
        return (f"where is {name(objs[i], qtype)} relative to {name(objs[j], qtype)}?", relation(objs[i], objs[j]),
                (i, j))
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def question(objs: list[dict], rng: np.random.Generator) -> tuple[str, str, str, tuple[int, ...]]:
    """A question of a random type (uniform over the types the scene allows): (type, text, answer,
    indices of the objects it names)."""
    allowed = [t for t in QUESTION_TYPES if t != "relation" or len(objs) >= 2]
    qtype = allowed[int(rng.integers(len(allowed)))]
    text, answer, named = _ask(objs, qtype, rng)
    return qtype, text, answer, named


def sentence(objs: list[dict], qtype: str, answer: str,
             named: tuple[int, ...]) -> tuple[str, int, list[tuple[int, int, int]]]:
    """The answer as a sentence that names its subject first, as instruction-tuned VLMs answer
    ("the circle is red.", "the red one is a circle.", "the circle is above the square.",
    "there are two." for every count, even one: its verb must not tell the answer): (sentence,
    character offset of the answer word, [(start, end, object index)] of the phrases it names,
    each a grounded entity of the answer turn)."""
    if qtype == "colour":
        subject = name(objs[named[0]], qtype)
        return f"{subject} is {answer}.", len(subject) + 4, [(0, len(subject), named[0])]
    if qtype == "shape":
        subject = name(objs[named[0]], qtype)
        return f"{subject} is a {answer}.", len(subject) + 6, [(0, len(subject), named[0])]
    if qtype == "count":
        # one form for every count: "there is one" would give the answer away in its verb
        return f"there are {answer}.", 10, []
    if qtype == "relation":
        a, b = (name(objs[i], qtype) for i in named[:2])
        head = f"{a} is "
        text = f"{head}{answer if answer in ('above', 'below') else answer + ' of'} {b}."
        return text, len(head), [(0, len(a), named[0]), (len(text) - 1 - len(b), len(text) - 1, named[1])]
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def question_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of the questions about one scene (apart from the scene's own)."""
    return np.random.default_rng([7, {"train": 0, "val": 1, "test": 2}[split], int(seed), int(index)])


def _record(key: str, sc: Scene) -> dict:
    h, w = sc.image.shape[:2]
    return {"key": key, "source": {"dataset": "shapes", "id": key}, "image": {"width": w, "height": h},
            "entities": [], "regions": [], "provenance": {"pipeline": "shapes-generator"}}


def _ground(rec: dict, text: str, start: int, end: int, turn: int, root: str, mask: np.ndarray) -> None:
    """Add the phrase ``text[start:end]`` of ``turn`` to ``rec`` as a grounded entity whose one
    accepted region is the exact ``mask``."""
    n = len(rec["entities"])
    h, w = mask.shape
    (mask_rle,) = rle.encode(mask[None])
    rec["regions"].append({"id": n, "entity": n, "box_xyxy": [0, 0, w, h], "det_score": 1.0,
                           "mask_rle": mask_rle, "mask_score": 1.0, "area": int(mask.sum()),
                           "verdict": {"accept": True, "reason": "exact (generated)", "judge": "generator",
                                       "prompt": "none"}})
    rec["entities"].append({"id": n, "phrase": text[start:end], "start": start, "end": end, "turn": turn,
                            "root": root, "plural": False, "status": "grounded", "regions": [n]})


def caption_record(key: str, sc: Scene) -> dict:
    """A caption sample: every shape's phrase is a grounded entity with its exact mask."""
    objs = objects(sc)
    text, spans = caption(objs)
    rec = _record(key, sc)
    rec["text"] = {"caption": text}
    for (s, e), o in zip(spans, objs):
        assert text[s:e] == phrase(o)
        _ground(rec, text, s, e, -1, o["shape"], o["mask"])
    return rec


def question_phrases(objs: list[dict], qtype: str, text: str, named: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """[(start, end, object index)] of the phrases a question names ("the circle", "the red one";
    both shapes of a relation question), in the question ``text``."""
    if qtype == "count":
        return []
    out, cursor = [], 0
    for i in named:
        said = name(objs[i], qtype)
        s = text.index(said, cursor)
        out.append((s, s + len(said), i))
        cursor = s + len(said)
    return out


def question_record(key: str, sc: Scene, qtype: str, text: str, answer: str, named: tuple[int, ...] = (),
                    form: str = "word", ground_question: bool = False) -> dict:
    """A one-turn question conversation; ``record["question"]`` holds its type and answer (and
    ``answer_start``, the answer word's character offset in the reply). ``form="sentence"``: the
    reply is :func:`sentence`, and the phrases it names are grounded entities of turn 1 with their
    exact masks (what the engine makes of a LLaVA answer that names what it talks about).
    ``ground_question``: the phrases the question names are grounded entities of turn 0 too (the
    offsets count the ``<image>`` tag, as the schema's do)."""
    if form not in ANSWER_FORMS:
        raise ValueError(f"answer form must be one of {ANSWER_FORMS}, got {form!r}")
    rec = _record(key, sc)
    objs = objects(sc) if form == "sentence" or ground_question else []
    reply, start, phrases = (answer, 0, []) if form == "word" else sentence(objs, qtype, answer, named)
    rec["text"] = {"conversations": [{"from": "human", "value": f"<image>\n{text}"},
                                     {"from": "gpt", "value": reply}]}
    rec["question"] = {"type": qtype, "text": text, "answer": answer, "answer_start": start}
    if ground_question:
        asked = rec["text"]["conversations"][0]["value"]
        tag = len(asked) - len(text)
        for s, e, i in question_phrases(objs, qtype, text, named):
            _ground(rec, asked, tag + s, tag + e, 0, asked[tag + s:tag + e].split()[-1], objs[i]["mask"])
    for s, e, i in phrases:
        _ground(rec, reply, s, e, 1, reply[s:e].split()[-1], objs[i]["mask"])
    return rec
