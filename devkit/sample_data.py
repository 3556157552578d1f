"""Offline sample inputs: generated shape scenes, scikit-image's bundled photos, and bad inputs.

:func:`write_sample_data` writes ``captions.jsonl`` (the ``jsonl`` input format) plus
``images/`` and ``truth.jsonl``. The good rows are twelve scenes of the scene generator
(``devkit/scenes.py``: coloured shapes on plain, gradient, noise and photo backgrounds, plural
groups, occlusion, and captions that sometimes name a shape that is not there), a few natural
photos that ship inside ``skimage.data`` (no download), and one EXIF-rotated JPEG.
``truth.jsonl`` holds the exact masks of the generated scenes' phrases (and the rotated one's),
the gold labels ``lookandlearn evaluate labels OUT --truth`` reads.
The rest shows what the read stage does with bad input: a zero-byte file, a truncated JPEG,
an animated GIF, a missing file, an absurd 4000x4 strip, an empty caption, a duplicate id
(all rejected), a caption without nouns (read fine; nothing to ground), and a 16-bit PNG,
a CMYK JPEG and an RGBA PNG (converted with ``image.modes: convert``, rejected with
``reject``).
After those 30 rows (the showcase) come 120 held-out scenes of the same generator stream
(``heldout-NNN``, also in ``truth.jsonl``), so that ``lookandlearn evaluate labels`` on the sample
build measures its labels with power (~340 phrases that name an object);
``manifests/sample-random.yaml`` stops before them (``input.limit``).

:func:`write_sample_variants` writes the showcase's good images as a LLaVA JSON, a COCO captions
annotations file and WebDataset tars, for the other readers.

Both are deterministic and idempotent: a folder that already holds the complete set (checked
against a stamp with every file's sha256) is left alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from devkit import scenes
from stages.record.shards import write_tar

SAMPLE_VERSION = 3
_STAMP = ".sample-data.json"
_VARIANTS_STAMP = ".sample-variants.json"

# --- the generated scenes ----------------------------------------------------------------
# Twelve scenes of the one scene generator (devkit/scenes.py), stream "test", seed SCENE_SEED:
# chosen so that they hold every background kind (plain, gradient, noise, photo), plural groups,
# occlusion, an "inside" pair and phrases that name nothing. Their exact masks go to truth.jsonl.

SCENE_SEED = 14
_SCENE_FILES = ["scene-01.jpg", "scene-02.png", "scene-03.jpg", "scene-04.jpg", "scene-05.webp", "scene-06.jpg",
                "scene-07.png", "scene-08.png", "scene-09.jpg", "scene-10.jpg", "scene-11.png", "scene-12.jpg"]


def sample_scenes() -> list[tuple[str, "scenes.Scene"]]:
    """(file name, scene) of the sample's twelve showcase scenes."""
    return [(name, scenes.generate(SCENE_SEED, "test", k)) for k, name in enumerate(_SCENE_FILES)]


# --- the held-out scenes -------------------------------------------------------------------
# 120 more scenes of the same stream (indices 12..131), after every other row of captions.jsonl:
# enough phrases (~330 that name an object, ~30 that name nothing) for `evaluate labels` on the
# sample build to show the label targets (precision, recall, false grounding) with a standard
# error of ~0.02, which the twelve showcase scenes (32 named phrases) cannot. The thresholds of
# manifests/sample.yaml were chosen on another seed (bench/labels_sweep.py), so these scenes
# measure them without having picked them. manifests/sample-random.yaml (the tests' wiring
# build) stops before them with input.limit.
HELDOUT_SCENES = 120
SHOWCASE_ROWS = 30          # the captions.jsonl rows before them (sample-random.yaml's input.limit)


def _heldout_names() -> list[str]:
    """File names of the held-out scenes (JPEG and PNG alternately)."""
    return [f"heldout-{n:03d}.{'jpg' if n % 2 else 'png'}" for n in range(1, HELDOUT_SCENES + 1)]


def heldout_scenes() -> list[tuple[str, "scenes.Scene"]]:
    """(file name, scene) of the sample's held-out scenes: the stream's scenes after the showcase's."""
    first = len(_SCENE_FILES)
    return [(name, scenes.generate(SCENE_SEED, "test", first + k)) for k, name in enumerate(_heldout_names())]


