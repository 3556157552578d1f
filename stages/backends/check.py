"""Pre-flight check of the detector and segmenter a manifest names, for every backend.

Reads no weights: a transformers model must be a folder with ``config.json`` or a cached /
reachable hub id of a family the field runs (:func:`stages.models.check_model_available`,
``stages/families.py``); an original checkpoint must be a file that
``torch.load(weights_only=True)`` accepts (memory-mapped, so a 2.5 GB file costs nothing) with the
keys and shapes of the model the backend builds (SAM on the meta device; GroundingDINO, whose Swin
cannot be built there, on the CPU). Every failure names the field (CLI exit 2).
"""
from __future__ import annotations

from stages.families import check_detector_family, check_segmenter_family
from stages.models import check_model_available


def check_segmenter(config, field: str = "segment.model") -> None:
    if getattr(config, "backend", "transformers") == "segment-anything":
        from stages.backends import segment_anything

        segment_anything.read_checkpoint(config.model, field)
        return
    check_model_available(config.model, config.revision, field)
    check_segmenter_family(config, field)   # SAM, SAM-HQ or SAM 2 (stages/families.py)


def check_detector(config, field: str = "detect.model") -> None:
    if getattr(config, "backend", "transformers") == "groundingdino":
        from stages.backends import groundingdino

        groundingdino.check(config, field)
        return
    check_model_available(config.model, config.revision, field)
    check_detector_family(config, field)    # GroundingDINO, MM-GroundingDINO, OWLv2 or SAM 3


__all__ = ["check_segmenter", "check_detector"]
