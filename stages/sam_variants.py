"""segment with SAM-HQ or SAM 2 / 2.1 checkpoints: the SAM stage with their embeddings and resizing.

``stages/families.py`` picks these for a ``segment.model`` whose ``config.json`` says
``model_type: sam_hq`` or ``sam2`` / ``sam2_video``. Everything else is :class:`SegmentStage`'s:
the image encoder once per image (``segment.batch_size`` per pass), all boxes of an image in
one mask-decoder call with ``multimask_output=False``, decoder calls batched across images,
masks post-processed on the device, COCO RLE, ``mask_score`` = the model's predicted IoU
clipped to [0, 1].

* **SAM-HQ** (``SamHQModel``): same input recipe as SAM (longest edge, pad to a square). Its
  image encoder also returns the early ViT features that the HQ output token fuses, so the
  embeddings of an image are ``(embeddings, [intermediate, ...])``; the decoder runs with
  ``hq_token_only=False`` (the SAM-HQ authors' default: SAM's mask refined by the HQ token).
* **SAM 2 / 2.1** (``Sam2Model`` through ``AutoModelForMaskGeneration``, so the hub's
  ``sam2_video`` checkpoints load too): the image is resized to the processor's square size
  (aspect not kept, no padding), boxes are scaled per axis, the encoder returns a feature
  pyramid (the decoder uses the high-resolution levels), and the low-resolution masks are
  resized straight to the stored image (``Sam2ImageProcessor.post_process_masks``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from stages.models import load_pretrained, model_ref, resolve_device, resolve_dtype
from stages.prep import ImagePrep, _get
from stages.segment import SegmentStage


class SquarePrep(ImagePrep):
    """SAM 2's input recipe: every image resized to the processor's ``size`` (height x width)."""

    def __init__(self, image_processor: Any):
        size = image_processor.size
        self.kind = "square"
        self.size = (int(_get(size, "height")), int(_get(size, "width")))
        self.pad_size = self.size
        self.longest = max(self.size)
        scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
        self.mean = torch.tensor(list(image_processor.image_mean), dtype=torch.float32) * (1.0 / scale)
        self.std = torch.tensor(list(image_processor.image_std), dtype=torch.float32) * (1.0 / scale)
        self._on = {}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.size


class _TransformersSegmenter(SegmentStage):
    """Loading shared by the variants: the image processor and ``AutoModelForMaskGeneration``."""

    def _make_prep(self, image_processor: Any) -> ImagePrep:
        return ImagePrep(image_processor, "sam")

    def setup_processor(self) -> None:
        if self.processor is None:
            from transformers import AutoImageProcessor

            image_processor = load_pretrained(AutoImageProcessor, self.segment.model, self.segment.revision,
                                              field="segment.model")
            self.processor = SimpleNamespace(image_processor=image_processor)
        if self.prep is None:
            self.prep = self._make_prep(self.processor.image_processor)

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForMaskGeneration

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.setup_processor()
        model = load_pretrained(AutoModelForMaskGeneration, self.segment.model, self.segment.revision,
                                field="segment.model")
        self.model = model.to(self.device).eval()
        self.ref = model_ref(self.segment.model, self.segment.revision)


class SamHQSegmentStage(_TransformersSegmenter):
    """SAM-HQ box-prompted masks (module docstring)."""

    def _decode_call(self, where: list[tuple[Any, int]], boxes: torch.Tensor):
        embeddings = torch.cat([emb[0][j][None] for emb, j in where])
        levels = len(where[0][0][1])
        intermediate = [torch.cat([emb[1][k][j][None] for emb, j in where]) for k in range(levels)]
        return self.model(image_embeddings=embeddings, intermediate_embeddings=intermediate, input_boxes=boxes,
                          multimask_output=False, hq_token_only=False)


class Sam2SegmentStage(_TransformersSegmenter):
    """SAM 2 / 2.1 box-prompted masks (module docstring)."""

    def _make_prep(self, image_processor: Any) -> ImagePrep:
        return SquarePrep(image_processor)

    def _decode_call(self, where: list[tuple[Any, int]], boxes: torch.Tensor):
        levels = len(where[0][0])
        embeddings = [torch.cat([emb[k][j][None] for emb, j in where]) for k in range(levels)]
        return self.model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)

    def _postprocess(self, low_res: torch.Tensor, original: tuple[int, int], reshaped: tuple[int, int]) -> torch.Tensor:
        """(n, 1, h', w') logits -> (n, H, W) bool at the stored size: one bilinear resize, > 0."""
        return (F.interpolate(low_res.float(), original, mode="bilinear", align_corners=False) > 0.0)[:, 0]


__all__ = ["SamHQSegmentStage", "Sam2SegmentStage", "SquarePrep"]
