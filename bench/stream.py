"""Streaming benchmark (issue 9): a Ray build of N generated rows; when does the first shard land, and
how much memory does the whole process tree hold?

Inputs: the bundled offline sample (devkit/sample_data.py, ~30 inputs) replicated to at least N rows
with distinct ids (bench/scale.py's ``make_inputs``), tiny RANDOM models (devkit/tiny_models.py),
rules judge, the real writer: ``lookandlearn build`` in a fresh process with embedded Ray on all
of this machine's CPUs. Reported per N: the process's wall time, the build's own wall time
(``stats.json``), the time until the first ``shards/*.tar`` exists (and as a fraction of the
process wall time), and the peak of the summed RSS of the whole process tree (driver, GCS, raylet,
Ray workers), sampled with psutil every 0.2 s. Summed RSS counts pages shared between processes
(the object store's shared memory, shared libraries) once per process, so it is an upper bound;
it is the same measure before and after a change.

Targets: first shard within the first fifth of the 3,000-row build; peak RSS grows by no more than
15% from the smallest to the largest N.

    python bench/stream.py [--rows 3000 12000] [--out bench/results/stream.json]
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

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

FIRST_SHARD_TARGET = 0.2
RSS_GROWTH_TARGET = 0.15


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_build(out: Path, jsonl: Path, models: dict, per_shard: int, batch: int, code: Path) -> dict:
    det = next(str(p) for k, p in models.items() if "dino" in k)
    sam = next(str(p) for k, p in models.items() if "sam" in k)
    sets = [f"input.path={jsonl}", f"detect.model={det}", f"segment.model={sam}", "runtime.executor=ray",
            f"output.samples_per_shard={per_shard}", f"runtime.cpu_batch_size={batch}"]
    cmd = [sys.executable, "-m", "pipeline", "build", str(code / "manifests" / "sample-random.yaml"), "--out", str(out),
           "--no-progress"] + [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(code))
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak, first, samples = 0, None, []
    shards = out / "shards"
    err_chunks = []
    import threading

    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = _tree_rss(ps)
        peak = max(peak, rss)
        now = time.perf_counter() - started
        samples.append((round(now, 1), rss))
        if first is None and shards.is_dir() and any(shards.glob("*.tar")):
            first = now
        time.sleep(0.2)
    wall = time.perf_counter() - started
    reader.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({proc.returncode}): {''.join(err_chunks)[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    last = stats["last_run"]
    # a coarse memory curve: the peak of each tenth of the run
    tenth = max(1, len(samples) // 10)
    curve = [round(max(r for _, r in samples[i:i + tenth]) / 2**20) for i in range(0, len(samples), tenth)]
    return {"rows": last["samples_processed"], "process_wall_seconds": round(wall, 1),
            "build_wall_seconds": last["wall_seconds"], "first_shard_seconds": round(first, 1) if first else None,
            "first_shard_fraction": round(first / wall, 3) if first else None,
            "peak_rss_mb": round(peak / 2**20), "rss_mb_by_tenth": curve,
            "shards": stats.get("shards_written") or last.get("shards_written"),
            "samples_out": stats["samples_out"], "samples_rejected": stats["samples_rejected"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[3000, 12000])
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="runtime.cpu_batch_size")
    ap.add_argument("--code", default=str(REPO), help="the tree to build with (default this one; for before/after)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stream.json"))
    args = ap.parse_args(argv)
    from devkit.tiny_models import write_tiny_models
    from pipeline.machine import cpu_name
    from scale import make_inputs

    tmp = Path(tempfile.mkdtemp(prefix="lookandlearn-stream-"))
    runs = []
    try:
        models = write_tiny_models(tmp / "models")
        base = sum(1 for line in make_inputs(tmp / "probe", 1).read_text().splitlines() if line.strip())
        for n in args.rows:
            jsonl = make_inputs(tmp / f"data-{n}", -(-n // base))
            runs.append(run_build(tmp / f"out-{n}", jsonl, models, args.per_shard, args.batch, Path(args.code)))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"] - 1 if len(runs) > 1 else None
    small = runs[0]
    result = {"benchmark": "stream", "runs": runs, "samples_per_shard": args.per_shard, "cpu_batch_size": args.batch,
              "first_shard_fraction_target": FIRST_SHARD_TARGET, "rss_growth_target": RSS_GROWTH_TARGET,
              "rss_growth": round(growth, 3) if growth is not None else None,
              "meets_first_shard_target": bool(small["first_shard_fraction"] is not None
                                               and small["first_shard_fraction"] <= FIRST_SHARD_TARGET),
              "meets_rss_target": bool(growth is not None and growth <= RSS_GROWTH_TARGET),
              "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                          "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                          "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "load_average_1min": round(os.getloadavg()[0], 2),
                          "note": "shared 2-core machine: other work was running, timings are noisy"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
