"""Shared helpers for tests/test_train_*.py: tiny VLM folders written once per session."""
from __future__ import annotations

import numpy as np

_CACHE: dict = {}


def tiny_vlm(tmp_root, family: str, **kw):
    from devkit.tiny_vlms import write_tiny_vlm

    key = (family, tuple(sorted(kw.items())))
    if key not in _CACHE:
        name = family + "-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        _CACHE[key] = write_tiny_vlm(tmp_root / name, family, **kw)
    return _CACHE[key]


def conversation(caption: str, prompt: str = "Describe the image briefly."):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]


def random_image(h: int, w: int, seed: int = 0):
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