# EXIF orientation 6: the file holds the picture turned 90 degrees counter-clockwise.
_ROTATED = ("rotated-exif6.jpg", (480, 640), "white",
            [("circle", "orange", (170, 60, 310, 200)), ("rectangle", "purple", (190, 300, 290, 600))],
            "a tall purple rectangle below an orange circle")

# Photos bundled with scikit-image (skimage/data/*.png|jpg; these need no download).
_NATURAL = [
    ("astronaut", "astronaut.jpg",
     "A smiling astronaut in an orange spacesuit in front of an American flag, "
     "with a helmet in front of her and a model space shuttle behind her."),
    ("coffee", "coffee.jpg",
     "A red cup of espresso on a red saucer with a metal spoon, on a wooden table."),
    ("chelsea", "chelsea.jpg", "A close-up of a tabby cat with green eyes and a pink nose."),
    ("rocket", "rocket.jpg",
     "A white rocket on a launch pad between tall metal towers under an evening sky."),
    ("camera", "camera.png",
     "A man in a dark coat looking through a camera on a tripod in a grassy field, "
     "with buildings in the distance."),
    ("motorcycle", "motorcycle.jpg",
     "A red motorcycle parked in a garage in front of shelves with boxes and a wooden bench."),
]


def _draw_scene(size, background, shapes) -> Image.Image:
    """A drawn scene from explicit shapes (kind, PIL colour, box), painted through the scene
    generator's rasteriser (:func:`devkit.scenes.shape_mask`)."""
    img, _ = _draw_scene_masks(size, background, shapes)
    return img


def _draw_scene_masks(size, background, shapes) -> tuple[Image.Image, list[np.ndarray]]:
    from PIL import ImageColor

    w, h = size
    arr = np.array(Image.new("RGB", size, background))
    masks = []
    for kind, colour, (x0, y0, x1, y1) in shapes:
        m = scenes.shape_mask(kind, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2, w, h)
        for earlier in masks:
            earlier &= ~m
        arr[m] = ImageColor.getrgb(colour)
        masks.append(m)
    return Image.fromarray(arr), masks


def _truth_line(row_id: str, caption: str, phrases: list[tuple[str, np.ndarray]]) -> dict:
    from stages.record import rle

    entities = []
    for phrase, mask in phrases:
        start = caption.index(phrase)
        entities.append({"turn": None, "start": start, "end": start + len(phrase), "phrase": phrase,
                         "mask": rle.encode(mask[None])[0]})
    return {"id": row_id, "entities": entities}


def _encode(img: Image.Image, name: str, **kw) -> bytes:
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}[name.rsplit(".", 1)[1]]
    if fmt == "JPEG":
        kw.setdefault("quality", 92)
    if fmt == "WEBP":
        kw.setdefault("quality", 90)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _natural_images() -> list[tuple[str, Image.Image, str]]:
    """(file name, image, caption) for every bundled skimage photo that loads without a download."""
    out = []
    try:
        import skimage.data as skdata
    except Exception:
        return out
    for func, name, caption in _NATURAL:
        try:
            if func == "motorcycle":
                arr = skdata.stereo_motorcycle()[0]
            else:
                arr = getattr(skdata, func)()
            out.append((name, Image.fromarray(np.asarray(arr)), caption))
        except Exception:        # not bundled in this scikit-image version (would need a download)
            continue
    return out


