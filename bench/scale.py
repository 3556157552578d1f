"""Scale benchmark: the whole sample build on Ray given 1 CPU, then 2 CPUs (``runtime.num_cpus``).

Each run is pinned to as many cores as Ray is given CPUs (``sched_setaffinity``: Ray's logical
CPUs made physical), with one ground+segment actor per CPU (``runtime.model_workers``).

Inputs: the bundled offline sample (devkit/sample_data.py: ~30 inputs, broken ones included)
replicated ``--copies`` times with distinct ids, through the tiny RANDOM models
(devkit/tiny_models.py), rules judge, real writer: the full ``lookandlearn build`` CLI, one fresh
process (and embedded Ray) per run. Reported: the build's own wall time (``stats.json``
``last_run``: planning, Ray start, every stage, writing) and samples/s; speed-up = time(1 CPU) /
time(2 CPUs); target >= 1.7. The fixed start-up (Ray, spaCy and the models loaded in each
worker: ~10-15 s here) is part of both times, as it is of a real build, so it is also measured
separately: the same build of ONE copy of the sample (30 inputs) per CPU count; the difference
between the full and the one-copy build is the time the extra ``copies - 1`` replicas took, and
the steady speed-up is the ratio of those differences (start-up and the first 30 rows left out).
Runs go 1-CPU one-copy, 2-CPU one-copy, 1-CPU full, 2-CPU full. The two full outputs must hold the
same samples.

On a machine with only 2 cores the 2-CPU run also shares them with the driver, Raylet/GCS and
anything else running, which caps the speed-up below 2; a shared or busy machine lowers it more.

    python bench/scale.py [--copies 100] [--out bench/results/scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 1.7


def make_inputs(folder: Path, copies: int) -> Path:
    """The sample's captions.jsonl replicated ``copies`` times with distinct ids (same images)."""
    from devkit.sample_data import write_sample_data

    jsonl = Path(write_sample_data(folder))
    lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out = jsonl.with_name(f"captions-x{copies}.jsonl")
    with open(out, "w") as fh:
        for k in range(copies):
            for obj in lines:
                obj = dict(obj)
                if "id" in obj and obj["id"] is not None:
                    obj["id"] = f"{obj['id']}-r{k}"
                fh.write(json.dumps(obj) + "\n")
    return out


def run_build(out: Path, jsonl: Path, models: dict, cpus: int, per_shard: int, batch: int) -> dict:
    det = next(str(p) for k, p in models.items() if "dino" in k)
    sam = next(str(p) for k, p in models.items() if "sam" in k)
    sets = [f"input.path={jsonl}", f"detect.model={det}", f"segment.model={sam}", "runtime.executor=ray",
            f"runtime.num_cpus={cpus}", f"runtime.model_workers={cpus}", f"output.samples_per_shard={per_shard}",
            f"runtime.cpu_batch_size={batch}"]
    cmd = [sys.executable, "-m", "pipeline", "build", str(REPO / "manifests" / "sample-random.yaml"), "--out", str(out),
           "--no-progress"] + [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    cores = sorted(os.sched_getaffinity(0))[:cpus] if hasattr(os, "sched_getaffinity") else None

    def pin():  # Ray's logical CPUs made physical: the build and every Ray process on `cpus` cores
        if cores:
            os.sched_setaffinity(0, cores)

    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=pin)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"build with {cpus} CPU(s) failed ({proc.returncode}): {proc.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    last = stats["last_run"]
    return {"cpus": cpus, "cores": cores, "model_workers": cpus, "process_wall_seconds": round(wall, 2), "build_wall_seconds": last["wall_seconds"],
            "samples_processed": last["samples_processed"], "samples_per_second": last["samples_per_second"],
            "samples_out": stats["samples_out"], "samples_rejected": stats["samples_rejected"],
            "stage_seconds": stats.get("stage_seconds")}


def sample_keys(out: Path) -> list[str]:
    from stages.record import shards

    return sorted(key for key, _ in shards.iter_samples(shards.shard_paths(out), images=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=100, help="replicas of the ~30 sample inputs")
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="runtime.cpu_batch_size")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args(argv)
    from devkit.tiny_models import write_tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="lookandlearn-scale-"))
    try:
        models = write_tiny_models(tmp / "models")
        jsonl = make_inputs(tmp / "data", args.copies)
        one = make_inputs(tmp / "data-one", 1)
        startup = [run_build(tmp / f"one-{c}", one, models, c, args.per_shard, args.batch) for c in (1, 2)]
        runs = [run_build(tmp / f"out-{c}", jsonl, models, c, args.per_shard, args.batch) for c in (1, 2)]
        same = sample_keys(tmp / "out-1") == sample_keys(tmp / "out-2")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    speedup = runs[0]["build_wall_seconds"] / runs[1]["build_wall_seconds"]
    extra = [full["build_wall_seconds"] - small["build_wall_seconds"] for full, small in zip(runs, startup)]
    steady = extra[0] / extra[1] if extra[1] > 0 else None
    result = {"benchmark": "scale", "inputs": runs[0]["samples_processed"], "copies_of_sample": args.copies,
              "samples_per_shard": args.per_shard, "cpu_batch_size": args.batch, "runs": runs,
              "startup_runs": startup,
              "startup_seconds": {f"{s['cpus']}cpu": s["build_wall_seconds"] for s in startup},
              "extra_rows_seconds": {f"{r['cpus']}cpu": round(e, 2) for r, e in zip(runs, extra)},
              "same_samples": same, "speedup_2_vs_1": round(speedup, 3),
              "steady_speedup_2_vs_1": None if steady is None else round(steady, 3),
              "target_speedup": TARGET,
              "meets_target": speedup >= TARGET, "steady_meets_target": steady is not None and steady >= TARGET,
              "machine_cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
