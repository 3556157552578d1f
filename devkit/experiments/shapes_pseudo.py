"""Pseudo-labels for the shapes instrument: the caption's masks as the engine itself makes them.

The ``pseudo`` arm of ``lookandlearn experiment shapes --labels pseudo`` trains on the same fresh
scenes as the ``exact`` arm, but each training caption's entities and masks come from the build's
own stage list (``lookandlearn.Labeler``: spaCy phrases, the detector, SAM, the rules judge) run
on the scene, instead of from the generator. By default the manifest is ``manifests/sample.yaml``:
the small GroundingDINO and SAM trained on generated scenes (``models/``), with the sample's
thresholds. Entities the engine does not ground carry no attention loss (as in a real build);
masks it gets wrong teach the wrong place. Held-out grounding is still scored against exact
masks, so the arm measures how much of the where-to-look gain survives pseudo-label noise.

:class:`PseudoLabeler` also counts, against the exact masks, how good the labels it produced were
(``stats``): of the caption phrases, the share grounded and the share grounded with IoU >= 0.5.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MANIFEST = REPO / "manifests" / "sample.yaml"
# in-process, on the CPU; the rules judge (no endpoint); where an LLM judge would journal
OVERRIDES = ("runtime.executor=local", "runtime.device=cpu", "runtime.dtype=float32", "adjudicate.judge=rules")


class PseudoLabeler:
    """Relabels caption records of generated scenes through the engine (one ``label_many`` call
    per training step's scenes)."""

    def __init__(self, manifest: str | Path = DEFAULT_MANIFEST, overrides: tuple[str, ...] = (),
                 out: str | Path | None = None):
        import tempfile

        from lookandlearn import Labeler

        out = out or tempfile.mkdtemp(prefix="lookandlearn-shapes-pseudo-")
        self.manifest = str(manifest)
        # the sample manifest names its models relative to the repository (where `make` runs)
        models = ([f"detect.model={REPO / 'models' / 'shapes-grounding-dino'}", f"segment.model={REPO / 'models' / 'shapes-sam'}"]
                  if Path(manifest).resolve() == DEFAULT_MANIFEST else [])
        self.labeler = Labeler(manifest, overrides=[*OVERRIDES, *models, f"output.path={out}", *overrides])
        self.stats: Counter = Counter()

    def relabel(self, records: list[dict], images: list[np.ndarray]) -> list[dict]:
        """The engine's record for each (exact caption record, image): same key and caption text;
        entities, regions and verdicts from the engine. A sample the engine rejects keeps its caption
        with no grounded entity (the LM loss still sees it)."""
        from lookandlearn import Rejected

        results = self.labeler.label_many(
            [{"image": image, "caption": rec["text"]["caption"], "id": rec["key"]} for rec, image in zip(records, images)],
            errors="return")
        out = []
        for rec, result in zip(records, results):
            if isinstance(result, Rejected):
                self.stats["rejected"] += 1
                result = {**rec, "entities": [], "regions": []}
            else:
                result = {**result, "key": rec["key"]}
            self._count(rec, result)
            out.append(result)
        return out

    def _count(self, exact: dict, pseudo: dict) -> None:
        from stages.train.data import entity_mask

        spans = {(e["start"], e["end"]): e for e in exact["entities"]}
        grounded = {(e["start"], e["end"]): e for e in pseudo["entities"] if e.get("status") == "grounded"}
        self.stats["samples"] += 1
        self.stats["phrases"] += len(spans)
        for span, ent in spans.items():
            if span not in grounded:
                continue
            self.stats["grounded"] += 1
            mask, truth = entity_mask(pseudo, grounded[span]), entity_mask(exact, ent)
            union = np.logical_or(mask, truth).sum() if mask is not None else 0
            if union and np.logical_and(mask, truth).sum() / union >= 0.5:
                self.stats["correct"] += 1
        self.stats["grounded_other"] += len(set(grounded) - set(spans))   # a span the generator does not name

    def summary(self) -> dict:
        """Label quality over everything relabelled so far (:func:`label_quality`)."""
        return label_quality(self.stats, self.manifest)


COUNTS = ("samples", "rejected", "phrases", "grounded", "grounded_other", "correct")


def label_quality(counts, manifest: str) -> dict:
    """The counts with precision = correct / grounded (other spans included) and recall = correct /
    phrases."""
    c = {k: counts.get(k, 0) for k in COUNTS}
    grounded = c["grounded"] + c["grounded_other"]
    return {"manifest": manifest, **c, "precision": round(c["correct"] / grounded, 4) if grounded else None,
            "recall": round(c["correct"] / c["phrases"], 4) if c["phrases"] else None}
