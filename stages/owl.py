"""ground with OWLv2: open-vocabulary boxes, one text query per phrase.

``stages/families.py`` picks this stage for a ``detect.model`` whose ``config.json`` says
``model_type: owlv2`` (e.g. ``google/owlv2-base-patch16-ensemble``). OWLv2 scores every image
patch's box against each text query separately (a sigmoid per (box, query); there are no token
positions to map back), so each distinct normalised phrase of a sample is one query, and a
box becomes a candidate of a phrase when its score for that phrase is >= ``detect.box_threshold``.
``detect.text_threshold`` and ``detect.max_text_tokens`` do not apply (a query longer than
the text encoder's 16 tokens is truncated). From there the GroundingDINO path's own code runs:
boxes clipped to the image, degenerate ones dropped, per-phrase NMS (``detect.nms_iou``), the
best ``detect.max_boxes_per_phrase`` kept, regions ``{"id", "entity", "box_xyxy", "det_score"}``.

Images go through the model's own image processor in the model worker (pad to a square at the
bottom/right, resize, normalise), ``detect.batch_size`` images per forward pass with the
queries of the batch padded to the longest list; the prepare stage leaves its ``det_pixels``
column empty for this family. OWLv2's boxes are relative to the padded square, so they are
rescaled to the stored image before the shared post-processing.
"""
from __future__ import annotations

import numpy as np
import torch

from stages.ground import DetectJob, GroundStage, PendingDetections, _to_host
from stages.models import autocast, load_pretrained, model_ref, resolve_device, resolve_dtype
from stages.phrase_boxes import Prompt

_EMPTY = np.zeros((0, 0, 3), np.uint8)


class OwlGroundStage(GroundStage):
    """OWLv2 detection stage (module docstring); same phases as :class:`GroundStage`."""

    def setup_processor(self) -> None:
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = load_pretrained(AutoProcessor, self.detect.model, self.detect.revision,
                                             field="detect.model")

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForZeroShotObjectDetection

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.setup_processor()
        model = load_pretrained(AutoModelForZeroShotObjectDetection, self.detect.model, self.detect.revision,
                                field="detect.model")
        self.model = model.to(self.device).eval()
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.ref = model_ref(self.detect.model, self.detect.revision)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Nothing to do ahead of the model worker: OWLv2's processor runs there (module docstring)."""
        return _EMPTY

    def launch(self, jobs: list[DetectJob]) -> PendingDetections:
        """OWLv2 on ``detect.batch_size`` images per pass; outputs put in the GroundingDINO path's
        shape (per image: keep (patches, phrases), scores, boxes as cxcywh of the stored image)."""
        pending = PendingDetections(jobs)
        if not jobs:
            return pending
        self.setup()
        size = self.detect.batch_size
        for start in range(0, len(jobs), size):
            chunk = list(range(start, min(start + size, len(jobs))))
            n_queries = max(len(jobs[i].keys) for i in chunk)
            texts = []
            for i in chunk:
                keys = jobs[i].keys
                texts += list(keys) + [" "] * (n_queries - len(keys))   # padding queries: never read
            tok = self.processor.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_tokens,
                                           return_tensors="pt")
            pixels = self.processor.image_processor(images=[jobs[i].image for i in chunk],
                                                    return_tensors="pt")["pixel_values"]
            with torch.inference_mode(), autocast(self.device, self.dtype):
                out = self.model(input_ids=tok["input_ids"].to(self.device),
                                 attention_mask=tok["attention_mask"].to(self.device),
                                 pixel_values=pixels.to(self.device))
            scores = out.logits.float().sigmoid()                          # (B, patches, queries)
            boxes = out.pred_boxes.float().clone()                          # cxcywh of the padded square
            for b, i in enumerate(chunk):
                height, width = jobs[i].image.shape[:2]
                side = float(max(height, width))
                boxes[b, :, 0::2] *= side / width
                boxes[b, :, 1::2] *= side / height
            keep = scores >= self.detect.box_threshold
            prompts = [(i, Prompt(" . ".join(jobs[i].keys), tuple(jobs[i].keys), (), 0)) for i in chunk]
            pending.chunks.append(prompts)
            pending.outputs.append((_to_host(keep), _to_host(scores), _to_host(boxes)))
        if self.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
        return pending


__all__ = ["OwlGroundStage"]
