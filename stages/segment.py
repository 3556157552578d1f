"""segment: a SAM mask for every region box that ground produced.

The image encoder runs once per image (``get_image_embeddings``, ``segment.batch_size`` images
per pass); all boxes of an image are prompted in one mask-decoder call with
``multimask_output=False``, and the decoder calls of several images are batched together
(boxes padded to the largest count, at most :data:`MAX_PROMPTS_PER_DECODE` prompts per call;
prompts are independent in SAM's decoder, so padding changes no real mask). Masks are
post-processed to the stored image's resolution (the ``pixels`` array) **on the device**
(SamProcessor's ``post_process_masks`` steps), binarised, copied to the host once per call,
and stored on the region as COCO RLE ``mask_rle`` (``size == [H, W]``, ``counts`` as str), with
``mask_score`` (SAM's predicted IoU, clipped to [0, 1]) and ``area`` (pixels).
Regions that already carry a mask are left alone.

GPU path: the images arrive resized by CPU workers (``sam_pixels``, the prepare stage in
``stages/ground_segment.py``; resized here when absent), go to the device through pinned memory without blocking, are normalised and padded
there; nothing waits for the device before the masks of the whole call are copied back.

``segment.backend: segment-anything`` runs the original package's ``Sam`` and an original
``.pth`` behind the same two calls (``stages/backends/segment_anything.py``): everything above is
the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pydantic import Field

from stages.base import Resources, Row, Stage
from stages.config import StageConfig
from stages.ground import _to_host
from stages.models import autocast, load_pretrained, model_ref, resolve_device, resolve_dtype
from stages.prep import ImagePrep, row_pixels
from stages.record.rle import encode as encode_masks  # the masks' COCO RLE (stages/record/rle.py)

# Column that the prepare stage fills with the image already resized for SAM (uint8).
PREPARED_COLUMN = "sam_pixels"
# Mask-decoder prompts per call (images x padded boxes): bounds the decoder's memory, since it
# repeats the image embedding once per prompt.
MAX_PROMPTS_PER_DECODE = 256


def scale_boxes(boxes, original_size: tuple[int, int], reshaped_size: tuple[int, int]) -> torch.Tensor:
    """Absolute xyxy boxes of the (H, W) stored image -> SAM input coordinates (the image resized
    so that its longest side is the encoder's image size, before padding), as SamProcessor does."""
    (h, w), (rh, rw) = original_size, reshaped_size
    scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float32)
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


class SegmentConfig(StageConfig):
    model: str = "facebook/sam-vit-huge"
    revision: str | None = None
    backend: Literal["transformers", "segment-anything"] = Field(
        "transformers", description="transformers = SamModel from a hub id or folder; segment-anything = the "
                                    "original package with an original .pth checkpoint as `model` (extra [sam])")
    batch_size: int = Field(4, ge=1, description="images per SAM image-encoder pass")


class Encoded:
    """SAM image embeddings issued to the device for some images (see ``SegmentStage.encode``)."""

    def __init__(self):
        self.where: dict[int, tuple[torch.Tensor, int]] = {}   # image index -> (embeddings, row in them)
        self.sizes: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # -> (original, reshaped)


@dataclass
class SegmentJob:
    """One row on its way through SAM: the regions of its record that still need a mask."""

    row: Row
    regions: list[dict]
    image: np.ndarray             # RGB pixels at the stored size (masks are made at this size)
    prepared: Any = None          # the image resized for SAM by the prepare stage, if any


