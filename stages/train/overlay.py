"""Overlay pictures of the attention read-out (``lookandlearn evaluate grounding --overlays``).

One PNG per phrase: the image with the phrase's attention heat map in a colour map (dark purple = low,
yellow = high, blended more strongly where the attention is higher), the read-out mask (the heat map
thresholded) outlined in green, the true mask outlined in white where it is known, and the parts of
the image the model never saw (cropped away by its image processor, e.g. LLaVA's centre crop) greyed
out; below the image a caption strip with the phrase, the scores and a legend that says all this.
Small images are scaled up (nearest neighbour for the maps) so that the text stays readable.
"""
from __future__ import annotations

import numpy as np

# an "inferno"-like colour map: stops from low to high attention
_STOPS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)
PRED_COLOUR = (0, 230, 64)
TRUE_COLOUR = (255, 255, 255)
UNSEEN_GREY = (128, 128, 128)
MIN_SIDE = 384  # small images are scaled up to this shorter side


def colormap(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] -> RGB float32 (..., 3) through the colour map stops."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    frac = (v - lo)[..., None]
    return _STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac


def _resize(a: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    from PIL import Image

    if a.dtype == bool:
        return np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    mode = Image.BILINEAR if smooth else Image.NEAREST
    if a.ndim == 2:
        return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, mode))
    return np.asarray(Image.fromarray(a.astype(np.uint8)).resize(size, mode))


def _outline(mask: np.ndarray, thick: bool) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(mask, mode="thick" if thick else "inner")


def render_overlay(image: np.ndarray, heat: np.ndarray, phrase: str, pred: np.ndarray | None = None,
                   truth: np.ndarray | None = None, seen: np.ndarray | None = None,
                   scores: dict | None = None) -> np.ndarray:
    """The overlay as an RGB uint8 array: the image (shorter side at least ``MIN_SIDE``) above a caption strip.

    ``heat``: attention per source pixel (H, W); ``pred``: the thresholded read-out mask; ``truth``: the
    true mask; ``seen``: pixels inside the model's view (False = cropped away); ``scores``: shown in the
    caption (e.g. ``{"IoU": 0.41}``)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    scale = max(1.0, MIN_SIDE / min(h, w))
    size = (int(round(w * scale)), int(round(h * scale)))
    rgb = _resize(image[..., :3], size, smooth=True).astype(np.float32)
    heat = _resize(np.asarray(heat, np.float32), size, smooth=False)
    seen_up = np.ones(size[::-1], bool) if seen is None else _resize(seen.astype(bool), size, smooth=False)
    # colours span the lowest to the highest attention inside the model's view (relative, per phrase)
    lo, hi = (float(heat[seen_up].min()), float(heat[seen_up].max())) if seen_up.any() else (0.0, 0.0)
    level = np.clip((heat - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(heat)
    alpha = (0.3 + 0.5 * level)[..., None]  # the image shows through where attention is low
    out = rgb * (1 - alpha) + colormap(level) * alpha
    out[~seen_up] = out[~seen_up] * 0.3 + np.array(UNSEEN_GREY, np.float32) * 0.7
    if pred is not None:
        out[_outline(_resize(pred.astype(bool), size, smooth=False), thick=False)] = PRED_COLOUR
    if truth is not None:
        out[_outline(_resize(truth.astype(bool), size, smooth=False), thick=True)] = TRUE_COLOUR
    picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))

    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [("bar", "attention (low to high)")]
    if pred is not None:
        items.append((PRED_COLOUR, "read-out mask"))
    if truth is not None:
        items.append((TRUE_COLOUR, "true mask"))
    if seen is not None and not seen.all():
        items.append(("grey", "cropped away by the model's image processor (never seen)"))
    placed, x, row = [], 6, 0  # legend items left to right, wrapped to the width
    for kind, label in items:
        wide = (64 if kind == "bar" else 24) + int(measure.textlength(label, font=small))
        if x > 6 and x + wide > size[0] - 6:
            x, row = 6, row + 1
        placed.append((kind, label, x, row))
        x += wide + 16
    strip = Image.new("RGB", (size[0], 32 + 18 * (row + 1)), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    head = f'"{phrase}"'
    if scores:
        head += "   " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
    while draw.textlength(head, font=font) > size[0] - 12 and len(head) > 4:
        head = head[:-2] + "…"
    draw.text((6, 6), head, fill="white", font=font)
    for kind, label, x, row in placed:
        y = 30 + 18 * row
        if kind == "bar":
            bar = colormap(np.linspace(0, 1, 56))[None].repeat(10, 0).astype(np.uint8)
            strip.paste(Image.fromarray(bar), (x, y + 1))
            x += 64
        elif kind == "grey":
            draw.rectangle([x, y + 1, x + 16, y + 11], fill=UNSEEN_GREY)
            x += 24
        else:
            draw.line([(x, y + 6), (x + 16, y + 6)], fill=kind, width=3)
            x += 24
        draw.text((x - 2, y + 6), label, fill="white", font=small, anchor="lm")
    canvas = Image.new("RGB", (size[0], size[1] + strip.height))
    canvas.paste(picture, (0, 0))
    canvas.paste(strip, (0, size[1]))
    return np.asarray(canvas)
