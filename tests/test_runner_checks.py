"""Checks the runner makes before any work: the model actors must fit the Ray cluster (issue 9)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.manifest import ManifestError, load_manifest
from pipeline.runner import build_stages, check_cluster_fits

SAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "sample.yaml"
GB = 1024 ** 3


def _stages(*sets):
    return build_stages(load_manifest(SAMPLE, list(sets)))


def test_fitting_plan_passes():
    check_cluster_fits(_stages("runtime.model_workers=2"), {"CPU": 4.0, "memory": 16.0 * GB}, use_gpu=False)
    check_cluster_fits(_stages("runtime.model_workers=4", "runtime.actors_per_gpu=2"),
                       {"CPU": 8.0, "GPU": 2.0, "memory": 64.0 * GB}, use_gpu=True)


@pytest.mark.parametrize("sets, cluster, use_gpu, expected", [
    (["runtime.model_workers=40"], {"CPU": 2.0, "memory": 20.0 * GB}, False, "at most 2"),
    (["runtime.model_workers=100000"], {"CPU": 16.0, "memory": 100.0 * GB}, False, "at most 16"),
    (["runtime.model_workers=3"], {"CPU": 8.0, "GPU": 1.0, "memory": 64.0 * GB}, True, "at most 1"),
    (["runtime.model_workers=4", "runtime.model_memory_mb=4096"], {"CPU": 8.0, "memory": 10.0 * GB}, False,
     "at most 2"),
])
def test_too_many_model_workers_is_a_manifest_error(sets, cluster, use_gpu, expected):
    with pytest.raises(ManifestError) as err:
        check_cluster_fits(_stages(*sets), cluster, use_gpu=use_gpu)
    message = str(err.value)
    assert "runtime.model_workers" in message and expected in message
    assert f"{cluster['CPU']:g} CPUs" in message


@pytest.mark.slow
def test_ray_build_refuses_too_many_model_workers_before_loading_models(tmp_path, sample_manifest_args, monkeypatch):
    from pipeline.runner import build
    from stages.ground_segment import GroundAndSegment

    def no_model(self):
        raise AssertionError("a model was loaded before the cluster check")

    monkeypatch.setattr(GroundAndSegment, "setup", no_model)
    manifest = load_manifest(SAMPLE, sample_manifest_args + ["runtime.executor=ray", "runtime.num_cpus=2",
                                                            "runtime.model_workers=40"], out=str(tmp_path / "o"))
    started = time.perf_counter()
    with pytest.raises(ManifestError, match="runtime.model_workers=40.*2 CPUs"):
        build(manifest, progress=False)
    assert time.perf_counter() - started < 60
    assert not list((tmp_path / "o" / "shards").glob("*.tar"))


def test_a_build_made_before_a_new_input_field_still_resumes(tmp_path):
    """A resolved manifest written before ``input.allow_outside_image_root`` existed names no such
    field; the new default must not count as a changed input."""
    import yaml

    from pipeline.manifest import Manifest, manifest_to_dict
    from pipeline.runner import check_output_matches

    manifest = Manifest.model_validate({"name": "x", "input": {"path": "in.jsonl"}})
    old = manifest_to_dict(manifest)
    del old["input"]["allow_outside_image_root"]
    (tmp_path / "manifest.resolved.yaml").write_text(yaml.safe_dump(old))
    check_output_matches(tmp_path, manifest)                     # no error
    changed = manifest.model_copy(update={"input": manifest.input.model_copy(update={"limit": 3})})
    with pytest.raises(ManifestError, match="input"):
        check_output_matches(tmp_path, changed)
