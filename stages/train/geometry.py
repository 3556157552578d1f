"""Image geometry of each VLM family's image processor, as an axis-aligned affine map from the
stored image's pixels to the model's image-token grid, so that an entity mask goes through
exactly the transform the image goes through (resize, pad-to-square, centre crop, Qwen's
``smart_resize`` and 2x2 merge) and is then area-averaged onto the token grid; and back
(read-out: a grid heatmap to image pixels).

Every supported processor step is a per-axis scale and/or shift in continuous pixel
coordinates (``x_processed = x * scale + offset``; torchvision/PIL resizing maps pixel edges
to pixel edges), so the composition is one affine map per axis. Area averaging is exact: the
pre-image of each token cell is an interval per axis, and the fraction of each source pixel
inside it gives separable weight matrices ``Wy (gh, H)``, ``Wx (gw, W)``;
``grid = Wy @ mask @ Wx.T``. Parts of a cell that fall on padding count as mask 0.

The output sizes are computed with the processors' own functions (``get_resize_output_image_size``,
``smart_resize``), reading the processor's actual config (``do_pad``, ``size``, ``crop_size``,
``patch_size``, ``merge_size``), not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    orig_h: int
    orig_w: int
    sy: float
    sx: float
    oy: float
    ox: float
    proc_h: int   # processed canvas the token grid covers
    proc_w: int
    grid_h: int
    grid_w: int
    family: str = ""

    @property
    def n_tokens(self) -> int:
        return self.grid_h * self.grid_w

    def _weights(self, n_src: int, n_cells: int, canvas: int, scale: float, offset: float) -> np.ndarray:
        cell = canvas / n_cells
        lo = (np.arange(n_cells) * cell - offset) / scale          # cell edges in source pixels
        hi = ((np.arange(n_cells) + 1) * cell - offset) / scale
        px = np.arange(n_src)
        overlap = np.clip(np.minimum(hi[:, None], px[None, :] + 1) - np.maximum(lo[:, None], px[None, :]), 0, None)
        return overlap / (hi - lo)[:, None]

    def mask_to_grid(self, mask: np.ndarray) -> np.ndarray:
        """Area-averaged mask (values in [0, 1]) on the ``grid_h x grid_w`` token grid."""
        m = np.asarray(mask, dtype=np.float64)
        if m.shape != (self.orig_h, self.orig_w):
            raise ValueError(f"mask shape {m.shape} != image ({self.orig_h}, {self.orig_w})")
        wy = self._weights(self.orig_h, self.grid_h, self.proc_h, self.sy, self.oy)
        wx = self._weights(self.orig_w, self.grid_w, self.proc_w, self.sx, self.ox)
        return (wy @ m @ wx.T).astype(np.float32)

    def cell_of(self, y: float, x: float) -> tuple[int, int] | None:
        """Token cell (row, col) holding source pixel coordinate (y, x); None when cropped away."""
        yp, xp = y * self.sy + self.oy, x * self.sx + self.ox
        if not (0 <= yp < self.proc_h and 0 <= xp < self.proc_w):
            return None
        return int(yp * self.grid_h // self.proc_h), int(xp * self.grid_w // self.proc_w)

    def cell_rect(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Pre-image (y0, x0, y1, x1) of token cell (row, col) in source pixel coordinates."""
        ch, cw = self.proc_h / self.grid_h, self.proc_w / self.grid_w
        return ((row * ch - self.oy) / self.sy, (col * cw - self.ox) / self.sx,
                ((row + 1) * ch - self.oy) / self.sy, ((col + 1) * cw - self.ox) / self.sx)

    def grid_to_image(self, heat: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Inverse transform: a (grid_h, grid_w) heatmap to source pixels (nearest cell for each
        pixel centre); pixels the processor cropped away get ``fill``."""
        heat = np.asarray(heat, dtype=np.float32).reshape(self.grid_h, self.grid_w)
        yp = (np.arange(self.orig_h) + 0.5) * self.sy + self.oy
        xp = (np.arange(self.orig_w) + 0.5) * self.sx + self.ox
        ry = np.floor(yp * self.grid_h / self.proc_h).astype(int)
        rx = np.floor(xp * self.grid_w / self.proc_w).astype(int)
        vy, vx = (ry >= 0) & (ry < self.grid_h), (rx >= 0) & (rx < self.grid_w)
        out = heat[np.clip(ry, 0, self.grid_h - 1)][:, np.clip(rx, 0, self.grid_w - 1)]
        out[~vy, :] = fill
        out[:, ~vx] = fill
        return out


def _size_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge")
            if getattr(size, k, None) is not None}


def _shortest_edge_size(h: int, w: int, s: int) -> tuple[int, int]:
    """Same arithmetic as transformers.image_transforms.get_resize_output_image_size(default_to_square=False)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def llava_geometry(image_processor, h: int, w: int, patch_size: int) -> Geometry:
    """LLaVA-1.5 (``LlavaImageProcessor`` / ``CLIPImageProcessor``): optional pad to square
    (centred), resize, centre crop; one token per vision patch (CLS dropped)."""
    sy = sx = 1.0
    oy = ox = 0.0
    ch, cw = h, w
    if getattr(image_processor, "do_pad", False):
        m = max(h, w)
        ox, oy = float((m - w) // 2), float((m - h) // 2)
        ch = cw = m
    if getattr(image_processor, "do_resize", True):
        size = _size_dict(image_processor.size)
        if size.get("shortest_edge") and not size.get("longest_edge"):
            nh, nw = _shortest_edge_size(ch, cw, int(size["shortest_edge"]))
        elif size.get("height") and size.get("width"):
            nh, nw = int(size["height"]), int(size["width"])
        else:
            raise NotImplementedError(f"LLaVA geometry for size={size}")
        ry, rx = nh / ch, nw / cw
        sy, sx, oy, ox = sy * ry, sx * rx, oy * ry, ox * rx
        ch, cw = nh, nw
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_dict(image_processor.crop_size)
        th, tw = int(crop["height"]), int(crop["width"])
        if th > ch or tw > cw:
            raise NotImplementedError("centre crop larger than the resized image (padding crop)")
        top, left = int((ch - th) / 2.0), int((cw - tw) / 2.0)
        oy, ox = oy - top, ox - left
        ch, cw = th, tw
    return Geometry(h, w, sy, sx, oy, ox, ch, cw, ch // patch_size, cw // patch_size, "llava")


def llava_next_base_geometry(image_processor, h: int, w: int, patch_size: int) -> Geometry:
    """LLaVA-NeXT base image (the first grid of each image's tokens): the whole image resized
    to the square base size (aspect not kept), then resize/centre-crop to the crop size."""
    size = _size_dict(image_processor.size)
    s = (int(size["height"]), int(size["width"])) if size.get("height") else (int(size["shortest_edge"]),) * 2
    sy, sx = s[0] / h, s[1] / w
    oy = ox = 0.0
    ch, cw = s
    if size.get("shortest_edge") and not size.get("height"):  # second resize (no-op for a square)
        nh, nw = _shortest_edge_size(ch, cw, int(size["shortest_edge"]))
        sy, sx, ch, cw = sy * nh / ch, sx * nw / cw, nh, nw
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_dict(image_processor.crop_size)
        th, tw = int(crop["height"]), int(crop["width"])
        top, left = int((ch - th) / 2.0), int((cw - tw) / 2.0)
        oy, ox, ch, cw = oy - top, ox - left, th, tw
    return Geometry(h, w, sy, sx, oy, ox, ch, cw, ch // patch_size, cw // patch_size, "llava_next")


def qwen2_vl_geometry(image_processor, h: int, w: int) -> Geometry:
    """Qwen2-VL / Qwen2.5-VL: ``smart_resize`` to multiples of patch*merge, then one token per
    merge x merge block of patches."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    patch = int(image_processor.patch_size)
    merge = int(image_processor.merge_size)
    size = _size_dict(image_processor.size)
    min_pixels = getattr(image_processor, "min_pixels", None) or size.get("shortest_edge")
    max_pixels = getattr(image_processor, "max_pixels", None) or size.get("longest_edge")
    rh, rw = smart_resize(h, w, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    return Geometry(h, w, rh / h, rw / w, 0.0, 0.0, rh, rw, rh // (patch * merge), rw // (patch * merge), "qwen2_vl")


def family_of(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", "")
    if mt in ("llava",):
        return "llava"
    if mt in ("llava_next",):
        return "llava_next"
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        return "qwen2_vl"
    raise ValueError(f"unsupported model family {mt!r} (llava, llava_next, qwen2_vl, qwen2_5_vl)")


def geometry_for(family: str, processor, h: int, w: int) -> Geometry:
    ip = processor.image_processor
    if family == "llava":
        return llava_geometry(ip, h, w, int(processor.patch_size))
    if family == "llava_next":
        return llava_next_base_geometry(ip, h, w, int(processor.patch_size))
    if family == "qwen2_vl":
        return qwen2_vl_geometry(ip, h, w)
    raise ValueError(family)
