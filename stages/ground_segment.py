"""ground + segment as one model stage, and its CPU half (prepare).

:class:`GroundAndSegment` puts both models in one worker (one Ray actor, one copy of each
model per GPU), so an image crosses to the GPU once. Inside one call the GPU is kept busy: the
detector's batches are issued, then SAM's image encoder for the same images (it needs no
boxes), and only then does the host wait for the detector's outputs and pick boxes, while the
encoder runs; the mask decoder follows.

:class:`PrepareStage` runs in CPU workers ahead of it and resizes each image to
GroundingDINO's and SAM's input sizes (uint8, columns ``det_pixels`` / ``sam_pixels``), so the
model worker only copies, normalises and runs models (``stages/prep.py``). The model stages
resize an image themselves when the column is missing, with the same result.

Which stage runs each model is decided by the checkpoint's family (its ``config.json``
``model_type``, ``stages/families.py``): GroundingDINO / MM-GroundingDINO (``stages/ground.py``),
OWLv2 (``stages/owl.py``), SAM / SAM-HQ / SAM 2 (``stages/segment.py``, ``stages/sam_variants.py``).
With SAM 3 as ``detect.model`` (``stages/sam3.py``) one model makes boxes and masks and the
segment step is skipped. OWLv2 and SAM 3 run their own image processors in the model worker
(their prepare columns stay empty).
"""
from __future__ import annotations

import numpy as np

from stages.base import Resources, Row, Stage
from stages.families import make_ground_stage, make_segment_stage
from stages.ground import PREPARED_COLUMN as DET_COLUMN
from stages.ground import DetectConfig
from stages.prep import rgb_pixels
from stages.segment import PREPARED_COLUMN as SAM_COLUMN
from stages.segment import SegmentConfig

PREPARED_COLUMNS = (DET_COLUMN, SAM_COLUMN)
_EMPTY = np.zeros((0, 0, 3), np.uint8)


class PrepareStage(Stage):
    """CPU stage: resize the pixels of rows that will reach the models (loads processors only)."""

    name = "prepare"
    # rows the models never see get an empty image (not None: Ray Data needs one column type)
    fills = {DET_COLUMN: _EMPTY, SAM_COLUMN: _EMPTY}

    def __init__(self, detect: DetectConfig, segment: SegmentConfig, runtime):
        self.ground = make_ground_stage(detect, runtime)      # the family of each model: stages/families.py
        # a one-model grounder (SAM 3) makes the masks itself: no segmenter
        self.segment = None if getattr(self.ground, "makes_masks", False) else make_segment_stage(segment, runtime)
        self.resources = Resources("cpu")

    def setup(self) -> None:
        self.ground.setup_processor()
        if self.segment is not None:
            self.segment.setup_processor()

    def process(self, rows: list[Row]) -> None:
        for row in rows:
            row[DET_COLUMN] = row[SAM_COLUMN] = _EMPTY
            try:
                candidates = any(e.get("status") is None for e in row.record.get("entities", []))
            except (TypeError, ValueError):
                continue  # the model stage rejects the row with the reason
            if not candidates:
                continue  # nothing to ground: the models never see this image
            try:
                pixels = rgb_pixels(row["pixels"])
            except (KeyError, TypeError, ValueError):
                continue  # the model stage rejects the row, with the reason
            row[DET_COLUMN] = self.ground.prepare(pixels)
            row[SAM_COLUMN] = self.segment.prepare(pixels) if self.segment is not None else _EMPTY


class GroundAndSegment(Stage):
    """GroundingDINO then SAM on the same rows, interleaved on the device (module docstring)."""

    name = "ground_segment"
    # decoded and resized pixels are not needed downstream: free the memory
    drops = ("pixels",) + PREPARED_COLUMNS

    def __init__(self, detect: DetectConfig, segment: SegmentConfig, runtime):
        self.ground = make_ground_stage(detect, runtime)      # the family of each model: stages/families.py
        self.segment = None if getattr(self.ground, "makes_masks", False) else make_segment_stage(segment, runtime)
        self.resources = self.ground.resources

    def setup(self) -> None:
        self.ground.setup()
        if self.segment is not None:
            self.segment.setup()

    def process(self, rows: list[Row]) -> None:
        if self.segment is None:                                # SAM 3: boxes and masks in one model
            self.ground.process(rows)
            return
        jobs = self.ground.select(rows)
        pending = self.ground.launch(jobs)                      # detector issued, no wait
        images = {job.row.index: job.image for job in jobs}
        prepared = {job.row.index: job.prepared for job in jobs if job.prepared is not None} or None
        encoded = self.segment.encode(images, prepared)         # SAM image encoder for the same rows
        self.ground.finish(pending)                             # wait; regions into the records
        self.segment.process([row for row in rows if row.ok], encoded=encoded)


__all__ = ["GroundAndSegment", "PrepareStage", "PREPARED_COLUMNS"]
