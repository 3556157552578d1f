"""segment: a SAM mask for every region box that ground produced.

The image encoder runs once per image (``get_image_embeddings``, ``segment.batch_size`` images
per pass); all boxes of an image are prompted in one mask-decoder call with
``multimask_output=False``. Masks are post-processed to the stored image's resolution (the
``pixels`` array), binarised, and stored on the region as COCO RLE ``mask_rle`` (``size ==
[H, W]``, ``counts`` as str), with ``mask_score`` (SAM's predicted IoU, clipped to [0, 1]) and ``area`` (pixels).
Regions that already carry a mask are left alone.
"""
from __future__ import annotations

import numpy as np
import torch

from stages import record as rec
from stages.ground import BatchRows
from stages.models import autocast, load_pretrained, model_ref, resolve_device, resolve_dtype


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool/uint8 masks -> JSON-ready COCO RLEs ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    stacked = np.asfortranarray(np.transpose(masks.astype(np.uint8), (1, 2, 0)))
    out = []
    for rle in mask_utils.encode(stacked):
        counts = rle["counts"]
        out.append({"size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return out


def scale_boxes(boxes, original_size: tuple[int, int], reshaped_size: tuple[int, int]) -> torch.Tensor:
    """Absolute xyxy boxes of the (H, W) stored image -> SAM input coordinates (the image resized
    so that its longest side is the encoder's image size, before padding), as SamProcessor does."""
    (h, w), (rh, rw) = original_size, reshaped_size
    scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float32)
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


class SegmentStage:
    """SAM box-prompted segmentation stage (see module docstring)."""

    provenance_key = "segmenter"

    def __init__(self, segment, runtime):
        self.segment = segment
        self.runtime = runtime
        self.model = None
        self.processor = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.ref = model_ref(segment.model, segment.revision)

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import SamModel, SamProcessor

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.processor = load_pretrained(SamProcessor, self.segment.model, self.segment.revision,
                                         field="segment.model")
        model = load_pretrained(SamModel, self.segment.model, self.segment.revision, field="segment.model")
        self.model = model.to(self.device).eval()
        self.ref = model_ref(self.segment.model, self.segment.revision)

    def segment_images(self, images: list[np.ndarray], boxes: list[list[list[float]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each image and its boxes (absolute xyxy pixels), ``(masks (N, H, W) bool, iou (N,))``."""
        self.setup()
        results: list[tuple[np.ndarray, np.ndarray]] = [None] * len(images)  # type: ignore[list-item]
        image_processor = self.processor.image_processor
        for start in range(0, len(images), self.segment.batch_size):
            idx = list(range(start, min(start + self.segment.batch_size, len(images))))
            enc = image_processor([images[i] for i in idx], return_tensors="pt", input_data_format="channels_last")
            original_sizes = [tuple(int(v) for v in s) for s in enc["original_sizes"]]
            reshaped_sizes = [tuple(int(v) for v in s) for s in enc["reshaped_input_sizes"]]
            with torch.inference_mode(), autocast(self.device, self.dtype):
                embeddings = self.model.get_image_embeddings(enc["pixel_values"].to(self.device))
                for j, i in enumerate(idx):
                    if not boxes[i]:
                        h, w = original_sizes[j]
                        results[i] = (np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.float32))
                        continue
                    (h, w), (rh, rw) = original_sizes[j], reshaped_sizes[j]
                    prompt = scale_boxes(boxes[i], (h, w), (rh, rw))[None].to(self.device)
                    out = self.model(image_embeddings=embeddings[j:j + 1], input_boxes=prompt,
                                     multimask_output=False)
                    masks = image_processor.post_process_masks(
                        [out.pred_masks[0].float()], [(h, w)], [(rh, rw)], binarize=True)[0]
                    results[i] = (masks[:, 0].cpu().numpy().astype(bool),
                                  out.iou_scores[0, :, 0].float().cpu().numpy())
        return results

    def __call__(self, batch: dict) -> dict:
        rows = BatchRows(batch)
        todo: list[tuple[int, dict, list[dict], np.ndarray]] = []
        for i in range(rows.n):
            if not rows.ok(i):
                continue
            record = rec.loads(rows.records[i])
            record.setdefault("provenance", {})[self.provenance_key] = self.ref
            regions = [r for r in record.get("regions", []) if r.get("box_xyxy") and r.get("mask_rle") is None]
            if regions:
                image = rows.pixels(i)
                if image is not None:
                    todo.append((i, record, regions, image))
            else:
                rows.records[i] = rec.dumps(record)
        if todo:
            results = self.segment_images([t[3] for t in todo], [[r["box_xyxy"] for r in t[2]] for t in todo])
            for (i, record, regions, _), (masks, ious) in zip(todo, results):
                for region, rle, m, iou in zip(regions, encode_masks(masks), masks, ious):
                    region["mask_rle"] = rle
                    region["mask_score"] = round(min(max(float(iou), 0.0), 1.0), 5)  # predicted IoU, clipped
                    region["area"] = int(m.sum())
                rows.records[i] = rec.dumps(record)
        return rows.result()


__all__ = ["SegmentStage", "encode_masks", "scale_boxes"]
