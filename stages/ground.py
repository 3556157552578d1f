"""ground: GroundingDINO boxes for every candidate entity (``status is None``) of a sample.

The distinct normalised phrases of a sample's candidate entities become GroundingDINO prompts,
and the detector's outputs become boxes per phrase, by token positions
(``stages/phrase_boxes.py`` says how). Each entity gets the boxes of its phrase text as
regions ``{"id", "entity", "box_xyxy", "det_score"}`` where ``det_score`` is the phrase score.

GPU path: the images arrive resized by CPU workers (``det_pixels``, filled by the prepare stage,
``stages/ground_segment.py``; resized here when absent, with the same result), are copied through
pinned memory without blocking and normalised on the device; GroundingDINO runs on batches of
``detect.batch_size`` prompts; all batches of a call are issued before the first wait, and their
outputs come back in one asynchronous copy each. ``detect.batching``: ``bucket`` (default)
batches only images of the same input size, so an image's boxes never depend on its batch-mates
(the Swin backbone does not mask padding); ``pad`` batches in input order with zero padding.

The stage's work has three phases, which :class:`~stages.ground_segment.GroundAndSegment`
interleaves with SAM's: :meth:`GroundStage.select` (which rows need the detector),
:meth:`GroundStage.launch` (issue every forward pass, no wait) and :meth:`GroundStage.finish`
(one wait, boxes on the host, regions into the records).

``detect.backend: groundingdino`` runs the original package's model and an original ``.pth``
behind the same calls (``stages/backends/groundingdino.py``): everything above is the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from stages.base import Resources, Row, Stage
from stages.config import StageConfig
from stages.models import autocast, load_pretrained, model_ref, resolve_device, resolve_dtype
from stages.phrase_boxes import Prompt, batch_phrase_scores, build_prompts, cxcywh_to_xyxy, normalize_phrase, select_boxes
from stages.prep import ImagePrep, row_pixels

# Column that the prepare stage fills with the image already resized for GroundingDINO (uint8).
PREPARED_COLUMN = "det_pixels"


class DetectConfig(StageConfig):
    model: str = "IDEA-Research/grounding-dino-base"
    revision: str | None = None
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1, description="per-phrase NMS IoU threshold")
    max_boxes_per_phrase: int = Field(4, ge=1)
    max_text_tokens: int = Field(256, ge=8, description="text-encoder token limit per prompt")
    batch_size: int = Field(4, ge=1, description="images per detector forward pass")
    backend: Literal["transformers", "groundingdino"] = Field(
        "transformers", description="transformers = a hub id or folder; groundingdino = the original package with an "
                                    "original .pth as `model` (extra [groundingdino])")
    config: str | None = Field(None, description="groundingdino backend: the original config .py (default: the "
                                                 "package's GroundingDINO_SwinT_OGC.py)")
    text_encoder: str | None = Field(None, description="groundingdino backend: bert-base-uncased folder or hub id "
                                                       "(config + tokenizer; default: the config's text_encoder_type)")
    batching: Literal["bucket", "pad"] = Field(
        "bucket", description="bucket = batch only images of the same input size (results never depend on "
                              "batch-mates; resume is byte-identical); pad = zero-pad mixed sizes into one batch")


@dataclass
class DetectJob:
    """One row on its way through the detector."""

    row: Row
    candidates: list[dict]        # the record's candidate entities (status None)
    keys: list[str]               # their distinct normalised phrases: what the prompts hold
    image: np.ndarray             # RGB pixels at the stored size (boxes are scaled to it)
    prepared: Any = None          # the image resized for GroundingDINO by the prepare stage, if any


@dataclass
class PendingDetections:
    """Detector work issued to the device and not yet waited for (see :meth:`GroundStage.launch`)."""

    jobs: list[DetectJob]
    chunks: list[list[tuple[int, Prompt]]] = field(default_factory=list)   # [(job index, prompt)] per forward pass
    outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (keep, scores, boxes)
    event: Any = None             # CUDA event recorded after the last copy (None on CPU)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start an asynchronous copy of a device tensor into pinned host memory (no wait)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class GroundStage(Stage):
    """GroundingDINO detection stage (see the module docstring). ``setup()`` loads the model once."""

    name = "ground"
    provenance_key = "detector"

    def __init__(self, config: DetectConfig, runtime):
        self.detect = config
        self.runtime = runtime
        self.resources = Resources("model", workers=runtime.model_workers, gpus=1 / runtime.actors_per_gpu,
                                   memory_mb=runtime.model_memory_mb)
        self.model = None
        self.processor = None
        self.prep: ImagePrep | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.max_tokens: int | None = None
        self.ref = model_ref(config.model, config.revision) if config.backend == "transformers" \
            else f"{config.backend}:{Path(config.model).expanduser().resolve()}"

    # -- lifecycle ---------------------------------------------------------------------------
    def setup_processor(self) -> None:
        """Load only the processor (CPU workers that prepare images need nothing else)."""
        if self.processor is None and self.detect.backend == "groundingdino":
            from stages.backends import groundingdino as original

            self.processor = original.processor(self.detect)
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = load_pretrained(AutoProcessor, self.detect.model, self.detect.revision,
                                             field="detect.model")
        if self.prep is None:
            self.prep = ImagePrep(self.processor.image_processor, "gdino")

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForZeroShotObjectDetection

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.setup_processor()
        if self.detect.backend == "groundingdino":
            from stages.backends import groundingdino as original

            model = original.load(self.detect)
        else:
            model = load_pretrained(AutoModelForZeroShotObjectDetection, self.detect.model, self.detect.revision,
                                    field="detect.model")
            self.ref = model_ref(self.detect.model, self.detect.revision)
        self.model = model.to(self.device).eval()
        limit = int(getattr(self.model.config, "max_text_len", 256))
        self.max_tokens = min(int(self.detect.max_text_tokens), limit)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """CPU half of the image preprocessing: pixels resized to GroundingDINO's input size (uint8)."""
        self.setup_processor()
        return self.prep.resize(pixels)

    # -- the stage ---------------------------------------------------------------------------
    def process(self, rows: list[Row]) -> None:
        self.finish(self.launch(self.select(rows)))

    def select(self, rows: list[Row]) -> list[DetectJob]:
        """The rows with candidate entities, as jobs (provenance recorded on every row; a row
        whose pixels are unusable is rejected)."""
        jobs = []
        for row in rows:
            record = row.record
            record.setdefault("provenance", {})[self.provenance_key] = self.ref
            candidates = [e for e in record.get("entities", []) if e.get("status") is None]
            keys: list[str] = []
            for ent in candidates:
                key = normalize_phrase(ent["phrase"])
                if key and key not in keys:
                    keys.append(key)
            if keys:
                image = row_pixels(row)
                if image is not None:
                    jobs.append(DetectJob(row, candidates, keys, image, row.get(PREPARED_COLUMN)))
        return jobs

    def launch(self, jobs: list[DetectJob]) -> PendingDetections:
        """Issue GroundingDINO for every prompt of every job; returns without waiting."""
        pending = PendingDetections(jobs)
        if not jobs:
            return pending
        self.setup()
        cfg = self.detect
        inputs = [self._prepared(job.image, job.prepared) for job in jobs]
        prompts: list[tuple[int, Prompt]] = []
        for i, job in enumerate(jobs):
            for prompt in build_prompts(job.keys, self.tokenizer, self.max_tokens):
                prompts.append((i, prompt))
        if cfg.batching == "pad":
            groups = [prompts]
        else:
            # Batch only images of the same input size. GroundingDINO's Swin backbone sees the
            # zero padding of a mixed-size batch (nothing masks it), so an image's boxes would
            # depend on which other images share its batch: a resumed build could then differ
            # from an uninterrupted one. Same-size buckets need no padding (COCO's 640x480 and
            # 480x640 give two buckets).
            buckets: dict[tuple[int, int], list[tuple[int, Prompt]]] = {}
            for item in prompts:
                buckets.setdefault(tuple(inputs[item[0]].shape[:2]), []).append(item)
            groups = list(buckets.values())
        pending.chunks = [group[s:s + cfg.batch_size] for group in groups
                          for s in range(0, len(group), cfg.batch_size)]
        for chunk in pending.chunks:
            logits, boxes = self._forward([inputs[i] for i, _ in chunk], [p.text for _, p in chunk])
            keep, scores = batch_phrase_scores(logits, [p.spans for _, p in chunk], cfg.box_threshold,
                                               cfg.text_threshold)
            pending.outputs.append((_to_host(keep), _to_host(scores), _to_host(boxes)))
        if self.device.type == "cuda" and pending.chunks:
            pending.event = torch.cuda.Event()
            pending.event.record()
        return pending

    def finish(self, pending: PendingDetections) -> None:
        """Wait for :meth:`launch`'s work (one wait) and write each job's regions into its record."""
        if not pending.jobs:
            return
        if pending.event is not None:
            pending.event.synchronize()
        for job, per_key in zip(pending.jobs, self._boxes(pending)):
            record = job.row.record
            regions = record.setdefault("regions", [])
            next_id = max((r["id"] for r in regions), default=-1) + 1
            for ent in job.candidates:
                for box, score in per_key.get(normalize_phrase(ent["phrase"]), []):
                    regions.append({"id": next_id, "entity": ent["id"], "box_xyxy": box, "det_score": score})
                    next_id += 1

    # -- internals ---------------------------------------------------------------------------
    def _prepared(self, image: np.ndarray, given: Any) -> np.ndarray:
        want = self.prep.output_size(*image.shape[:2])
        if given is not None:
            arr = np.asarray(given)
            if arr.dtype == np.uint8 and arr.shape == (*want, 3):
                return arr
        return self.prep.resize(image)

    def _forward(self, inputs: list[np.ndarray], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One GroundingDINO pass over prepared (resized, uint8) images; outputs stay on the device."""
        pixel_values, pixel_mask = self.prep.upload(inputs, self.device)
        feeds = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if self.detect.backend == "groundingdino":  # the original model tokenizes its captions itself
            feeds["captions"] = texts
        else:
            tok = self.tokenizer(texts, padding="longest", return_tensors="pt")
            pin = self.device.type == "cuda"
            for name in ("input_ids", "attention_mask", "token_type_ids"):
                if name in tok:
                    t = tok[name].pin_memory() if pin else tok[name]
                    feeds[name] = t.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.model(**feeds)
        return out.logits.float(), out.pred_boxes.float()

    def _boxes(self, pending: PendingDetections) -> list[dict[str, list[tuple[list[float], float]]]]:
        """Boxes per distinct phrase for each job, ``[{key: [(box_xyxy, score), ...]}]`` (after NMS
        and the per-phrase cap, best first), from the host copies of the detector's outputs."""
        cfg = self.detect
        images = [job.image for job in pending.jobs]
        found: list[list[tuple[torch.Tensor, torch.Tensor, str]]] = [[] for _ in images]
        for chunk, (keep_all, scores_all, boxes) in zip(pending.chunks, pending.outputs):
            for j, (i, prompt) in enumerate(chunk):
                keep, scores = keep_all[j], scores_all[j]
                height, width = images[i].shape[:2]
                xyxy = cxcywh_to_xyxy(boxes[j], width, height)
                for p, key in enumerate(prompt.keys):
                    q = keep[:, p].nonzero().flatten()
                    if q.numel():
                        found[i].append((xyxy[q], scores[q, p], key))
        results: list[dict[str, list[tuple[list[float], float]]]] = []
        for i, hits in enumerate(found):
            per_key: dict[str, list[tuple[list[float], float]]] = {}
            if hits:
                keys = sorted({k for _, _, k in hits}, key=[k for _, _, k in hits].index)
                label_of = {k: n for n, k in enumerate(keys)}
                all_boxes = torch.cat([b for b, _, _ in hits]).clone()
                all_scores = torch.cat([s for _, s, _ in hits])
                labels = torch.cat([torch.full((len(s),), label_of[k], dtype=torch.long) for _, s, k in hits])
                height, width = images[i].shape[:2]
                kept = select_boxes(all_boxes, all_scores, labels, width, height, cfg.nms_iou,
                                    cfg.max_boxes_per_phrase)
                for n in kept.tolist():
                    box = [round(float(v), 2) for v in all_boxes[n].tolist()]
                    box = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                           min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
                    per_key.setdefault(keys[int(labels[n])], []).append((box, round(float(all_scores[n]), 5)))
            results.append(per_key)
        return results


__all__ = ["DetectConfig", "DetectJob", "GroundStage", "PendingDetections", "PREPARED_COLUMN"]
