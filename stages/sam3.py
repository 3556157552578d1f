"""ground + segment in one model: SAM 3 turns each phrase into boxes AND masks.

``stages/families.py`` picks this stage when ``detect.model``'s ``config.json`` says
``model_type: sam3`` (or ``sam3_video``, as ``facebook/sam3`` does: its detector is loaded).
Then :class:`~stages.ground_segment.GroundAndSegment` runs only this stage and skips SAM:
``segment.model`` is neither checked nor loaded.

Per image the vision encoder runs once (``detect.batch_size`` images per pass); its features are
then shared by one text prompt per distinct normalised phrase of the sample (SAM 3 takes one
text per batch element: the phrases of an image form one batch). As in
``Sam3Processor.post_process_instance_segmentation``, a query's score is
``sigmoid(pred_logits) * sigmoid(presence_logit)``; queries with score >= ``detect.box_threshold``
are candidates of that phrase, then the GroundingDINO path's box selection runs (clip,
degenerate boxes dropped, per-phrase NMS at ``detect.nms_iou``, the best
``detect.max_boxes_per_phrase``). ``detect.text_threshold`` and ``detect.max_text_tokens`` do
not apply (prompts are truncated at the text encoder's 32 tokens).

Each kept query's mask: sigmoid of its mask logits, bilinearly resized to the stored image,
> 0.5. The records have the shape SAM's give (``docs/schema.md``): ``box_xyxy``,
``det_score`` (the query score), ``mask_rle``, ``area`` and ``mask_score``, which for SAM 3 is
the mean mask probability over the mask's pixels (SAM 3 predicts no IoU; 0 for an empty mask).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stages.ground import DetectJob, GroundStage, PendingDetections
from stages.models import autocast, load_pretrained, model_ref, resolve_device, resolve_dtype
from stages.phrase_boxes import normalize_phrase, select_boxes
from stages.record.rle import encode as encode_masks

_EMPTY = np.zeros((0, 0, 3), np.uint8)
MASK_THRESHOLD = 0.5   # on the mask probability, as Sam3Processor's default


def _rows_of(vision, b: int, n: int):
    """The vision features of image ``b`` of a batch, repeated for ``n`` text prompts."""
    fields = {}
    for key, value in vision.items():
        if torch.is_tensor(value):
            fields[key] = value[b:b + 1].expand(n, *value.shape[1:])
        elif isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
            fields[key] = tuple(v[b:b + 1].expand(n, *v.shape[1:]) for v in value)
    return type(vision)(**fields)


class Sam3GroundStage(GroundStage):
    """SAM 3 as a one-model grounder (module docstring): regions with boxes and masks."""

    makes_masks = True     # GroundAndSegment skips the segment step

    def setup_processor(self) -> None:
        if self.processor is None:
            from transformers import Sam3Processor

            self.processor = load_pretrained(Sam3Processor, self.detect.model, self.detect.revision,
                                             field="detect.model")

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import Sam3Model

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.setup_processor()
        model = load_pretrained(Sam3Model, self.detect.model, self.detect.revision, field="detect.model")
        self.model = model.to(self.device).eval()
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.ref = model_ref(self.detect.model, self.detect.revision)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Nothing ahead of the model worker: SAM 3's image processor runs there."""
        return _EMPTY

    def launch(self, jobs: list[DetectJob]) -> PendingDetections:
        """Run SAM 3 for every job now (results kept on the pending object for :meth:`finish`)."""
        pending = PendingDetections(jobs)
        if not jobs:
            return pending
        self.setup()
        size = self.detect.batch_size
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            pixels = self.processor.image_processor(images=[job.image for job in chunk],
                                                    return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode(), autocast(self.device, self.dtype):
                vision = self.model.get_vision_features(pixel_values=pixels)
                for b, job in enumerate(chunk):
                    tok = self.processor.tokenizer(list(job.keys), padding="max_length", truncation=True,
                                                   max_length=self.max_tokens, return_tensors="pt")
                    out = self.model(vision_embeds=_rows_of(vision, b, len(job.keys)),
                                     input_ids=tok["input_ids"].to(self.device),
                                     attention_mask=tok["attention_mask"].to(self.device))
                    pending.outputs.append(self._select(job, out))
        return pending

    def _select(self, job: DetectJob, out) -> dict[str, list[tuple]]:
        """``{key: [(box_xyxy, det_score, mask (H, W) bool, mask_score), ...]}`` for one image."""
        cfg = self.detect
        height, width = job.image.shape[:2]
        scores = out.pred_logits.float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=scores.device)
        boxes = out.pred_boxes.float() * scale                                  # (keys, queries, 4)
        hit = (scores >= cfg.box_threshold).nonzero()                           # [(key, query)]
        per_key: dict[str, list[tuple]] = {}
        if hit.numel() == 0:
            return per_key
        cand_boxes = boxes[hit[:, 0], hit[:, 1]].cpu().clone()
        cand_scores = scores[hit[:, 0], hit[:, 1]].cpu()
        kept = select_boxes(cand_boxes, cand_scores, hit[:, 0].cpu(), width, height, cfg.nms_iou,
                            cfg.max_boxes_per_phrase)
        if kept.numel() == 0:
            return per_key
        chosen = hit[kept.to(hit.device)]
        probs = F.interpolate(out.pred_masks[chosen[:, 0], chosen[:, 1]].float().sigmoid()[None], (height, width),
                              mode="bilinear", align_corners=False)[0]
        masks = probs > MASK_THRESHOLD
        area = masks.sum(dim=(1, 2))
        mask_scores = torch.where(area > 0, (probs * masks).sum(dim=(1, 2)) / area.clamp(min=1),
                                  torch.zeros_like(area, dtype=probs.dtype))
        masks_np = masks.cpu().numpy()
        for n, idx in enumerate(kept.tolist()):
            box = [round(float(v), 2) for v in cand_boxes[idx].tolist()]
            per_key.setdefault(job.keys[int(chosen[n, 0])], []).append(
                (box, round(float(cand_scores[idx]), 5), masks_np[n], round(float(mask_scores[n]), 5)))
        return per_key

    def finish(self, pending: PendingDetections) -> None:
        """Regions with box, det_score, mask (COCO RLE), area and mask_score into each record."""
        for job, per_key in zip(pending.jobs, pending.outputs):
            record = job.row.record
            regions = record.setdefault("regions", [])
            next_id = max((r["id"] for r in regions), default=-1) + 1
            for ent in job.candidates:
                found = per_key.get(normalize_phrase(ent["phrase"]), [])
                if not found:
                    continue
                rles = encode_masks(np.stack([f[2] for f in found]))
                for (box, score, mask, mask_score), rle in zip(found, rles):
                    regions.append({"id": next_id, "entity": ent["id"], "box_xyxy": box, "det_score": score,
                                    "mask_rle": rle, "mask_score": mask_score, "area": int(mask.sum())})
                    next_id += 1


__all__ = ["Sam3GroundStage", "MASK_THRESHOLD"]
