"""Fixtures and helpers for the model stages (ground, segment) on the tiny RANDOM models.

Builds on the session fixture ``tiny_models`` of tests/conftest.py (``write_tiny_models`` into a
tmp dir). Test modules import what they use from here, e.g.
``from conftest_models import ground_stage, make_batch`` (importing a fixture into a test module
registers it there). The stages are session-scoped so each model loads once per run.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stages import record as rec  # noqa: E402

GDINO = "grounding-dino-tiny-random"
SAM = "sam-tiny-random"


@pytest.fixture(scope="session")
def gdino_dir(tiny_models) -> Path:
    return Path(tiny_models[GDINO])


@pytest.fixture(scope="session")
def sam_dir(tiny_models) -> Path:
    return Path(tiny_models[SAM])


def detect_config(model: str | Path, **kw):
    from stages.ground import DetectConfig

    return DetectConfig(model=str(model), **kw)


def segment_config(model: str | Path, **kw):
    from stages.segment import SegmentConfig

    return SegmentConfig(model=str(model), **kw)


def cpu_runtime(**kw):
    from pipeline.manifest import RuntimeConfig

    return RuntimeConfig(executor="local", device="cpu", **kw)


@pytest.fixture(scope="session")
def ground_stage(gdino_dir):
    from stages.ground import GroundStage

    stage = GroundStage(detect_config(gdino_dir, batch_size=2), cpu_runtime())
    stage.setup()
    return stage


@pytest.fixture(scope="session")
def segment_stage(sam_dir):
    from stages.segment import SegmentStage

    stage = SegmentStage(segment_config(sam_dir, batch_size=2), cpu_runtime())
    stage.setup()
    return stage


def make_record(key: str, caption: str, phrases: list[str], width: int, height: int,
                skipped: tuple[int, ...] = ()) -> dict:
    """A record as parse leaves it: one entity per phrase (found left to right in the caption);
    entities whose index is in ``skipped`` get status 'skipped', the others None (candidates)."""
    record = rec.new_record(key, {"dataset": "test", "id": key}, width, height, "0" * 64, {"caption": caption})
    pos = 0
    for i, phrase in enumerate(phrases):
        start = caption.index(phrase, pos)
        pos = start + 1
        record["entities"].append({
            "id": i, "phrase": phrase, "start": start, "end": start + len(phrase), "turn": None,
            "root": phrase.split()[-1], "plural": phrase.endswith("s"),
            "status": "skipped" if i in skipped else None, "regions": [],
            "reason": "abstract" if i in skipped else None,
            "expression": {"start": start, "end": start + len(phrase), "text": phrase},
        })
    return record


def random_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish synthetic RGB image (gradients + a bright rectangle) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    np.full_like(xx, 96)], axis=-1).astype(np.int32)
    img[height // 4: height // 2, width // 3: width // 2] = 240
    img += rng.integers(-20, 21, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_batch(records: list[dict], pixels: list[np.ndarray], statuses: list[str] | None = None) -> dict:
    """A columnar batch with every column of stages.record.BATCH_COLUMNS."""
    n = len(records)
    statuses = statuses or [rec.ROW_OK] * n
    return {
        "key": [r["key"] for r in records],
        "shard": [0] * n,
        "seq": list(range(n)),
        "status": list(statuses),
        "reason": ["" if s == rec.ROW_OK else "bad_image: test" for s in statuses],
        "image": [b"" for _ in range(n)],
        "ext": ["png"] * n,
        "pixels": list(pixels),
        "record": [rec.dumps(r) for r in records],
        "item": ["{}"] * n,
        "log": ["[]"] * n,
    }


def two_image_batch() -> dict:
    """Two ok rows of different image sizes (with a repeated phrase and a phrase inside another),
    one rejected row and one row whose only entity is skipped."""
    records = [
        make_record("img-a", "A man with a red helmet on a small moped near a man.",
                    ["A man", "a red helmet", "a small moped", "a man"], 640, 480),
        make_record("img-b", "A dog and a hot dog on a table.", ["A dog", "a hot dog", "a table"], 200, 300),
        make_record("img-c", "A dog.", ["A dog"], 64, 48),
        make_record("img-d", "Happiness.", ["Happiness"], 96, 80, skipped=(0,)),
    ]
    pixels = [random_pixels(480, 640, 1), random_pixels(300, 200, 2), random_pixels(48, 64, 3),
              random_pixels(80, 96, 4)]
    return make_batch(records, pixels, [rec.ROW_OK, rec.ROW_OK, rec.ROW_REJECTED, rec.ROW_OK])
