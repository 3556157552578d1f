"""Which model family a ``detect.model`` / ``segment.model`` checkpoint is, and the stage that runs it.

The family is read from the checkpoint's own ``config.json`` (its ``model_type``), never from
the name, so a local folder and a hub id work alike and a renamed folder is still recognised:

========================  ==================================  ==================================
``model_type``            family                               runs in
========================  ==================================  ==================================
``grounding-dino``        GroundingDINO (detect.model)         ``stages/ground.py``
``mm-grounding-dino``     MM-GroundingDINO (detect.model)      ``stages/ground.py`` (same outputs)
``owlv2``                 OWLv2 (detect.model)                 ``stages/owl.py``
``sam3``, ``sam3_video``  SAM 3 grounder (detect.model)        ``stages/sam3.py``: boxes + masks,
                                                               the segment step is skipped
``sam``                   SAM (segment.model)                  ``stages/segment.py``
``sam_hq``                SAM-HQ (segment.model)               ``stages/sam_variants.py``
``sam2``, ``sam2_video``  SAM 2 / 2.1 (segment.model)          ``stages/sam_variants.py``
========================  ==================================  ==================================

A checkpoint of another type (a SAM folder as ``detect.model``, a detector as
``segment.model``, a config.json that is not JSON or has no ``model_type``) is a
:class:`ModelFamilyError`: the CLI's exit 2, with a message that names the field, what the
checkpoint is and what the field accepts (:func:`check_detector_family`,
:func:`check_segmenter_family`, called by the pre-flight check before any work).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from stages.models import ModelUnavailableError, hub_cache_dir, hub_offline, local_model_dir

# model_type -> family name (what messages and the README call it)
DETECTORS = {"grounding-dino": "GroundingDINO", "mm-grounding-dino": "MM-GroundingDINO", "owlv2": "OWLv2"}
GROUNDERS = {"sam3": "SAM 3", "sam3_video": "SAM 3"}          # detect.model: text -> boxes + masks
SEGMENTERS = {"sam": "SAM", "sam_hq": "SAM-HQ", "sam2": "SAM 2", "sam2_video": "SAM 2"}
ALL = {**DETECTORS, **GROUNDERS, **SEGMENTERS}


class ModelFamilyError(ModelUnavailableError):
    """The checkpoint a model field names is not a family that field accepts (CLI exit 2)."""


def _config_file(name: str, revision: str | None, download: bool) -> Path | None:
    local = local_model_dir(name)
    if local is not None:
        path = local / "config.json"
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=str(hub_cache_dir()), revision=revision)
    except Exception:
        found = None
    if isinstance(found, str):
        return Path(found)
    if not download or hub_offline():
        return None
    try:  # a few kB, and from_pretrained would fetch it anyway
        return Path(hf_hub_download(name, "config.json", revision=revision, cache_dir=str(hub_cache_dir())))
    except Exception:
        return None


@lru_cache(maxsize=64)
def _read_model_type(path: str, mtime: float) -> str | Exception:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return ValueError(f"its config.json ({path}) is not readable JSON ({type(exc).__name__}: {exc})")
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str) or not data["model_type"]:
        return ValueError(f"its config.json ({path}) has no model_type, so it is not a transformers checkpoint")
    return data["model_type"]


def model_type(name: str, revision: str | None = None, field: str | None = None,
               download: bool = False) -> str | None:
    """The checkpoint's ``model_type``, or None when its config.json is not to be had here
    (not local, not cached, and not downloaded). A config.json that is there but broken raises
    :class:`ModelFamilyError` naming ``field``."""
    path = _config_file(str(name), revision, download)
    if path is None:
        return None
    found = _read_model_type(str(path), path.stat().st_mtime)
    if isinstance(found, Exception):
        raise ModelFamilyError(f"{field or 'model'}: {name!r}: {found}")
    return found


def _accepts(families: dict) -> str:
    names: dict[str, list[str]] = {}
    for mt, fam in families.items():
        names.setdefault(fam, []).append(mt)
    return "; ".join(f"{fam} ({', '.join(mts)})" for fam, mts in names.items())


def _check(config, field: str, accepted: dict) -> str | None:
    if getattr(config, "backend", "transformers") not in ("transformers", None):
        return None  # original-package backends check their checkpoints themselves (stages/backends)
    mt = model_type(config.model, getattr(config, "revision", None), field, download=True)
    if mt is None or mt in accepted:
        return mt
    what = f"a model of the {ALL[mt]} family" if mt in ALL else "a model"
    raise ModelFamilyError(
        f"{field}: {config.model!r} holds {what} (model_type {mt!r}), which {field} does not run. "
        f"{field} accepts these families (model_type): {_accepts(accepted)}. See README 'Model families'.")


def check_detector_family(config, field: str = "detect.model") -> str | None:
    """Pre-flight: ``detect.model`` must be a detector or the SAM 3 grounder (else ModelFamilyError)."""
    return _check(config, field, {**DETECTORS, **GROUNDERS})


def check_segmenter_family(config, field: str = "segment.model") -> str | None:
    """Pre-flight: ``segment.model`` must be SAM, SAM-HQ or SAM 2 (else ModelFamilyError). Not
    checked when detect.model is a grounder (then segment.model is not used)."""
    return _check(config, field, SEGMENTERS)


def is_grounder(detect) -> bool:
    """True when ``detect.model`` names a one-model grounder (SAM 3): the segment step is skipped."""
    if getattr(detect, "backend", "transformers") not in ("transformers", None):
        return False
    try:
        return model_type(detect.model, detect.revision) in GROUNDERS
    except ModelFamilyError:
        return False


def make_ground_stage(detect, runtime):
    """The detection stage for ``detect.model``'s family (GroundingDINO's when the config is not
    to be had here: the pre-flight check has reported that already)."""
    try:
        mt = model_type(detect.model, detect.revision)
    except ModelFamilyError:
        mt = None
    if getattr(detect, "backend", "transformers") in ("transformers", None):
        if mt == "owlv2":
            from stages.owl import OwlGroundStage

            return OwlGroundStage(detect, runtime)
        if mt in GROUNDERS:
            from stages.sam3 import Sam3GroundStage

            return Sam3GroundStage(detect, runtime)
    from stages.ground import GroundStage

    return GroundStage(detect, runtime)


def make_segment_stage(segment, runtime):
    """The segmentation stage for ``segment.model``'s family (SAM's when the config is not to be had)."""
    try:
        mt = model_type(segment.model, segment.revision)
    except ModelFamilyError:
        mt = None
    if getattr(segment, "backend", "transformers") in ("transformers", None):
        if mt == "sam_hq":
            from stages.sam_variants import SamHQSegmentStage

            return SamHQSegmentStage(segment, runtime)
        if mt in ("sam2", "sam2_video"):
            from stages.sam_variants import Sam2SegmentStage

            return Sam2SegmentStage(segment, runtime)
    from stages.segment import SegmentStage

    return SegmentStage(segment, runtime)


__all__ = ["DETECTORS", "GROUNDERS", "SEGMENTERS", "ModelFamilyError", "model_type", "check_detector_family",
           "check_segmenter_family", "is_grounder", "make_ground_stage", "make_segment_stage"]
