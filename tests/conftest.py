"""Shared fixtures: tiny random models and the offline sample inputs, made once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network or a real hub model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from devkit.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def sample_jsonl(tmp_path_factory) -> Path:
    from devkit.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("sample-data"))


@pytest.fixture
def sample_manifest_args(tiny_models, sample_jsonl, tmp_path):
    """--set overrides that point manifests/sample-random.yaml at the session's tiny models and data."""
    det = tiny_models["grounding-dino-tiny-random"] if "grounding-dino-tiny-random" in tiny_models else next(
        p for k, p in tiny_models.items() if "dino" in k)
    sam = tiny_models["sam-tiny-random"] if "sam-tiny-random" in tiny_models else next(
        p for k, p in tiny_models.items() if "sam" in k)
    return [f"input.path={sample_jsonl}", f"detect.model={det}", f"segment.model={sam}"]


@pytest.fixture(scope="session")
def sample_out(tiny_models, sample_jsonl, tmp_path_factory) -> Path:
    """manifests/sample-random.yaml built once (local executor, 4 shards) for tests that only read an
    output folder (inspect, gallery, publish). Treat it as read-only: copy it to change it."""
    from pipeline.manifest import load_manifest
    from pipeline.runner import build

    det = next(p for k, p in tiny_models.items() if "dino" in k)
    sam = next(p for k, p in tiny_models.items() if "sam" in k)
    out = tmp_path_factory.mktemp("sample-out") / "sample"
    manifest = load_manifest(REPO / "manifests" / "sample-random.yaml",
                             [f"input.path={sample_jsonl}", f"detect.model={det}", f"segment.model={sam}",
                              "runtime.executor=local"], out=str(out))
    build(manifest, progress=False)
    return out
