"""ground + segment as one object, so the runner can put both models in one Ray actor pool
(one copy of each model per GPU) and images cross the GPU stage once."""
from __future__ import annotations

from stages.ground import GroundStage
from stages.segment import SegmentStage


class GroundAndSegment:
    def __init__(self, detect, segment, runtime):
        self.ground = GroundStage(detect, runtime)
        self.segment = SegmentStage(segment, runtime)

    def setup(self) -> None:
        self.ground.setup()
        self.segment.setup()

    def __call__(self, batch: dict) -> dict:
        return self.segment(self.ground(batch))


__all__ = ["GroundAndSegment"]
