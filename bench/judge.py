"""LLM-judge throughput against the local fake server with a fixed reply latency.

The judge keeps ``concurrency`` requests in flight on one asyncio loop, so with a server that
answers every request after ``latency`` seconds, requests per second should approach
``concurrency / latency`` until the client's own CPU cost per request (building the prompt,
the ``openai`` client, HTTP, validating the reply) becomes the limit. The server runs as a
separate process (``python -m devkit.fake_judge_server``) so it does not share the judge's
interpreter; only ``OpenAIJudge.judge_many`` is timed (one request per sample, two entities and
four candidates each, every sample a new question: no cache hits).

    python bench/judge.py [--latency-ms 100] [--concurrency 1 4 16 64] [--out bench/results/judge.json]
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


def _records(n: int, tag: str) -> list[dict]:
    from stages.record import new_record

    W, H = 640, 480
    records = []
    for i in range(n):
        caption = f"a dog next to two cats on a sofa ({tag} {i})"
        rec = new_record(f"b-{tag}-{i}", {"dataset": "bench", "id": str(i)}, W, H, f"{i:064x}", {"caption": caption})
        rec["entities"] = [
            {"id": 0, "phrase": "a dog", "start": 0, "end": 5, "turn": -1, "root": "dog", "plural": False,
             "status": None, "regions": [], "reason": None, "expression": None},
            {"id": 1, "phrase": "two cats", "start": 15, "end": 23, "turn": -1, "root": "cats", "plural": True,
             "status": None, "regions": [], "reason": None, "expression": None},
        ]
        boxes = [(0, (10, 20, 200, 300), 0.71), (0, (300, 40, 600, 400), 0.52),
                 (1, (50, 300, 180, 470), 0.66), (1, (400, 280, 630, 470), 0.64)]
        rec["regions"] = [{"id": rid, "entity": ent, "box_xyxy": [float(v) for v in box], "det_score": det,
                           "mask_rle": None, "mask_score": 0.9, "area": int((box[2] - box[0]) * (box[3] - box[1]) * 0.7)}
                          for rid, (ent, box, det) in enumerate(boxes)]
        records.append(rec)
    return records


def _start_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "devkit.fake_judge_server", "--port", "0",
                             "--latency-ms", str(latency_ms), "--max-seconds", "900"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "fake judge server on http://127.0.0.1:PORT/v1 ..."
    url = next(w for w in line.split() if w.startswith("http://"))
    return proc, url


def run(latency_ms: float, levels: list[int], min_seconds: float) -> dict:
    from stages.adjudicate import AdjudicateConfig, finalize
    from stages.judges.llm import OpenAIJudge
    from stages.judges.stats import merge_judge_stats, shard_judge_stats

    os.environ.setdefault("LOOKANDLEARN_BENCH_KEY", "bench-not-a-secret")
    proc, url = _start_server(latency_ms)
    results = []
    try:
        for concurrency in levels:
            ideal = concurrency / (latency_ms / 1000.0)
            n = max(20, int(ideal * min_seconds))
            config = AdjudicateConfig(judge="openai", model="fake-judge", base_url=url, concurrency=concurrency,
                                      api_key_env="LOOKANDLEARN_BENCH_KEY", timeout_s=30, max_retries=2)
            judge = OpenAIJudge(config)
            judge.setup()
            judge.judge_many(_records(concurrency, f"warm{concurrency}"))  # open the connections first
            records = _records(n, f"c{concurrency}")
            started = time.perf_counter()
            verdicts = judge.judge_many(records)
            seconds = time.perf_counter() - started
            judge.close()
            rows = [row for rec, v in zip(records, verdicts) for row in finalize(rec, v)]
            stats = merge_judge_stats([shard_judge_stats(rows)])
            assert stats["requests"] == n and not stats["failed_requests_by_kind"], stats
            rps = n / seconds
            results.append({"concurrency": concurrency, "requests": n, "seconds": round(seconds, 3),
                            "requests_per_s": round(rps, 1), "ideal_requests_per_s": round(ideal, 1),
                            "efficiency": round(rps / ideal, 3),
                            "latency_ms_p50": stats["latency_ms"]["p50"], "latency_ms_p95": stats["latency_ms"]["p95"]})
            print(f"concurrency {concurrency:4d}: {rps:8.1f} req/s  (in-flight/latency = {ideal:8.1f}; "
                  f"{rps / ideal:5.1%})  p50 {stats['latency_ms']['p50']} ms  p95 {stats['latency_ms']['p95']} ms",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {"latency_ms": latency_ms, "runs": results}


def machine() -> dict:
    import openai

    from pipeline.machine import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "openai": openai.__version__, "os": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=100.0, help="the fake server's fixed reply latency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="requests in flight")
    parser.add_argument("--min-seconds", type=float, default=1.5, help="each level runs about this long (at the ideal rate)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "judge.json"))
    args = parser.parse_args()

    result = {"benchmark": "judge", "date": datetime.date.today().isoformat(), "machine": machine(),
              **run(args.latency_ms, args.concurrency, args.min_seconds)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    best = max(result["runs"], key=lambda r: r["concurrency"])
    m = result["machine"]
    line = (f"- `judge.py` ({result['date']}): LLM judge vs the local fake server at {args.latency_ms:g} ms latency: "
            + ", ".join(f"{r['concurrency']} in flight {r['requests_per_s']} req/s ({r['efficiency']:.0%} of "
                        f"{r['ideal_requests_per_s']})" for r in result["runs"])
            + f". Machine: {m['cpu']}, {m['cores']} cores shared with other work (load {m['load_average_1min']}), "
              f"Python {m['python']}, openai {m['openai']}; server in a separate process. At high in-flight counts "
              f"the client's CPU per request (~2 ms, mostly the openai client building the request) is the limit. "
              f"Details: `judge.json`.\n")
    readme = out.parent / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmark results\n\nOne line per `bench/` script (its latest run).\n\n"
    kept = [l for l in text.splitlines(keepends=True) if not l.startswith("- `judge.py`")]  # replace our line
    readme.write_text("".join(kept) + line)
    print(f"wrote {out} (highest level: {best['requests_per_s']} req/s at {best['concurrency']} in flight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
