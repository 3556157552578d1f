"""``lookandlearn cost OUT --images N``: what a build of N inputs will take, scaled from a pilot build.

A pilot build (a few hundred inputs of the real data, with the real judge) says per input: how many
samples survive, how many judge requests and tokens the adjudication takes, and how many bytes the
output holds per sample. Scaled to N inputs, with a ground+segment rate per GPU, that gives the
GPU-hours, the judge traffic and the output size of the full build. Prices are optional: the model
prints units, and dollars only where a price per unit is given.

The default GPU rate is the one this project measured (``bench/results/gpu.json``: one NVIDIA H200,
GroundingDINO-B + SAM ViT-H at real sizes, RANDOM weights, 4 boxes per image, bf16; see
``bench/results/GPU.md``). Trained weights keep the same shapes, so the rate carries over, but more
boxes per image cost more SAM decoder time: measure your own rate on the target card (the pilot's
``samples/s`` on one GPU) and pass ``--gpu-images-per-s``.

Every input is counted as reaching the GPU stage (inputs rejected on read cost almost nothing, so
the figure is an upper bound); judge traffic and bytes scale with the pilot's own per-input rates.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.manifest import ManifestError

# bench/results/gpu.json, config gdino-base+sam-vit-h, "stage" / "bucket", 2026-11 (one H200)
MEASURED_GPU_RATE = 11.1
MEASURED_GPU_SOURCE = ("one NVIDIA H200, GroundingDINO-B + SAM ViT-H at real sizes, random weights, 4 boxes/image "
                       "(bench/results/gpu.json)")


@dataclass(frozen=True)
class Prices:
    """USD per unit; None: not priced (the model still prints the units)."""
    gpu_hour: float | None = None
    million_prompt_tokens: float | None = None
    million_completion_tokens: float | None = None


def _folder_bytes(out: Path) -> tuple[int, int]:
    """(bytes of shards/*.tar, bytes of every file of the build)."""
    shards = sum(p.stat().st_size for p in (out / "shards").glob("*.tar")) if (out / "shards").is_dir() else 0
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    return shards, total


def pilot_rates(out: Path) -> dict:
    """Per-input and per-sample rates of a finished pilot build (its stats.json and files)."""
    stats_path = Path(out) / "stats.json"
    if not stats_path.is_file():
        raise ManifestError(f"{out}: no stats.json; give the output folder of a finished pilot build")
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{stats_path}: not a readable stats file ({type(exc).__name__})") from None
    samples_in, samples_out = int(stats.get("samples_in") or 0), int(stats.get("samples_out") or 0)
    if samples_in <= 0 or samples_out <= 0:
        raise ManifestError(f"{out}: the pilot kept {samples_out} of {samples_in} inputs; a cost model needs a "
                            "pilot that wrote samples")
    judge = stats.get("judge") or {}
    shard_bytes, all_bytes = _folder_bytes(Path(out))
    return {
        "pilot_inputs": samples_in,
        "pilot_samples": samples_out,
        "keep_rate": samples_out / samples_in,
        "judge_requests_per_input": (judge.get("requests") or 0) / samples_in,
        "prompt_tokens_per_input": (judge.get("prompt_tokens") or 0) / samples_in,
        "completion_tokens_per_input": (judge.get("completion_tokens") or 0) / samples_in,
        "entities_per_sample": (stats.get("entities") or 0) / samples_out,
        "shard_bytes_per_sample": shard_bytes / samples_out,
        "output_bytes_per_sample": all_bytes / samples_out,
    }


def estimate(out: Path, images: int, gpu_images_per_s: float = MEASURED_GPU_RATE, gpus: int = 1,
             prices: Prices = Prices()) -> dict:
    """The cost of a build of ``images`` inputs, scaled from the pilot build in ``out``."""
    if images <= 0:
        raise ManifestError(f"--images must be a positive number of inputs, got {images}")
    if not gpu_images_per_s > 0 or not math.isfinite(gpu_images_per_s):
        raise ManifestError(f"--gpu-images-per-s must be a positive rate, got {gpu_images_per_s}")
    if gpus <= 0:
        raise ManifestError(f"--gpus must be at least 1, got {gpus}")
    rates = pilot_rates(out)
    gpu_hours = images / gpu_images_per_s / 3600
    samples = images * rates["keep_rate"]
    prompt = images * rates["prompt_tokens_per_input"]
    completion = images * rates["completion_tokens_per_input"]
    usd = {
        "gpu": None if prices.gpu_hour is None else gpu_hours * prices.gpu_hour,
        "judge": None if prices.million_prompt_tokens is None or prices.million_completion_tokens is None
        else prompt / 1e6 * prices.million_prompt_tokens + completion / 1e6 * prices.million_completion_tokens,
    }
    usd["total"] = None if None in usd.values() else usd["gpu"] + usd["judge"]
    return {
        "images": images,
        "pilot": {"folder": str(out), **rates},
        "gpu": {"images_per_s_per_gpu": gpu_images_per_s,
                "rate_source": MEASURED_GPU_SOURCE if gpu_images_per_s == MEASURED_GPU_RATE else "given",
                "gpu_hours": gpu_hours, "gpus": gpus, "wall_hours": gpu_hours / gpus},
        "samples_out": samples,
        "judge": {"requests": images * rates["judge_requests_per_input"],
                  "prompt_tokens": prompt, "completion_tokens": completion},
        "output_bytes": {"shards": samples * rates["shard_bytes_per_sample"],
                         "all": samples * rates["output_bytes_per_sample"]},
        "usd": usd,
    }


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.1f} {unit}".rstrip()


def render(result: dict) -> list[tuple[str, str]]:
    """(what, how much) rows for the terminal table."""
    p, g, j, b, usd = result["pilot"], result["gpu"], result["judge"], result["output_bytes"], result["usd"]
    rows = [
        ("inputs", f"{result['images']:,}"),
        ("pilot", f"{p['folder']}: {p['pilot_inputs']:,} inputs, {p['pilot_samples']:,} samples "
                  f"(keep {p['keep_rate']:.1%}, {p['entities_per_sample']:.1f} entities/sample)"),
        ("samples out", f"{result['samples_out']:,.0f}"),
        ("GPU rate", f"{g['images_per_s_per_gpu']:g} images/s per GPU ({g['rate_source']})"),
        ("ground+segment", f"{g['gpu_hours']:,.1f} GPU-hours; {g['wall_hours']:,.1f} h on {g['gpus']} GPU(s)"),
        ("judge requests", f"{j['requests']:,.0f}"),
        ("judge tokens", f"{_si(j['prompt_tokens'])} prompt + {_si(j['completion_tokens'])} completion"),
        ("output size", f"{_si(b['shards'], 'B')} of shards, {_si(b['all'], 'B')} in all "
                        f"({_si(p['output_bytes_per_sample'], 'B')} per sample)"),
    ]
    for key, label in (("gpu", "GPU cost"), ("judge", "judge cost"), ("total", "total cost")):
        if usd[key] is not None:
            rows.append((label, f"${usd[key]:,.0f}"))
    return rows