class SegmentStage(Stage):
    """SAM box-prompted segmentation stage (see module docstring)."""

    name = "segment"
    provenance_key = "segmenter"

    def __init__(self, config: SegmentConfig, runtime):
        self.segment = config
        self.runtime = runtime
        self.resources = Resources("model", workers=runtime.model_workers, gpus=1 / runtime.actors_per_gpu,
                                   memory_mb=runtime.model_memory_mb)
        self.model = None
        self.processor = None
        self.prep: ImagePrep | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.ref = model_ref(config.model, config.revision) if config.backend == "transformers" \
            else f"{config.backend}:{Path(config.model).expanduser().resolve()}"

    def setup_processor(self) -> None:
        """Load only the processor (CPU workers that prepare images need nothing else)."""
        if self.processor is None and self.segment.backend == "segment-anything":
            from stages.backends import segment_anything as original

            path, _, arch = original.read_checkpoint(self.segment.model)
            self.processor = SimpleNamespace(image_processor=original.image_processor(arch))
        if self.processor is None:
            from transformers import SamProcessor

            self.processor = load_pretrained(SamProcessor, self.segment.model, self.segment.revision,
                                             field="segment.model")
        if self.prep is None:
            self.prep = ImagePrep(self.processor.image_processor, "sam")

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import SamModel

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.setup_processor()
        if self.segment.backend == "segment-anything":
            from stages.backends import segment_anything as original

            self.model = original.OriginalSam(original.load_sam(self.segment.model)).to(self.device).eval()
            return
        model = load_pretrained(SamModel, self.segment.model, self.segment.revision, field="segment.model")
        self.model = model.to(self.device).eval()
        self.ref = model_ref(self.segment.model, self.segment.revision)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """CPU half of the image preprocessing: pixels resized to SAM's input size (uint8)."""
        self.setup_processor()
        return self.prep.resize(pixels)

    def _prepared(self, image: np.ndarray, given: Any) -> np.ndarray:
        want = self.prep.output_size(*image.shape[:2])
        if given is not None:
            arr = np.asarray(given)
            if arr.dtype == np.uint8 and arr.shape == (*want, 3):
                return arr
        return self.prep.resize(image)

    def encode(self, images: dict[int, np.ndarray], prepared: dict[int, Any] | None = None,
               into: Encoded | None = None) -> Encoded:
        """Issue the image encoder for ``{index: pixels}`` (``segment.batch_size`` per pass); no wait."""
        self.setup()
        enc = into or Encoded()
        todo = [i for i in images if i not in enc.where]
        for start in range(0, len(todo), self.segment.batch_size):
            idx = todo[start:start + self.segment.batch_size]
            inputs = [self._prepared(images[i], (prepared or {}).get(i)) for i in idx]
            pixel_values, _ = self.prep.upload(inputs, self.device)
            with torch.inference_mode(), autocast(self.device, self.dtype):
                embeddings = self.model.get_image_embeddings(pixel_values)
            for j, i in enumerate(idx):
                enc.where[i] = (embeddings, j)
                enc.sizes[i] = (tuple(images[i].shape[:2]), tuple(inputs[j].shape[:2]))
        return enc

    def _postprocess(self, low_res: torch.Tensor, original: tuple[int, int], reshaped: tuple[int, int]) -> torch.Tensor:
        """(n, 1, h', w') decoder logits -> (n, H, W) bool masks at the stored size, on the device
        (SamImageProcessor.post_process_masks: upscale to the padded input, crop, resize, > 0)."""
        pad = self.prep.pad_size or (self.prep.longest, self.prep.longest)
        m = F.interpolate(low_res.float(), pad, mode="bilinear", align_corners=False)
        m = m[..., : reshaped[0], : reshaped[1]]
        m = F.interpolate(m, original, mode="bilinear", align_corners=False)
        return (m > 0.0)[:, 0]

    def _decode_call(self, where: list[tuple[Any, int]], boxes: torch.Tensor):
        """The mask decoder on ``[(embeddings, row)]`` of a group of images and their (G, N, 4) box
        prompts; its ``pred_masks`` (G, N, 1, h, w) and ``iou_scores`` (G, N, 1). SAM-HQ and SAM 2
        override this (``stages/sam_variants.py``): their embeddings are several tensors."""
        embeddings = torch.cat([emb[j][None] for emb, j in where])
        return self.model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)

    def decode(self, enc: Encoded, boxes: dict[int, list[list[float]]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Masks for ``{index: boxes}`` from embeddings in ``enc``: ``{index: (masks (N, H, W) bool, iou (N,))}``.
        Decoder calls are batched across images; one wait, at the end."""
        results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        work = []
        for i, bxs in boxes.items():
            if not bxs:
                h, w = enc.sizes[i][0] if i in enc.sizes else (0, 0)
                results[i] = (np.zeros((0, h, w), dtype=bool), np.zeros(0, dtype=np.float32))
            else:
                work.append(i)
        groups: list[list[int]] = []
        for i in work:  # consecutive images, at most MAX_PROMPTS_PER_DECODE padded prompts per call
            if groups:
                size = max(len(boxes[k]) for k in groups[-1] + [i]) * (len(groups[-1]) + 1)
                if size <= MAX_PROMPTS_PER_DECODE:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        pending = []
        pin = self.device.type == "cuda"
        for group in groups:
            n_max = max(len(boxes[i]) for i in group)
            prompt = torch.empty((len(group), n_max, 4), dtype=torch.float32, pin_memory=pin)
            for g, i in enumerate(group):
                scaled = scale_boxes(boxes[i], *enc.sizes[i])
                prompt[g, : len(scaled)] = scaled
                prompt[g, len(scaled):] = scaled[-1]  # padding prompts: discarded below
            with torch.inference_mode(), autocast(self.device, self.dtype):
                out = self._decode_call([enc.where[i] for i in group], prompt.to(self.device, non_blocking=True))
                for g, i in enumerate(group):
                    n = len(boxes[i])
                    masks = self._postprocess(out.pred_masks[g, :n], *enc.sizes[i])
                    pending.append((i, _to_host(masks), _to_host(out.iou_scores[g, :n, 0].float())))
        if pin and pending:
            torch.cuda.current_stream().synchronize()  # the one wait: every copy above is done
        for i, masks, iou in pending:
            results[i] = (masks.numpy().astype(bool, copy=False), iou.numpy())
        return results

    def segment_images(self, images: list[np.ndarray], boxes: list[list[list[float]]],
                       prepared: list | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each image and its boxes (absolute xyxy pixels), ``(masks (N, H, W) bool, iou (N,))``."""
        self.setup()
        with_boxes = {i: images[i] for i in range(len(images)) if boxes[i]}
        prep = {i: prepared[i] for i in with_boxes} if prepared is not None else None
        enc = self.encode(with_boxes, prep)
        for i in range(len(images)):
            enc.sizes.setdefault(i, (tuple(images[i].shape[:2]), (0, 0)))
        out = self.decode(enc, {i: boxes[i] for i in range(len(images))})
        return [out[i] for i in range(len(images))]

    def process(self, rows: list[Row], encoded: Encoded | None = None) -> None:
        """``encoded``: embeddings already issued for some rows (keyed by row index), e.g. by
        GroundAndSegment while the detector's results were being read."""
        jobs = self.select(rows)
        if not jobs:
            return
        self.setup()
        images = {job.row.index: job.image for job in jobs}
        prepared = {job.row.index: job.prepared for job in jobs if job.prepared is not None} or None
        enc = self.encode(images, prepared, into=encoded)
        results = self.decode(enc, {job.row.index: [r["box_xyxy"] for r in job.regions] for job in jobs})
        for job in jobs:
            masks, ious = results[job.row.index]
            for region, rle, m, iou in zip(job.regions, encode_masks(masks), masks, ious):
                region["mask_rle"] = rle
                region["mask_score"] = round(min(max(float(iou), 0.0), 1.0), 5)  # predicted IoU, clipped
                region["area"] = int(m.sum())

    def select(self, rows: list[Row]) -> list[SegmentJob]:
        """The rows with regions that have a box and no mask yet, as jobs (provenance recorded on
        every row; a row whose pixels are unusable is rejected)."""
        jobs = []
        for row in rows:
            record = row.record
            record.setdefault("provenance", {})[self.provenance_key] = self.ref
            regions = [r for r in record.get("regions", []) if r.get("box_xyxy") and r.get("mask_rle") is None]
            if regions:
                image = row_pixels(row)
                if image is not None:
                    jobs.append(SegmentJob(row, regions, image, row.get(PREPARED_COLUMN)))
        return jobs


__all__ = ["SegmentConfig", "SegmentJob", "SegmentStage", "Encoded", "encode_masks", "scale_boxes", "PREPARED_COLUMN",
           "MAX_PROMPTS_PER_DECODE"]
