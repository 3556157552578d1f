"""Masks as COCO RLE, the one codec of the project (pycocotools).

A stored mask is ``{"size": [H, W], "counts": str}`` (region ``mask_rle``, docs/schema.md);
pycocotools is given ``counts`` as bytes and returns bytes, this module takes and gives ``str``
(JSON-ready) and accepts either.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from pycocotools import mask as _coco


def _coco_rle(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def encode(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool/uint8 masks -> JSON-ready COCO RLEs ``{"size": [H, W], "counts": str}``."""
    if len(masks) == 0:
        return []
    stacked = np.asfortranarray(np.transpose(np.asarray(masks).astype(np.uint8), (1, 2, 0)))
    out = []
    for rle in _coco.encode(stacked):
        counts = rle["counts"]
        out.append({"size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return out


def decode(rle: dict) -> np.ndarray:
    """A COCO RLE -> (H, W) bool mask."""
    with warnings.catch_warnings():  # pycocotools' own numpy-2 DeprecationWarning, once per mask
        warnings.simplefilter("ignore", DeprecationWarning)
        return _coco.decode(_coco_rle(rle)).astype(bool)


def area(rle: dict) -> int:
    """Pixels inside the mask."""
    return int(_coco.area(_coco_rle(rle)))


def iou(masks: Sequence[dict], others: Sequence[dict]) -> np.ndarray:
    """(len(masks), len(others)) mask IoUs (no crowd regions)."""
    if not masks or not others:
        return np.zeros((len(masks), len(others)))
    return np.asarray(_coco.iou([_coco_rle(r) for r in masks], [_coco_rle(r) for r in others], [0] * len(others)))


def from_coco(segmentation, height: int, width: int) -> dict:
    """A COCO instance ``segmentation`` (polygons, uncompressed RLE with list ``counts``, or
    compressed RLE) at ``height`` x ``width`` -> one JSON-ready compressed RLE (polygons merged)."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = _coco_rle(segmentation)
    else:
        objs = _coco.frPyObjects(segmentation, int(height), int(width))
        rle = _coco.merge(objs) if isinstance(objs, list) else objs
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
