"""ground + segment as one object, so the runner can put both models in one Ray actor pool
(one copy of each model per GPU) and images cross the GPU stage once.

:class:`PrepareStage` is its CPU half: it runs in CPU workers ahead of the actor and resizes each
image to GroundingDINO's and SAM's input sizes (uint8, columns ``det_pixels`` / ``sam_pixels``),
so that the GPU actor only copies, normalises and runs models (stages/prep.py). The actor
resizes an image itself when the column is missing, with the same result.

Inside one call the GPU is kept busy: the detector's batches are issued, then SAM's image
encoder for the same images (it needs no boxes), and only then does the host wait for the
detector's outputs and pick boxes, while the encoder runs; the mask decoder follows.
"""
from __future__ import annotations

import numpy as np

from stages import record as rec
from stages.ground import PREPARED_COLUMN as DET_COLUMN
from stages.ground import GroundStage, rgb_pixels
from stages.segment import PREPARED_COLUMN as SAM_COLUMN
from stages.segment import SegmentStage

PREPARED_COLUMNS = (DET_COLUMN, SAM_COLUMN)
_EMPTY = np.zeros((0, 0, 3), np.uint8)


def _object_column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class PrepareStage:
    """CPU stage: resize the pixels of rows that will reach the models (loads processors only)."""

    def __init__(self, detect, segment, runtime):
        self.ground = GroundStage(detect, runtime)
        self.segment = SegmentStage(segment, runtime)

    def setup(self) -> None:
        self.ground.setup_processor()
        self.segment.setup_processor()

    def __call__(self, batch: dict) -> dict:
        self.setup()
        n = rec.batch_len(batch)
        # rows the models never see get an empty image (not None: Ray Data needs one column type)
        det: list = [_EMPTY] * n
        sam: list = [_EMPTY] * n
        statuses = batch.get("status")
        for i in range(n):
            if statuses is not None and str(statuses[i]) != rec.ROW_OK:
                continue
            try:
                record = rec.loads(batch["record"][i])
            except (TypeError, ValueError):
                continue
            if not any(e.get("status") is None for e in record.get("entities", [])):
                continue  # nothing to ground: the models never see this image
            try:
                pixels = rgb_pixels(batch["pixels"][i])
            except (KeyError, TypeError, ValueError):
                continue  # the model stage rejects the row with the reason
            det[i] = self.ground.prepare(pixels)
            sam[i] = self.segment.prepare(pixels)
        out = dict(batch)
        out[DET_COLUMN] = _object_column(det)
        out[SAM_COLUMN] = _object_column(sam)
        return out


class GroundAndSegment:
    def __init__(self, detect, segment, runtime):
        self.ground = GroundStage(detect, runtime)
        self.segment = SegmentStage(segment, runtime)

    def setup(self) -> None:
        self.ground.setup()
        self.segment.setup()

    def __call__(self, batch: dict) -> dict:
        self.setup()
        state = self.ground.begin(batch)           # detector issued, no wait
        _, todo, _ = state
        prepared = batch.get(SAM_COLUMN)
        images = {t[0]: t[4] for t in todo}
        encoded = self.segment.encode(              # SAM image encoder issued for the same rows
            images, {i: prepared[i] for i in images} if prepared is not None else None)
        out = self.segment(self.ground.end(state), encoded=encoded)
        for name in PREPARED_COLUMNS:               # not needed downstream: free the memory
            out.pop(name, None)
        return out


__all__ = ["GroundAndSegment", "PrepareStage", "PREPARED_COLUMNS"]
