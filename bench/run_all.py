"""``make bench``: run every CPU benchmark in bench/ and write bench/results/ (JSON per benchmark +
README.md with the machine described and one line per benchmark).

CPU benchmarks run here: parse.py, write.py, scale.py, stream.py, and judge.py / loss.py when present (each in
its own process, one after the other). GPU benchmarks (gpu.py, loss_gpu.py) need a GPU: they are
run when this machine has one (``--gpu auto``), otherwise their last committed results stay and are
summarised from their files. ``--quick`` shrinks every benchmark (a smoke test, minutes -> seconds).

    python bench/run_all.py [--quick] [--only parse,write] [--gpu auto|yes|no]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.machine import cpu_name  # noqa: E402
BENCH = REPO / "bench"
RESULTS = BENCH / "results"

# name -> (output file in the results folder, args, quick args, timeout s)
CPU_BENCHES = {
    "parse": ("parse.json", [], ["--captions", "400", "--repeats", "1"], 600),
    "write": ("write.json", [], ["--samples", "1000", "--repeats", "1"], 600),
    "scale": ("scale.json", [], ["--copies", "4"], 1500),
    "stream": ("stream.json", [], ["--rows", "300", "600"], 1800),
    "judge": ("judge.json", [], ["--concurrency", "1", "4", "--min-seconds", "0.5"], 600),
    "loss": ("loss-cpu.md", [], ["--steps", "1", "--rounds", "1"], 1200),
}
GPU_BENCHES = {
    "gpu": ("gpu.json", ["--profile"], ["--toy", "--images", "8", "--batch", "8", "--ref-images", "2"], 1200),
    "loss_gpu": ("loss-gpu.md", [], [], 1200),
}


def machine() -> dict:
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu": cpu_name()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["ram_gb"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    for mod in ("torch", "transformers", "spacy", "ray", "pyarrow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - report what is there
            info[mod] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["gpu"] = None
    return info


def run(name: str, args: list[str], timeout: int) -> dict:
    script = BENCH / f"{name}.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    print(f"== bench/{name}.py {' '.join(args)}", flush=True)
    try:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, timeout=timeout,
                              capture_output=True, text=True)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout}s"
    seconds = round(time.perf_counter() - started, 1)
    print(f"   rc={rc} in {seconds}s" + ("" if rc == 0 else f"\n{tail}"), flush=True)
    shown = [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in args]
    return {"name": name, "args": shown, "rc": rc, "seconds": seconds, "tail": tail if rc else ""}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mark(ok) -> str:
    return "meets the target" if ok else "**misses the target**"


def lines_for_results() -> dict[str, str]:
    """One summary line per benchmark whose result file exists (keyed by script name)."""
    out = {}
    p = _load("parse.json")
    if p:
        out["parse.py"] = (f"- `parse.py`: parse stage {p['stage_captions_per_s']} captions/s vs bare `nlp.pipe` "
                           f"{p['bare_captions_per_s']} captions/s = **{p['ratio']:.2f}x** of bare (target >= "
                           f"{p['target_ratio']}: {_mark(p['meets_target'])}); {p['model']}, components "
                           f"{', '.join(p['components'])}; {p['captions']} COCO-style captions, {p['rows_per_batch']} "
                           f"rows per stage call (= spaCy's batch), one core"
                           + "".join(f"; at {k} rows per call (runtime.cpu_batch_size) {v['ratio']:.2f}x"
                                     for k, v in (p.get("by_rows_per_call") or {}).items()
                                     if int(k) != p["rows_per_batch"])
                           + ". Details: `parse.json`.")
    w = _load("write.json")
    if w:
        out["write.py"] = (f"- `write.py`: write stage **{w['samples_per_s']:,.0f} samples/s**, {w['mb_per_s']} MB/s on one "
                           f"core (target >= {w['target_samples_per_s']:,.0f}: {_mark(w['meets_target'])}); 640x480 "
                           f"JPEG + 6 phrases + 4 RLE masks per sample ({w['bytes_per_sample']:,} bytes written per "
                           f"sample), {w['samples_per_shard']} per shard, best of {w['repeats']}. Details: `write.json`.")
    s = _load("scale.json")
    if s:
        r1, r2 = s["runs"]
        out["scale.py"] = (f"- `scale.py`: whole sample build, {s['inputs']} inputs (the sample x{s['copies_of_sample']}, "
                           f"tiny random models), Ray with 1 CPU {r1['build_wall_seconds']} s vs 2 CPUs "
                           f"{r2['build_wall_seconds']} s = **{s['speedup_2_vs_1']:.2f}x** (target >= "
                           f"{s['target_speedup']}: {_mark(s['meets_target'])})"
                           + (f"; start-up (a 30-input build) {s['startup_seconds']['1cpu']} s / "
                              f"{s['startup_seconds']['2cpu']} s, the rest {s['extra_rows_seconds']['1cpu']} s vs "
                              f"{s['extra_rows_seconds']['2cpu']} s = **{s['steady_speedup_2_vs_1']:.2f}x** steady"
                              if s.get("steady_speedup_2_vs_1") else "")
                           + f"; same samples: {s['same_samples']}; "
                           f"each run pinned to 1 or 2 of this machine's {s['machine_cpus']} cores. Details: `scale.json`.")
    st = _load("stream.json")
    if st and st.get("runs"):
        first, last = st["runs"][0], st["runs"][-1]
        out["stream.py"] = (f"- `stream.py`: Ray build of {first['rows']:,} rows: first shard on disk at "
                            f"{first['first_shard_seconds']} s of {first['process_wall_seconds']} s = "
                            f"**{first['first_shard_fraction']:.0%}** of the wall time (target <= "
                            f"{st['first_shard_fraction_target']:.0%}: {_mark(st['meets_first_shard_target'])}); "
                            f"peak RSS of the process tree {first['peak_rss_mb']:,} MB at {first['rows']:,} rows"
                            + (f" vs {last['peak_rss_mb']:,} MB at {last['rows']:,} rows" if last is not first else
                               " (one N only: growth with N not measured)")
                            + (f" = **{st['rss_growth']:+.0%}** (target <= +{st['rss_growth_target']:.0%}: "
                               f"{_mark(st['meets_rss_target'])})" if st.get("rss_growth") is not None else "")
                            + ". Details: `stream.json`.")
    if (RESULTS / "loss-cpu.json").exists() and (RESULTS / "loss-cpu.md").exists():
        md = (RESULTS / "loss-cpu.md").read_text().splitlines()
        rows = [l for l in md if l.startswith("| capture") or l.startswith("| eager")]
        out["loss.py"] = ("- `loss.py` (CPU preset): training step " + "; ".join(
            f"{r.split('|')[1].strip()} {r.split('|')[3].strip()} time, {r.split('|')[5].strip()} memory vs no loss"
            for r in rows) + ". Details: `loss-cpu.md`.")
    g = _load("gpu.json")
    if g and g.get("configs"):
        m = g["machine"]
        parts = []
        for c in g["configs"]:
            st = c.get("stage", {}).get("bucket") or {}
            if st:
                parts.append(f"{c['name']}: stage {st['images_per_s']} img/s vs demo loop fp32 "
                             f"{(c.get('reference_fp32') or {}).get('images_per_s')} / bf16 "
                             f"{(c.get('reference_bf16') or {}).get('images_per_s')} img/s = "
                             f"**{c.get('speedup_vs_reference_fp32')}x** / {c.get('speedup_vs_reference_bf16')}x, "
                             f"{100 * st.get('share_of_matmul_rate', 0):.1f}% of the bf16 matmul rate")
        blob = _load("gpu-rle-blob.json")
        if blob and blob.get("configs"):
            parts.append("with object-like masks in the RLE step (`--rle blob`, as real SAM masks are): " + ", ".join(
                f"{c['name']} {c['stage']['bucket']['images_per_s']} img/s = **{c.get('speedup_vs_reference_fp32')}x**"
                f" / {c.get('speedup_vs_reference_bf16')}x" for c in blob["configs"] if c.get("stage", {}).get("bucket")))
        card = m.get("gpu") or "CPU (toy)"
        out["gpu.py"] = (f"- `gpu.py` (on **{card}**, torch {m['torch']}, transformers {m['transformers']}; "
                         f"RANDOM weights, real-size architectures; stage vs demo loop fp32 / bf16): " + "; ".join(parts)
                         + " (target >= 3x the demo loop). Details: `GPU.md`, `gpu.json`, `gpu-rle-blob.json`.")
    return out


def write_readme(info: dict, runs: list[dict]) -> None:
    readme = RESULTS / "README.md"
    old = readme.read_text().splitlines() if readme.exists() else []
    mine = lines_for_results()
    # keep the lines other scripts wrote about themselves (e.g. judge.py updates its own line)
    kept = [l for l in old if l.startswith("- `") and l.split("`")[1] not in mine]
    head = [
        "# Benchmark results", "",
        "`make bench` (bench/run_all.py) runs every CPU benchmark in `bench/` and rewrites this file; "
        "the GPU benchmarks (`gpu.py`, `loss_gpu.py`) keep the results of their last run on a GPU machine.", "",
        "## Machine of the last `make bench`", "",
        f"- {info.get('cpu')}, {info.get('cpu_count')} cores ({info.get('usable_cores')} usable), "
        f"{info.get('ram_gb')} GB RAM, load average {info.get('load_average_1min')} before the run "
        "(a shared machine: other work was running), " + (f"GPU {info['gpu']}" if info.get("gpu") else "no GPU") + ".",
        f"- {info.get('platform')}; Python {info.get('python')}, torch {info.get('torch')}, transformers "
        f"{info.get('transformers')}, spaCy {info.get('spacy')}, Ray {info.get('ray')}, pyarrow {info.get('pyarrow')}.",
        f"- {info.get('date')}: " + ", ".join(f"{r['name']} {'ok' if r['rc'] == 0 else 'FAILED'} ({r['seconds']} s)"
                                             for r in runs) + ".", "",
        "## Results", "", "One line per `bench/` script (its latest run).", "",
    ]
    body = [mine[k] for k in ("parse.py", "write.py", "scale.py", "stream.py") if k in mine] + kept
    body += [mine[k] for k in ("loss.py", "gpu.py") if k in mine]
    tail = []
    if (RESULTS / "NOTES.md").exists():
        tail = ["", "Targets, misses and what would close them: `NOTES.md`."]
    readme.write_text("\n".join(head + body + tail) + "\n")
    (RESULTS / "machine.json").write_text(json.dumps({**info, "runs": runs}, indent=1) + "\n")


def main(argv=None) -> int:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--results", default=str(RESULTS), help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    RESULTS = Path(args.results).absolute()
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    only = {n for n in args.only.split(",") if n}
    todo = dict(CPU_BENCHES)
    if args.gpu == "yes" or (args.gpu == "auto" and info.get("gpu")):
        todo.update(GPU_BENCHES)
    runs = []
    for name, (out, full, quick, timeout) in todo.items():
        if only and name not in only:
            continue
        if not (BENCH / f"{name}.py").exists():
            continue  # written by another issue, not here yet
        runs.append(run(name, (quick if args.quick else full) + ["--out", str(RESULTS / out)], timeout))
    if only:  # a partial run: keep the other benchmarks' entries of the last full run
        try:
            previous = json.loads((RESULTS / "machine.json").read_text()).get("runs", [])
        except (OSError, ValueError):
            previous = []
        names = {r["name"] for r in runs}
        runs = [r for r in previous if r["name"] not in names] + runs
    write_readme(info, runs)
    print((RESULTS / "README.md").read_text())
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
