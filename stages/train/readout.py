"""Attention read-out as masks: an entity's attention over the image-token grid, mapped back to
image pixels through the inverse geometry, thresholded (relative-to-max, Otsu, top-k), scored
with mask IoU, cIoU / gIoU and the pointing game."""
from __future__ import annotations

import numpy as np
import torch

from stages.train.attention import AttentionCapture
from stages.train.data import Collator, WTL_KEYS
from stages.train.loss import entity_maps


def threshold(heat: np.ndarray, method: str = "relative", value: float | None = None) -> np.ndarray:
    h = np.asarray(heat, dtype=np.float64)
    if method == "relative":
        return h >= (0.5 if value is None else value) * h.max()
    if method == "otsu":
        from skimage.filters import threshold_otsu

        return h > threshold_otsu(h) if h.max() > h.min() else np.zeros_like(h, bool)
    if method == "topk":
        frac = 0.1 if value is None else value
        k = max(1, int(round(frac * h.size)))
        cut = np.partition(h.ravel(), -k)[-k]
        return h >= cut
    raise ValueError(f"threshold method must be relative, otsu or topk, got {method!r}")


def iou(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    return int((pred & gt).sum()), int((pred | gt).sum())


@torch.no_grad()
def entity_heatmaps(model, capture: AttentionCapture, examples: list[dict], collator: Collator) -> list[list[np.ndarray]]:
    """Grid heatmaps (grid_h, grid_w) per entity, per example (examples from ``build_example``,
    geometry kept)."""
    batch = collator(examples)
    wtl = {k: batch.pop(k) for k in WTL_KEYS}
    batch.pop("labels", None)
    capture.activate()
    capture.set_queries(wtl["wtl_q_index"])
    model(**batch)
    maps, _ = entity_maps(capture.rows, wtl["wtl_q_index"], wtl["wtl_v_index"], wtl["wtl_ent_sample"],
                          wtl["wtl_ent_qmask"])
    maps = maps.mean(1).float().cpu().numpy()
    out, e = [], 0
    for ex in examples:
        geo = ex["geometry"]
        cur = []
        for _ in ex["entities"]:
            cur.append(maps[e, : geo.n_tokens].reshape(geo.grid_h, geo.grid_w))
            e += 1
        out.append(cur)
    capture.set_queries(None)
    return out


def score_split(model, capture, examples, masks, collator, method="relative", value=None, batch_size=8) -> dict:
    """gIoU (mean per-entity IoU), cIoU (summed intersections / summed unions) and pointing
    accuracy (max-attention pixel inside the mask) over ``examples``; ``masks[i][j]`` is the
    pixel mask of example i's entity j."""
    ious, inter_sum, union_sum, hits, n = [], 0, 0, 0, 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        heats = entity_heatmaps(model, capture, chunk, collator)
        for k, (ex, hs) in enumerate(zip(chunk, heats)):
            for j, grid in enumerate(hs):
                gt = masks[s + k][j].astype(bool)
                pix = ex["geometry"].grid_to_image(grid)
                pred = threshold(pix, method, value)
                i, u = iou(pred, gt)
                ious.append(i / max(u, 1))
                inter_sum += i
                union_sum += u
                # pointing: centre of the max-attention token cell (in source pixels)
                r, c = np.unravel_index(np.argmax(grid), grid.shape)
                y0, x0, y1, x1 = ex["geometry"].cell_rect(int(r), int(c))
                y = int(np.clip((y0 + y1) / 2, 0, gt.shape[0] - 1))
                x = int(np.clip((x0 + x1) / 2, 0, gt.shape[1] - 1))
                hits += int(gt[y, x])
                n += 1
    return {"giou": float(np.mean(ious)) if ious else float("nan"),
            "ciou": inter_sum / max(union_sum, 1), "pointing": hits / max(n, 1), "entities": n}
