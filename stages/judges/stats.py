"""Judge numbers for stats: per shard from its adjudication log rows, then summed over shards.

A request is one question to the LLM (one per sample, or none when the rules or the cache
decided): its log rows share ``(key, input_hash)`` and carry their share of its latency and
tokens, so sums over rows are request totals. Latency percentiles need the single values, so
a shard keeps its request latencies and the run-level merge computes p50/p95 from all of them.
"""
from __future__ import annotations

from collections import Counter


def shard_judge_stats(log_rows: list[dict]) -> dict:
    requests: dict[tuple, dict] = {}
    decided_by: Counter = Counter()
    for row in log_rows:
        decided_by[row.get("decided_by") or "rules"] += 1
        if row.get("input_hash") and not row.get("cached"):
            req = requests.setdefault((row["key"], row["input_hash"]), {
                "latency_ms": 0.0, "attempts": int(row.get("attempts") or 0),
                "attempt_errors": row.get("attempt_errors") or "", "error": row.get("error") or ""})
            req["latency_ms"] += float(row.get("latency_ms") or 0.0)
    cached = {(r["key"], r["input_hash"]) for r in log_rows if r.get("input_hash") and r.get("cached")}
    errors: Counter = Counter()
    failed: Counter = Counter()
    for req in requests.values():
        errors.update(k for k in req["attempt_errors"].split(",") if k)
        if req["error"]:
            failed[req["error"].split(":")[0]] += 1
    llm_rows = [r for r in log_rows if r.get("decided_by") == "llm"]
    return {
        "requests": len(requests),
        "cached_requests": len(cached),
        "retries": sum(max(req["attempts"] - 1, 0) for req in requests.values()),
        "errors_by_kind": dict(errors),
        "failed_requests_by_kind": dict(failed),
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in log_rows),
        "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in log_rows),
        "decided_by": dict(decided_by),
        "llm_regions": len(llm_rows),
        "llm_accepted": sum(1 for r in llm_rows if r["accept"]),
        "latencies_ms": sorted(round(req["latency_ms"], 1) for req in requests.values()),
    }


def merge_judge_stats(shards: list[dict]) -> dict:
    """Run totals from per-shard judge stats: counts summed, latency p50/p95 over all requests."""
    totals: Counter = Counter()
    by_key = {k: Counter() for k in ("errors_by_kind", "failed_requests_by_kind", "decided_by")}
    latencies: list[float] = []
    for stats in shards:
        for key, value in (stats or {}).items():
            if key in by_key:
                by_key[key].update(value)
            elif key == "latencies_ms":
                latencies.extend(value)
            else:
                totals[key] += value
    latencies.sort()
    return {
        **{k: totals[k] for k in ("requests", "cached_requests", "retries", "prompt_tokens", "completion_tokens")},
        **{k: dict(sorted(v.items())) for k, v in by_key.items()},
        "latency_ms": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95),
                       "max": latencies[-1] if latencies else None},
        "accept_share": round(totals["llm_accepted"] / totals["llm_regions"], 4) if totals["llm_regions"] else None,
    }


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    # nearest rank: a value that was actually observed
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]
