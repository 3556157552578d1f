"""The one scene generator: coloured shapes with exact instance masks, captions, conversations and
per-phrase truth, for the offline sample, the tests and the experiments.

A :class:`Scene` holds the RGB image, its :class:`Instance` objects (shape, colour, size word,
box and the *visible* mask: an object drawn later hides the pixels of an earlier one it
overlaps, and the earlier mask excludes them), a caption and an LLaVA-style conversation whose
noun phrases are :class:`Phrase` spans listing the instances they name. A phrase that names
nothing in the image (real captions hallucinate) lists none.

Scenes are deterministic by ``(split, seed, index)``: :func:`generate` seeds numpy from all three,
so the ``train``, ``val`` and ``test`` streams (:func:`stream`) never share a scene. What a
scene may hold is a :class:`SceneConfig` (objects 1-6, every colour and shape, size words, plural
groups, distractors, occlusion, "inside" pairs, plain / gradient / noise / photo backgrounds,
256-800 px sides with aspect ratios 3:4 to 16:9); experiments narrow it.

Phrases are written the way the engine's parser (spaCy noun chunks, ``stages/phrases.py``)
extracts them: "a small red circle", "two green triangles", so truth spans line up with the
entities of a build. :meth:`Scene.truth` is one line of the truth file that ``lookandlearn
evaluate labels`` reads (README, "Evaluate labels").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (235, 215, 25), "green": (30, 165, 50),
    "blue": (30, 70, 220), "purple": (130, 45, 175), "pink": (245, 125, 185), "brown": (125, 75, 30),
    "black": (15, 15, 15), "white": (250, 250, 250), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "rectangle", "triangle", "star", "diamond", "hexagon", "ellipse")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES} | {"ellipse": "ellipses"}
# half-extent as a fraction of the image's short side; None: no size word in the phrase
SIZE_RANGES: dict[str | None, tuple[float, float]] = {
    "tiny": (0.04, 0.06), "small": (0.065, 0.09), None: (0.09, 0.13), "large": (0.14, 0.19), "big": (0.14, 0.19)}
BACKGROUNDS = ("plain", "gradient", "noise", "photo")
# (name used in captions, RGB) of the plain / gradient / noise background tints
TINTS = (("white", (250, 250, 250)), ("light gray", (215, 215, 215)), ("gray", (140, 140, 140)),
         ("beige", (235, 225, 200)), ("light blue", (200, 220, 245)), ("dark blue", (20, 30, 75)),
         ("dark green", (25, 60, 35)))
SPLITS = {"train": 0, "val": 1, "test": 2}
NUMBERS = {2: "two", 3: "three"}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "stereo_motorcycle")


@dataclass(frozen=True)
class SceneConfig:
    """What a scene may hold. ``size``: a fixed (width, height), else drawn from ``side`` and
    ``aspect`` (width / height). ``size_ranges`` maps each allowed size word (None: none) to the
    half-extent range, a fraction of the short side."""
    objects: tuple[int, int] = (1, 6)
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    size_ranges: dict = field(default_factory=lambda: dict(SIZE_RANGES))
    size: tuple[int, int] | None = None
    side: tuple[int, int] = (256, 800)
    aspect: tuple[float, float] = (3 / 4, 16 / 9)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    plain_rgb: tuple[int, int, int] | None = None      # a fixed plain background colour
    plural_p: float = 0.35        # a group of two or three alike objects
    distractor_p: float = 0.5     # a second group with the same shape or the same colour
    occlusion_p: float = 0.3      # objects may overlap (each keeps >= min_visible of itself)
    inside_p: float = 0.15        # one small object drawn inside a larger one
    hallucinate_p: float = 0.25   # the caption names one object that is not in the image
    distinct_shapes: bool = False  # no two groups share a shape
    distinct_colours: bool = False  # no two groups share a colour
    min_visible: float = 0.5
    gap: int = 4                  # pixels between objects that must not overlap


@dataclass
class Instance:
    id: int
    shape: str
    colour: str
    size: str | None
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 of the whole shape (exclusive x1, y1)
    mask: np.ndarray                 # (H, W) bool, the pixels of this object that are visible
    group: int                       # instances of one group share shape and colour, one phrase names them
    geometry: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # cx, cy, rx, ry (shape_mask's arguments)


@dataclass
class Phrase:
    text: str
    start: int
    end: int
    instances: list[int]     # ids of the instances it names; empty: names nothing in the image
    turn: int | None = None  # None: the caption; else the index into the conversation


@dataclass
class Scene:
    image: np.ndarray        # (H, W, 3) uint8
    instances: list[Instance]
    caption: str
    phrases: list[Phrase]    # the caption's phrases
    conversation: list[dict]  # LLaVA turns {"from": "human" | "gpt", "value": ...}
    conversation_phrases: list[Phrase]
    background: str
    split: str
    seed: int
    index: int
    relation: str | None = None   # the relation word between the caption's first two groups

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)

    def union_mask(self, ids: list[int]) -> np.ndarray:
        h, w = self.image.shape[:2]
        out = np.zeros((h, w), bool)
        for i in ids:
            out |= self.instances[i].mask
        return out

    def truth(self, sample_id: str, conversation: bool = False) -> dict:
        """One line of a truth file: ``{"id", "entities": [{"turn", "start", "end", "phrase", "mask"}]}``,
        ``mask`` the COCO RLE of the union of the named instances, None for a phrase naming nothing."""
        from stages.record import rle

        phrases = self.conversation_phrases if conversation else self.phrases
        entities = []
        for p in phrases:
            mask = rle.encode(self.union_mask(p.instances)[None])[0] if p.instances else None
            entities.append({"turn": p.turn, "start": p.start, "end": p.end, "phrase": p.text, "mask": mask})
        return {"id": sample_id, "entities": entities}


# --- drawing ------------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, rx: float, ry: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
    if shape == "diamond":
        return [(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)]
    if shape == "hexagon":
        return [(cx + rx * math.cos(math.pi / 3 * k), cy + ry * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":
        return [(cx + (rx if k % 2 == 0 else rx * 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (ry if k % 2 == 0 else ry * 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    return None


def _extent(shape: str, r: float, rng: np.random.Generator) -> tuple[float, float]:
    """Half width and half height of a shape of half-extent ``r``."""
    if shape in ("rectangle", "ellipse"):
        long, short = r, r * float(rng.uniform(0.45, 0.62))
        return (long, short) if rng.random() < 0.7 else (short, long)
    if shape == "diamond":
        return r * 0.72, r
    return r, r


def shape_mask(shape: str, cx: float, cy: float, rx: float, ry: float, width: int, height: int) -> np.ndarray:
    """The pixels of one filled shape (PIL rasterisation, no anti-aliasing), (height, width) bool."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    if shape in ("circle", "ellipse"):
        draw.ellipse(box, fill=1)
    elif shape in ("square", "rectangle"):
        draw.rectangle(box, fill=1)
    else:
        draw.polygon(_polygon(shape, cx, cy, rx, ry), fill=1)
    return np.asarray(canvas, dtype=bool)


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray | None:
    try:
        import skimage.data as skdata

        arr = skdata.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(skdata, name)()
    except Exception:        # not bundled in this scikit-image version (would need a download)
        return None
    arr = np.asarray(arr)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]


