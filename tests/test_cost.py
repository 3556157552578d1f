"""``lookandlearn cost``: a full build's GPU-hours, judge traffic and size, scaled from a pilot build."""
from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.cost import MEASURED_GPU_RATE, Prices, estimate


def _pilot(tmp_path, samples_in=200, samples_out=150, requests=150, prompt=90_000, completion=6_000, tar_bytes=30_000):
    out = tmp_path / "pilot"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "pilot-000000.tar").write_bytes(b"x" * tar_bytes)
    (out / "index").mkdir()
    (out / "index" / "pilot-000000.parquet").write_bytes(b"y" * 1_000)
    (out / "shards" / ".pilot-000001.tar.tmp").write_bytes(b"z" * 10_000)   # a killed write: not output
    stats = {"samples_in": samples_in, "samples_out": samples_out, "entities": 3 * samples_out,
             "judge": {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}}
    (out / "stats.json").write_text(json.dumps(stats))
    return out


def test_scales_the_pilot_per_input_and_per_sample(tmp_path):
    out = _pilot(tmp_path)
    stats_bytes = (out / "stats.json").stat().st_size
    r = estimate(out, 665_000, gpu_images_per_s=10.0, gpus=4,
                 prices=Prices(gpu_hour=2.0, million_prompt_tokens=0.5, million_completion_tokens=2.0))
    assert r["samples_out"] == pytest.approx(665_000 * 150 / 200)
    assert r["gpu"]["gpu_hours"] == pytest.approx(665_000 / 10.0 / 3600)
    assert r["gpu"]["wall_hours"] == pytest.approx(r["gpu"]["gpu_hours"] / 4)
    assert r["judge"]["requests"] == pytest.approx(665_000 * 150 / 200)
    assert r["judge"]["prompt_tokens"] == pytest.approx(665_000 * 90_000 / 200)
    assert r["judge"]["completion_tokens"] == pytest.approx(665_000 * 6_000 / 200)
    assert r["output_bytes"]["shards"] == pytest.approx(r["samples_out"] * 30_000 / 150)
    assert r["output_bytes"]["all"] == pytest.approx(r["samples_out"] * (30_000 + 1_000 + stats_bytes) / 150)
    judge_usd = 665_000 * 90_000 / 200 / 1e6 * 0.5 + 665_000 * 6_000 / 200 / 1e6 * 2.0
    assert r["usd"]["judge"] == pytest.approx(judge_usd)
    assert r["usd"]["total"] == pytest.approx(r["gpu"]["gpu_hours"] * 2.0 + judge_usd)


def test_default_rate_is_the_measured_one_and_unpriced_costs_stay_unpriced(tmp_path):
    r = estimate(_pilot(tmp_path, requests=0, prompt=0, completion=0), 1_000)
    assert r["gpu"]["images_per_s_per_gpu"] == MEASURED_GPU_RATE and "H200" in r["gpu"]["rate_source"]
    assert r["judge"]["requests"] == 0 and r["usd"] == {"gpu": None, "judge": None, "total": None}


def test_cli_prints_the_table_and_json(tmp_path, capsys):
    out = _pilot(tmp_path)
    assert main(["cost", str(out), "--images", "665000", "--usd-per-gpu-hour", "3"]) == 0
    text = capsys.readouterr().out
    assert "665,000" in text and "GPU-hours" in text and "GPU cost" in text and "judge cost" not in text
    assert main(["cost", str(out), "--images", "1000", "--json", "--gpu-images-per-s", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"]["gpu_hours"] == pytest.approx(1000 / 5 / 3600) and data["gpu"]["rate_source"] == "given"


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], "--images must be a positive"),
    (["--images", "10", "--gpu-images-per-s", "-1"], "--gpu-images-per-s must be a positive"),
    (["--images", "10", "--gpu-images-per-s", "0"], "--gpu-images-per-s must be a positive"),
    (["--images", "10", "--gpus", "0"], "--gpus must be at least 1"),
])
def test_bad_arguments_exit_2_with_the_flag_named(tmp_path, capsys, args, message):
    assert main(["cost", str(_pilot(tmp_path))] + args) == 2
    assert message in capsys.readouterr().err


def test_a_folder_without_stats_or_samples_is_refused(tmp_path, capsys):
    assert main(["cost", str(tmp_path), "--images", "10"]) == 2
    assert "no stats.json" in capsys.readouterr().err
    assert main(["cost", str(_pilot(tmp_path, samples_out=0)), "--images", "10"]) == 2
    assert "kept 0 of 200" in capsys.readouterr().err