def _sample_set() -> tuple[dict[str, bytes], list[dict], list[str]]:
    """All sample files (relative path -> bytes), the captions.jsonl rows, and the good row ids."""
    files: dict[str, bytes] = {}
    rows: list[dict] = []
    good: list[str] = []

    def add(row_id, name, caption, data=None, is_good=True):
        if data is not None:
            files[f"images/{name}"] = data
        rows.append({"id": row_id, "image": f"images/{name}", "caption": caption})
        if is_good:
            good.append(row_id)

    truth: list[dict] = []
    for name, scene in sample_scenes():
        row_id = name.rsplit(".", 1)[0]
        add(row_id, name, scene.caption, _encode(scene.pil(), name))
        truth.append(scene.truth(row_id))

    name, size, bg, shapes, caption = _ROTATED
    upright, masks = _draw_scene_masks(size, bg, shapes)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated-exif6", name, caption, _encode(upright.transpose(Image.Transpose.ROTATE_90), name,
                                                exif=exif.tobytes()))
    truth.append(_truth_line("rotated-exif6", caption, [("a tall purple rectangle", masks[1]),
                                                        ("an orange circle", masks[0])]))

    for name, img, caption in _natural_images():
        add(name.rsplit(".", 1)[0], name, caption, _encode(img, name))

    # Text problems on good images.
    add("no-nouns", "scene-03.jpg", "Very nice!")
    add("empty-caption", "scene-02.png", "   ", is_good=False)
    add("scene-01", "scene-01.jpg", "a red circle and a blue square (a repeated id)", is_good=False)

    # Bad image files.
    add("zero-byte", "empty.jpg", "an empty file", b"", is_good=False)
    whole = _encode(_draw_scene((640, 480), "white", [("circle", "green", (200, 120, 440, 360))]), "x.jpg")
    add("truncated", "truncated.jpg", "a green circle in the middle", whole[: len(whole) * 2 // 5], is_good=False)
    yy, xx = np.mgrid[0:256, 0:384]
    gray16 = (xx * 120).astype(np.uint16)
    gray16[(xx - 192) ** 2 + (yy - 128) ** 2 < 70 ** 2] = 65535
    add("gray16", "gray16.png", "a bright white circle on a dark gradient",
        _encode(Image.fromarray(gray16), "gray16.png"), is_good=False)
    frames = [_draw_scene((320, 240), "white", [("circle", "red", (40 + 80 * i, 80, 120 + 80 * i, 160))])
              for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    add("animated", "animated.gif", "a red ball moving to the right", buf.getvalue(), is_good=False)
    cmyk = _draw_scene((400, 300), "white", [("square", "cyan", (40, 80, 180, 220)),
                                              ("circle", "magenta", (220, 80, 360, 220))]).convert("CMYK")
    add("cmyk", "cmyk.jpg", "a cyan square next to a magenta circle", _encode(cmyk, "cmyk.jpg"), is_good=False)
    rgba = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((120, 70, 280, 230), fill=(30, 60, 200, 255))
    add("rgba", "rgba.png", "a blue circle on a transparent background", _encode(rgba, "rgba.png"), is_good=False)
    add("missing", "does-not-exist.jpg", "a photo of a dog that is not there", is_good=False)
    add("strip", "strip.png", "a thin black line",
        _encode(Image.new("RGB", (4000, 4), "black"), "strip.png"), is_good=False)

    # Last: the held-out scenes (good rows, but not in ``good``, the showcase: see heldout_ids()).
    for name, scene in heldout_scenes():
        row_id = name.rsplit(".", 1)[0]
        add(row_id, name, scene.caption, _encode(scene.pil(), name), is_good=False)
        truth.append(scene.truth(row_id))
    files["truth.jsonl"] = _jsonl(truth)
    return files, rows, good


# --- writing -----------------------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stamp_ok(out: Path, stamp_name: str) -> bool:
    """True when ``out`` holds exactly the files its stamp lists, byte for byte, at this version."""
    try:
        stamp = json.loads((out / stamp_name).read_text())
        if stamp.get("version") != SAMPLE_VERSION:
            return False
        for rel, digest in stamp["files"].items():
            if _sha((out / rel).read_bytes()) != digest:
                return False
        return True
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_set(out: Path, files: dict[str, bytes], stamp_name: str) -> None:
    for rel, data in files.items():
        _write_atomic(out / rel, data)
    stamp = {"version": SAMPLE_VERSION, "files": {rel: _sha(data) for rel, data in files.items()}}
    _write_atomic(out / stamp_name, json.dumps(stamp, indent=1, sort_keys=True).encode())


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_sample_data(out_dir: str | Path) -> Path:
    """Write the offline sample (``captions.jsonl`` + ``images/``) into ``out_dir``; return the jsonl path."""
    out = Path(out_dir)
    captions = out / "captions.jsonl"
    if _stamp_ok(out, _STAMP):
        return captions
    files, rows, _ = _sample_set()
    files["captions.jsonl"] = _jsonl(rows)
    _write_set(out, files, _STAMP)
    return captions


def sample_rows(out_dir: str | Path) -> tuple[list[dict], list[str]]:
    """The captions.jsonl rows of the sample and the ids of its good rows (writes the sample if needed)."""
    captions = write_sample_data(out_dir)
    rows = [json.loads(line) for line in captions.read_text().splitlines() if line.strip()]
    good = set(_good_ids())
    return rows, [r["id"] for r in rows if r["id"] in good]


def heldout_ids() -> list[str]:
    """The ids of the held-out scene rows (the last HELDOUT_SCENES rows of captions.jsonl)."""
    return [name.rsplit(".", 1)[0] for name in _heldout_names()]    # names only: no scene is generated


def _good_ids() -> list[str]:
    ids = [name.rsplit(".", 1)[0] for name in _SCENE_FILES] + ["rotated-exif6"]
    ids += [name.rsplit(".", 1)[0] for _, name, _ in _NATURAL] + ["no-nouns"]
    return ids


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, members)
    return buf.getvalue()


def write_sample_variants(out_dir: str | Path) -> dict[str, Path]:
    """The sample's good images in the other input formats, next to ``captions.jsonl``.

    Returns ``{"llava": llava.json, "llava_truth": truth-llava.jsonl, "coco": coco_captions.json,
    "coco_images": images/, "webdataset": wds/}``; the generated scenes' LLaVA rows are their
    two-round conversations, and ``truth-llava.jsonl`` their phrases' masks (turns 1 and 3). COCO ``file_name`` is relative to ``images/`` (set ``input.image_root``);
    the LLaVA JSON uses ``images/...`` paths relative to its own folder; ``wds/`` holds
    ``sample-000000.tar`` and ``sample-000001.tar`` (``{key}.jpg|png|webp`` + ``{key}.txt``, one
    sample with a ``{key}.json`` conversation instead).
    """
    out = Path(out_dir)
    paths = {"llava": out / "llava.json", "llava_truth": out / "truth-llava.jsonl", "coco": out / "coco_captions.json",
             "coco_images": out / "images", "webdataset": out / "wds"}
    rows, good_ids = sample_rows(out)
    if _stamp_ok(out, _VARIANTS_STAMP):
        return paths
    good, seen = [], set()
    for r in rows:                      # first row of each good id; "no-nouns" has nothing to name
        if r["id"] in good_ids and r["id"] != "no-nouns" and r["id"] not in seen:
            seen.add(r["id"])
            good.append(r)

    # the generated scenes keep their own two-round conversation (truth-llava.jsonl: its phrases)
    generated = {name.rsplit(".", 1)[0]: scene for name, scene in sample_scenes()}
    llava = [{"id": r["id"], "image": r["image"],
              "conversations": generated[r["id"]].conversation if r["id"] in generated else
              [{"from": "human", "value": "<image>\nDescribe the picture in one sentence."},
               {"from": "gpt", "value": r["caption"]}]} for r in good]
    llava_truth = [generated[r["id"]].truth(r["id"], conversation=True) for r in good if r["id"] in generated]

    images, annotations = [], []
    for n, r in enumerate(good, start=1):
        images.append({"id": n, "file_name": r["image"].split("/", 1)[1]})
        annotations.append({"id": 100 + n, "image_id": n, "caption": r["caption"]})
    for n, r in enumerate(good[:3], start=1):           # COCO has several captions per image
        annotations.append({"id": 200 + n, "image_id": n, "caption": "A picture of " + r["caption"][0].lower()
                            + r["caption"][1:]})
    coco = {"info": {"description": "Look&Learn sample"}, "images": images, "annotations": annotations}

    shards: list[list[tuple[str, bytes]]] = [[], []]
    half = (len(good) + 1) // 2
    for n, r in enumerate(good):
        key = f"{n:06d}"
        ext = r["image"].rsplit(".", 1)[1]
        members = shards[0 if n < half else 1]
        members.append((f"{key}.{ext}", (out / r["image"]).read_bytes()))
        if n == 1:
            conv = {"conversations": llava[n]["conversations"]}
            members.append((f"{key}.json", json.dumps(conv).encode()))
        else:
            members.append((f"{key}.txt", r["caption"].encode("utf-8")))

    files = {"llava.json": json.dumps(llava, indent=1).encode(), "truth-llava.jsonl": _jsonl(llava_truth),
             "coco_captions.json": json.dumps(coco, indent=1).encode(),
             "wds/sample-000000.tar": _tar_bytes(shards[0]),
             "wds/sample-000001.tar": _tar_bytes(shards[1])}
    _write_set(out, files, _VARIANTS_STAMP)
    return paths