def _background(kind: str, w: int, h: int, rng: np.random.Generator, cfg: SceneConfig):
    """(image, caption words for it or None, the colours it is made of)."""
    if kind == "photo":
        for name in rng.permutation(PHOTOS):
            photo = _photo(str(name))
            if photo is None:
                continue
            ph, pw = photo.shape[:2]
            scale = max(w / pw, h / ph) * float(rng.uniform(1.0, 1.4))
            img = Image.fromarray(photo).resize((max(w, round(pw * scale)), max(h, round(ph * scale))))
            x0 = int(rng.integers(0, img.width - w + 1))
            y0 = int(rng.integers(0, img.height - h + 1))
            arr = np.asarray(img.crop((x0, y0, x0 + w, y0 + h)).convert("RGB")).copy()
            return arr, None, [tuple(int(v) for v in arr.reshape(-1, 3).mean(0))]
        kind = "gradient"      # no photo available: fall back
    if cfg.plain_rgb is not None and kind == "plain":
        return np.full((h, w, 3), cfg.plain_rgb, np.uint8), None, [cfg.plain_rgb]
    name, rgb = TINTS[int(rng.integers(len(TINTS)))]
    base = np.full((h, w, 3), rgb, np.float32)
    if kind == "plain":
        return base.astype(np.uint8), name, [rgb]
    if kind == "gradient":
        _, rgb2 = TINTS[int(rng.integers(len(TINTS)))]
        angle = float(rng.uniform(0, 2 * math.pi))
        yy, xx = np.mgrid[:h, :w]
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
        return (base * (1 - t) + np.asarray(rgb2, np.float32) * t).astype(np.uint8), None, [rgb, rgb2]
    noise = rng.normal(0, 22, (h // 4 + 1, w // 4 + 1, 1)).astype(np.float32)
    noise = np.asarray(Image.fromarray(noise[..., 0]).resize((w, h), Image.Resampling.BILINEAR))[..., None]
    return np.clip(base + noise + rng.normal(0, 8, (h, w, 1)), 0, 255).astype(np.uint8), None, [rgb]


def _far(rgb, others, limit: float = 90.0) -> bool:
    return all(math.dist(rgb, o) >= limit for o in others)


# --- words --------------------------------------------------------------------------------------

def noun_phrase(count: int, colour: str, shape: str, size: str | None = None) -> str:
    words = ([size] if size else []) + [colour, shape if count == 1 else PLURALS[shape]]
    if count == 1:
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return f"{NUMBERS.get(count, str(count))} " + " ".join(words)


def _relation(a: tuple, b: tuple) -> str:
    """Where box ``a`` is relative to box ``b`` (boxes x0, y0, x1, y1), by their centres."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    gap = max(a[0], b[0]) - min(a[2], b[2])     # horizontal space between the boxes
    if gap < 0.5 * max(a[2] - a[0], b[2] - b[0]) and abs(dy) < 0.5 * max(a[3] - a[1], b[3] - b[1]):
        return "next to"
    return "to the left of" if dx < 0 else "to the right of"


class _Text:
    """A text built piece by piece, recording the spans of the noun phrases put in it."""

    def __init__(self, turn: int | None = None):
        self.text, self.phrases, self.turn = "", [], turn

    def add(self, words: str, instances: list[int] | None = None) -> _Text:
        if instances is not None:
            self.phrases.append(Phrase(words, len(self.text), len(self.text) + len(words), list(instances), self.turn))
        self.text += words
        return self

    def capitalise(self) -> _Text:
        self.text = self.text[:1].upper() + self.text[1:]
        if self.phrases and self.phrases[0].start == 0:
            self.phrases[0].text = self.text[:self.phrases[0].end]
        return self


def _listing(t: _Text, items: list[tuple[str, list[int]]]) -> None:
    for k, (words, ids) in enumerate(items):
        if k:
            t.add(" and " if k == len(items) - 1 else ", ")
        t.add(words, ids)


# --- the scene ------------------------------------------------------------------------------------

def _groups(rng: np.random.Generator, cfg: SceneConfig) -> list[dict]:
    n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    words = list(cfg.size_ranges)
    groups, used, left = [], set(), n
    while left > 0:
        count = 1
        if left >= 2 and rng.random() < cfg.plural_p:
            count = int(min(left, rng.integers(2, 4)))
        for _ in range(50):
            if groups and rng.random() < cfg.distractor_p:    # same shape or same colour as one before
                other = groups[int(rng.integers(len(groups)))]
                keep_shape = rng.random() < 0.5 and not cfg.distinct_shapes
                shape = other["shape"] if keep_shape else str(rng.choice(cfg.shapes))
                colour = str(rng.choice(cfg.colours)) if keep_shape else other["colour"]
            else:
                shape, colour = str(rng.choice(cfg.shapes)), str(rng.choice(cfg.colours))
            if (shape, colour) not in used and not (cfg.distinct_shapes and shape in {s for s, _ in used}) \
                    and not (cfg.distinct_colours and colour in {c for _, c in used}):
                break
        else:
            break
        used.add((shape, colour))
        groups.append({"shape": shape, "colour": colour, "count": count,
                       "size": words[int(rng.integers(len(words)))]})
        left -= count
    return groups


def _place(rng, cfg: SceneConfig, groups: list[dict], w: int, h: int, bg_colours) -> list[dict] | None:
    """Shapes with centres and extents, in drawing order; None when they do not fit."""
    short = min(w, h)
    overlap = rng.random() < cfg.occlusion_p
    objs: list[dict] = []
    inside = len(groups) >= 2 and groups[0]["count"] == 1 and groups[1]["count"] == 1 and rng.random() < cfg.inside_p
    if inside:   # the size words say what the drawing does: a large outer, a small or tiny inner
        groups[0]["size"] = next((s for s in ("large", "big") if s in cfg.size_ranges), groups[0]["size"])
        groups[1]["size"] = next((s for s in ("small", "tiny") if s in cfg.size_ranges), groups[1]["size"])
    for g, grp in enumerate(groups):
        for _ in range(grp["count"]):
            lo, hi = cfg.size_ranges[grp["size"]]
            r = max(3.0, float(rng.uniform(lo, hi)) * short)
            rx, ry = _extent(grp["shape"], r, rng)
            objs.append({"group": g, "shape": grp["shape"], "colour": grp["colour"], "size": grp["size"],
                         "rx": rx, "ry": ry})
    if inside:   # the second group's object sits inside the first group's, drawn after it
        outer, inner = objs[0], objs[1]
        inner["inside"] = True
        big = cfg.size_ranges.get("large") or max(cfg.size_ranges.values())
        outer["rx"], outer["ry"] = (v * max(big) * short / max(outer["rx"], outer["ry"]) for v in (outer["rx"], outer["ry"]))
        scale = 0.3 * min(outer["rx"], outer["ry"]) / max(inner["rx"], inner["ry"])
        inner["rx"], inner["ry"] = inner["rx"] * scale, inner["ry"] * scale
    for k, o in enumerate(objs):
        for _ in range(60):
            if inside and k == 1:
                o["cx"], o["cy"] = objs[0]["cx"], objs[0]["cy"] + (objs[0]["ry"] * 0.25 if objs[0]["shape"] == "triangle" else 0)
            else:
                o["cx"] = float(rng.uniform(o["rx"] + 2, w - o["rx"] - 2))
                o["cy"] = float(rng.uniform(o["ry"] + 2, h - o["ry"] - 2))
            ok = True
            for j, p in enumerate(objs[:k]):
                if inside and k == 1:
                    break
                apart = (abs(o["cx"] - p["cx"]) > o["rx"] + p["rx"] + cfg.gap
                         or abs(o["cy"] - p["cy"]) > o["ry"] + p["ry"] + cfg.gap)
                if not apart and not overlap:
                    ok = False
                    break
            if ok:
                break
        else:
            return None
    return objs


def generate(seed: int = 0, split: str = "train", index: int = 0, config: SceneConfig | None = None) -> Scene:
    """Scene ``index`` of the ``split`` stream for ``seed`` (deterministic; splits never share a scene)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    cfg = config or SceneConfig()
    rng = np.random.default_rng([SPLITS[split], int(seed), int(index)])
    for _ in range(500):
        scene = _attempt(rng, cfg, split, seed, index)
        if scene is not None:
            return scene
    raise ValueError(f"no scene fits this SceneConfig after 500 tries (too many or too large objects "
                     f"for the canvas?): {cfg}")


def stream(split: str = "train", seed: int = 0, config: SceneConfig | None = None, start: int = 0) -> Iterator[Scene]:
    """The scenes of one split, index ``start``, ``start + 1``, ... (endless)."""
    index = start
    while True:
        yield generate(seed, split, index, config)
        index += 1


def _attempt(rng, cfg: SceneConfig, split: str, seed: int, index: int) -> Scene | None:
    if cfg.size:
        w, h = cfg.size
    else:
        while True:
            h = int(rng.integers(cfg.side[0], cfg.side[1] + 1))
            w = round(h * float(rng.uniform(*cfg.aspect)))
            if cfg.side[0] <= w <= cfg.side[1]:
                break
    kind = str(rng.choice(cfg.backgrounds))
    image, bg_name, bg_colours = _background(kind, w, h, rng, cfg)
    colours = tuple(c for c in cfg.colours if _far(COLOURS[c], bg_colours)) or cfg.colours
    groups = _groups(rng, replace(cfg, colours=colours))
    objs = _place(rng, cfg, groups, w, h, bg_colours)
    if objs is None:
        return None
    full = [shape_mask(o["shape"], o["cx"], o["cy"], o["rx"], o["ry"], w, h) for o in objs]
    visible = [m.copy() for m in full]
    for k, m in enumerate(full):
        for j in range(k):
            visible[j] &= ~m
    if any(v.sum() < cfg.min_visible * max(f.sum(), 1) or not f.any() for v, f in zip(visible, full)):
        return None
    instances = []
    for k, (o, m) in enumerate(zip(objs, full)):
        image[m] = COLOURS[o["colour"]]
        box = (max(0, math.floor(o["cx"] - o["rx"])), max(0, math.floor(o["cy"] - o["ry"])),
               min(w, math.ceil(o["cx"] + o["rx"]) + 1), min(h, math.ceil(o["cy"] + o["ry"]) + 1))
        instances.append(Instance(k, o["shape"], o["colour"], o["size"], box, visible[k], o["group"],
                                  (o["cx"], o["cy"], o["rx"], o["ry"])))
    inside = (1, 0) if objs[1:] and objs[1].get("inside") else None
    return _describe(rng, cfg, image, instances, groups, kind, bg_name, split, seed, index, inside)


def _group_box(instances: list[Instance], g: int) -> tuple:
    boxes = [i.box for i in instances if i.group == g]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _describe(rng, cfg, image, instances, groups, kind, bg_name, split, seed, index, inside) -> Scene:
    def rel(a: int, b: int) -> str:     # group a relative to group b
        if inside and (a, b) in (inside, inside[::-1]):
            return "inside" if (a, b) == inside else "around"
        return _relation(_group_box(instances, a), _group_box(instances, b))

    items = []
    for g, grp in enumerate(groups):
        ids = [i.id for i in instances if i.group == g]
        items.append((noun_phrase(len(ids), grp["colour"], grp["shape"], grp["size"]), ids))
    ghost = None
    if rng.random() < cfg.hallucinate_p:
        present = {(grp["shape"], grp["colour"]) for grp in groups}
        absent = [(s, c) for s in cfg.shapes for c in cfg.colours if (s, c) not in present]
        if absent:
            s, c = absent[int(rng.integers(len(absent)))]
            ghost = (noun_phrase(1, c, s), [])
    order = [int(v) for v in rng.permutation(len(items))]
    if inside:
        order = [1, 0] + [k for k in order if k > 1]
    items = [items[k] for k in order]
    relation = None
    if ghost is not None:
        items.insert(int(rng.integers(1, len(items) + 1)), ghost)
    t = _Text()
    style = int(rng.integers(4))
    bg = f" on a {bg_name} background" if bg_name and rng.random() < 0.5 else ""
    real = [k for k, it in enumerate(items) if it[1]]
    if len(real) >= 2 and style < 2 and real[:2] == [0, 1]:
        a, b = items[0], items[1]
        relation = rel(instances[a[1][0]].group, instances[b[1][0]].group)
        if style == 1:
            t.add("In this image, ")
        t.add(a[0], a[1]).add(f" {'is' if len(a[1]) == 1 else 'are'} " if style == 1 else " ")
        t.add(f"{relation} ").add(b[0], b[1])
        rest = items[2:]
        if rest:
            t.add(", with ")
            _listing(t, rest)
    elif style == 2:
        t.add("A picture of ")
        _listing(t, items)
    else:
        t.add(f"There {'is' if len(items[0][1]) <= 1 else 'are'} ")
        _listing(t, items)
    t.add(bg + ".").capitalise()
    caption, phrases = t.text, t.phrases

    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]
    conv_phrases = [replace(p, turn=1) for p in phrases]
    g = int(rng.integers(len(groups)))
    ids = [i.id for i in instances if i.group == g]
    grp = groups[g]
    name = grp["shape"] if len(ids) == 1 else PLURALS[grp["shape"]]
    conv.append({"from": "human", "value": f"Where {'is' if len(ids) == 1 else 'are'} the {grp['colour']} {name}?"})
    answer = _Text(turn=3).add(f"the {grp['colour']} {name}", ids)
    others = [k for k in range(len(groups)) if k != g]
    if others:
        o = others[int(rng.integers(len(others)))]
        oids = [i.id for i in instances if i.group == o]
        answer.add(f" {'is' if len(ids) == 1 else 'are'} {rel(g, o)} ")
        answer.add(noun_phrase(len(oids), groups[o]["colour"], groups[o]["shape"]), oids)
    else:
        answer.add(f" {'is' if len(ids) == 1 else 'are'} the only shape{'s' if len(ids) > 1 else ''}")
    answer.add(".").capitalise()
    conv.append({"from": "gpt", "value": answer.text})
    return Scene(image, instances, caption, phrases, conv, conv_phrases + answer.phrases, kind, split, seed, index,
                 relation)
