"""Checks the runner makes before any work: the model actors must fit the Ray cluster (issue 9)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.manifest import ManifestError, load_manifest
from pipeline.runner import build_stages, check_cluster_fits

SAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "sample-random.yaml"
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


def test_fingerprint_counts_shaping_settings_only():
    from pipeline.manifest import Manifest
    from pipeline.outdir import differences, settings_of

    base = {"name": "x", "input": {"path": "in.jsonl"}}
    a = settings_of(Manifest.model_validate(base), {"pipeline": "0.1.0"})
    same = settings_of(Manifest.model_validate({**base, "runtime": {"executor": "local", "cpu_batch_size": 3},
                                                "output": {"path": "elsewhere"},
                                                "adjudicate": {"concurrency": 2, "timeout_s": 5},
                                                "card": {"license": "cc-by-4.0", "homepage": "https://example.org",
                                                         "citation": "@misc{x}"}}), {"pipeline": "0.1.0"})
    assert a["fingerprint"] == same["fingerprint"]
    other = settings_of(Manifest.model_validate({**base, "detect": {"box_threshold": 0.5}}), {"pipeline": "0.1.0"})
    assert other["fingerprint"] != a["fingerprint"]
    newer = settings_of(Manifest.model_validate(base), {"pipeline": "0.2.0"})
    assert differences(a["settings"], newer["settings"]) == ["resolved.pipeline: '0.1.0' -> '0.2.0'"]


def test_lock_keeps_a_second_build_out_and_is_released(tmp_path):
    from pipeline.outdir import lock

    with lock(tmp_path):
        with pytest.raises(ManifestError, match=str(tmp_path)):
            with lock(tmp_path):
                pass
    with lock(tmp_path):  # released on exit
        pass


def test_cpu_stage_tasks_share_what_the_model_actors_leave():
    """Issue 9: on 2 CPUs the model actor holds one, and the two runs of CPU stages (read->parse->
    prepare, adjudicate) get half of the other each, so adjudicate is not starved until the end."""
    from pipeline.runner import _cpu_task_cpus

    stages = _stages()
    assert _cpu_task_cpus(stages, 2) == 0.5
    assert _cpu_task_cpus(stages, 1) == 0.5          # the actor takes no CPU on a 1-CPU cluster
    assert _cpu_task_cpus(stages, 16) == 1.0
