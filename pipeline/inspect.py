"""``lookandlearn inspect OUT``: what a build produced, and where it went wrong.

Reads an output folder (docs/schema.md) and reports acceptance and grounding
rates overall, by reason, by phrase root and by detector-score band; judge latency, tokens and
errors (whatever columns the adjudication logs carry: they are read dynamically, so a judge
that adds ``decided_by`` or token columns shows up without a change here); and the worst
shards. Only *complete* shards count (tar, index, log, stats and rejected all present), as in
stats.json; incomplete ones are listed.

:func:`analyze` returns a JSON-ready dict (``--json``); :func:`render` prints it as ``rich``
tables. The output folder's files and shards are read through the record module
(:mod:`stages.record.shards`: ``shard_files``, ``iter_records``), as the HTML gallery and publish
read them; :func:`read_logs` is shared with the gallery.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from stages.record import ENTITY_STATUSES
from stages.record.shards import dataset_name, iter_records, shard_files

BAND_WIDTH = 0.05


# --- reading an output folder -----------------------------------------------------------------

def _read_parquets(paths: list[Path]) -> pd.DataFrame:
    """Concatenate parquet files whose columns may differ (older shards of a resumed run)."""
    frames = [pq.read_table(p).to_pandas() for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True, sort=False)


def read_logs(files: dict[int, dict[str, Path]]) -> pd.DataFrame:
    logs = _read_parquets([f["log"] for f in files.values()])
    if len(logs) and "shard" not in logs.columns:
        logs["shard"] = -1
    return logs


def _name(out: Path, files: dict[int, dict[str, Path]]) -> str:
    manifest = out / "manifest.resolved.yaml"
    if manifest.is_file():
        import yaml

        try:
            name = (yaml.safe_load(manifest.read_text()) or {}).get("name")
            if name:
                return str(name)
        except yaml.YAMLError:
            pass
    for f in files.values():
        return dataset_name(f["tar"])
    return out.name


# --- analysis ---------------------------------------------------------------------------------

def _rate(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _prefix(reason) -> str:
    return str(reason or "").split(":")[0].strip() or "(none)"


def _band(score: float) -> tuple[float, float]:
    lo = min(math.floor(float(score) / BAND_WIDTH + 1e-9), int(round(1 / BAND_WIDTH)) - 1) * BAND_WIDTH
    return round(lo, 4), round(lo + BAND_WIDTH, 4)


def _quantiles(values: pd.Series) -> dict:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if not len(values):
        return {}
    return {"mean": round(float(values.mean()), 3), "p50": round(float(values.quantile(0.5)), 3),
            "p95": round(float(values.quantile(0.95)), 3), "max": round(float(values.max()), 3)}


def _has_error(logs: pd.DataFrame) -> pd.Series:
    if "error" not in logs.columns:
        return pd.Series(False, index=logs.index)
    return logs["error"].fillna("").astype(str).str.strip() != ""


def _error_kind(logs: pd.DataFrame) -> pd.Series:
    for col in ("error_kind", "error_type"):
        if col in logs.columns:
            kind = logs[col].fillna("").astype(str)
            return kind.where(kind != "", logs["error"].fillna("").astype(str).map(_prefix))
    return logs["error"].fillna("").astype(str).map(_prefix)


def _token_columns(logs: pd.DataFrame) -> list[str]:
    return [c for c in logs.columns if "tokens" in c and pd.api.types.is_numeric_dtype(logs[c])]


def _latency_column(logs: pd.DataFrame) -> str | None:
    if "latency_ms" in logs.columns:
        return "latency_ms"
    return next((c for c in logs.columns if "latency" in c and pd.api.types.is_numeric_dtype(logs[c])), None)


def analyze(out: str | Path, top: int = 20, worst: int = 5) -> dict:
    """Everything ``inspect`` reports, as a JSON-ready dict."""
    out = Path(out)
    files, incomplete = shard_files(out, hashes=True)  # sizes and sha256 against each completion record

    # samples and entities, from the shards themselves
    entity_rows = []
    samples_out = samples_grounded = 0
    per_shard = {n: Counter() for n in files}
    best_score: dict[tuple[str, int], float] = {}
    for shard, f in files.items():
        for record, _, _ in iter_records(f["tar"]):
            samples_out += 1
            grounded_here = False
            for entity in record.get("entities", []):
                status = entity.get("status") or "(none)"
                entity_rows.append((shard, record["key"], entity.get("id"), str(entity.get("root") or "").lower(),
                                    status, _prefix(entity.get("reason")) if status != "grounded" else ""))
                per_shard[shard][f"entities_{status}"] += 1
                grounded_here |= status == "grounded"
            for region in record.get("regions", []):
                k = (record["key"], region.get("entity"))
                best_score[k] = max(best_score.get(k, 0.0), float(region.get("det_score") or 0.0))
            samples_grounded += grounded_here
            per_shard[shard]["samples_out"] += 1
    entities = pd.DataFrame(entity_rows, columns=["shard", "key", "entity", "root", "status", "reason"])

    rejected = _read_parquets([f["rejected"] for f in files.values()])
    for shard, f in files.items():
        per_shard[shard]["samples_rejected"] = pq.read_metadata(f["rejected"]).num_rows
    logs = read_logs(files)

    status_counts = Counter(entities["status"]) if len(entities) else Counter()
    candidates = len(entities) - status_counts.get("skipped", 0)
    n_regions = len(logs)
    n_accepted = int(logs["accept"].fillna(False).astype(bool).sum()) if n_regions else 0
    samples_in = samples_out + len(rejected)
    overall = {
        "samples_in": samples_in, "samples_out": samples_out, "samples_rejected": len(rejected),
        "sample_keep_rate": _rate(samples_out, samples_in),
        "samples_with_grounding": samples_grounded,
        "sample_grounding_rate": _rate(samples_grounded, samples_out),
        "entities": len(entities),
        "entities_by_status": {s: status_counts.get(s, 0) for s in ENTITY_STATUSES},
        "entity_grounding_rate": _rate(status_counts.get("grounded", 0), candidates),
        "regions": n_regions, "regions_accepted": n_accepted,
        "judge_accept_rate": _rate(n_accepted, n_regions),
    }

    rejected_inputs = []
    if len(rejected):
        counts = Counter(rejected["reason"].map(_prefix))
        rejected_inputs = [{"reason": r, "count": c, "share": _rate(c, samples_in)} for r, c in counts.most_common()]

    entity_reasons = []
    if len(entities):
        not_grounded = entities[entities["status"] != "grounded"]
        for (status, reason), count in Counter(zip(not_grounded["status"], not_grounded["reason"])).most_common():
            entity_reasons.append({"status": status, "reason": reason, "count": count,
                                   "share": _rate(count, len(entities))})

    verdict_reasons = []
    if n_regions:
        prefixes = logs["reason"].map(_prefix)
        accept = logs["accept"].fillna(False).astype(bool)
        for reason, count in Counter(prefixes).most_common():
            verdict_reasons.append({"reason": reason, "regions": count, "share": _rate(count, n_regions),
                                    "accepted": int(accept[prefixes == reason].sum())})

    by_root = []
    if len(entities):
        region_stats = {}
        if n_regions:
            roots = logs["root"].fillna("").astype(str).str.lower() if "root" in logs.columns else pd.Series("", index=logs.index)
            accept = logs["accept"].fillna(False).astype(bool)
            region_stats = {root: (len(group), int(accept[group.index].sum()))
                            for root, group in roots.groupby(roots)}
        for root, group in entities.groupby("root"):
            c = Counter(group["status"])
            regions, accepted = region_stats.get(root, (0, 0))
            by_root.append({"root": root or "(none)", "entities": len(group),
                            **{s: c.get(s, 0) for s in ENTITY_STATUSES},
                            "grounding_rate": _rate(c.get("grounded", 0), len(group) - c.get("skipped", 0)),
                            "regions": regions, "accepted": accepted, "accept_rate": _rate(accepted, regions)})
        by_root.sort(key=lambda r: (-r["entities"], r["root"]))

    by_band = []
    if n_regions:
        bands = defaultdict(lambda: {"regions": 0, "accepted": 0, "mask_scores": [], "entities": 0, "grounded": 0})
        for score, ok, mask_score in zip(logs["det_score"], logs["accept"].fillna(False).astype(bool),
                                         logs.get("mask_score", pd.Series(float("nan"), index=logs.index))):
            b = bands[_band(score)]
            b["regions"] += 1
            b["accepted"] += int(ok)
            if mask_score == mask_score:
                b["mask_scores"].append(float(mask_score))
        status_of = {(k, e): s for k, e, s in zip(entities["key"], entities["entity"], entities["status"])} if len(entities) else {}
        for k, score in best_score.items():
            b = bands[_band(score)]
            b["entities"] += 1
            b["grounded"] += int(status_of.get(k) == "grounded")
        for (lo, hi), b in sorted(bands.items()):
            by_band.append({"band": f"{lo:.2f}-{hi:.2f}", "lo": lo, "hi": hi, "regions": b["regions"],
                            "accepted": b["accepted"], "accept_rate": _rate(b["accepted"], b["regions"]),
                            "mean_mask_score": round(sum(b["mask_scores"]) / len(b["mask_scores"]), 4) if b["mask_scores"] else None,
                            "entities_by_best_region": b["entities"],
                            "entity_grounding_rate": _rate(b["grounded"], b["entities"])})

    judge = _judge_section(logs)

    shards = []
    errors_by_shard = Counter(logs.loc[_has_error(logs), "shard"]) if n_regions else Counter()
    for shard, f in files.items():
        stats = json.loads(f["stats"].read_text())
        c = per_shard[shard]
        n_in = c["samples_out"] + c["samples_rejected"]
        ents = sum(v for k, v in c.items() if k.startswith("entities_"))
        cands = ents - c["entities_skipped"]
        regions = stats.get("regions", 0)
        shards.append({
            "shard": shard, "file": f["tar"].name, "samples_in": n_in, "samples_out": c["samples_out"],
            "rejected_share": _rate(c["samples_rejected"], n_in),
            "entity_grounding_rate": _rate(c["entities_grounded"], cands),
            "judge_accept_rate": _rate(stats.get("regions_accepted", 0), regions),
            "judge_errors": int(errors_by_shard.get(shard, 0)),
        })
    shards.sort(key=lambda s: (s["entity_grounding_rate"] if s["entity_grounding_rate"] is not None else 2.0,
                               -(s["judge_errors"] or 0),
                               -(s["rejected_share"] or 0),
                               s["judge_accept_rate"] if s["judge_accept_rate"] is not None else 2.0,
                               s["shard"]))

    stats_json = {}
    if (out / "stats.json").is_file():
        stats_json = json.loads((out / "stats.json").read_text())
    return {
        "out": str(out), "name": _name(out, files),
        "shards": {"complete": len(files), "incomplete": incomplete},
        "overall": overall,
        "rejected_inputs": rejected_inputs,
        "entity_reasons": entity_reasons,
        "verdict_reasons": verdict_reasons,
        "by_root": by_root[:top] if top else by_root,
        "roots_total": len(by_root),
        "by_det_score": by_band,
        "judge": judge,
        "worst_shards": shards[:worst] if worst else shards,
        "stage_seconds": stats_json.get("stage_seconds", {}),
    }


def _judge_section(logs: pd.DataFrame) -> dict:
    if not len(logs):
        return {"regions": 0, "by_model": [], "errors": [], "log_columns": list(logs.columns)}
    logs = logs.copy()
    logs["accept"] = logs["accept"].fillna(False).astype(bool)
    has_error = _has_error(logs)
    latency = _latency_column(logs)
    tokens = _token_columns(logs)
    group_cols = [c for c in ("model", "prompt", "decided_by") if c in logs.columns]
    for c in group_cols:
        logs[c] = logs[c].fillna("").astype(str)
    by_model = []
    for keys, group in (logs.groupby(group_cols, sort=True) if group_cols else [((), logs)]):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(group_cols, keys))
        row.update({"regions": len(group), "accepted": int(group["accept"].sum()),
                    "accept_rate": _rate(int(group["accept"].sum()), len(group)),
                    "errors": int(has_error[group.index].sum())})
        if latency:
            row["latency_ms"] = _quantiles(group[latency])
        for col in tokens:
            row[col] = {"total": int(group[col].fillna(0).sum()), "mean": round(float(group[col].fillna(0).mean()), 2)}
        by_model.append(row)
    errors = []
    if has_error.any():
        kinds = _error_kind(logs[has_error])
        for kind, count in Counter(kinds).most_common():
            example = str(logs.loc[kinds[kinds == kind].index[0], "error"])
            errors.append({"kind": kind, "count": count, "share": _rate(count, len(logs)), "example": example[:200]})
    section = {"regions": len(logs), "errors_total": int(has_error.sum()),
               "error_rate": _rate(int(has_error.sum()), len(logs)),
               "latency_ms": _quantiles(logs[latency]) if latency else {},
               "by_model": by_model, "errors": errors, "log_columns": list(logs.columns)}
    if "decided_by" in logs.columns:
        section["decided_by"] = dict(Counter(logs["decided_by"]).most_common())
    return section


# --- rendering --------------------------------------------------------------------------------

def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ms(q: dict) -> str:
    if not q:
        return "—"
    return f"{q['p50']:.1f} / {q['p95']:.1f} / {q['max']:.1f}"


def render(report: dict, console=None) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    o = report["overall"]
    sh = report["shards"]

    def table(title, *columns, left=1):
        t = Table(title=title, title_justify="left", title_style="bold")
        for i, col in enumerate(columns):
            t.add_column(col, justify="left" if i < left else "right", no_wrap=i < left)
        return t

    console.print(f"[bold]{report['name']}[/bold]  {report['out']}  ({sh['complete']} complete shards)")
    if sh["incomplete"]:
        console.print(f"[yellow]incomplete shards (not counted; rerun the build to finish them): "
                      f"{', '.join(str(n) for n in sh['incomplete'])}[/yellow]")
    t = table("Overall", "", "count", "rate")
    t.add_row("samples in", str(o["samples_in"]), "")
    t.add_row("samples written", str(o["samples_out"]), _pct(o["sample_keep_rate"]))
    t.add_row("inputs rejected", str(o["samples_rejected"]), _pct(_rate(o["samples_rejected"], o["samples_in"])))
    t.add_row("samples with ≥1 grounded entity", str(o["samples_with_grounding"]), _pct(o["sample_grounding_rate"]))
    t.add_row("entities", str(o["entities"]), "")
    for status, n in o["entities_by_status"].items():
        t.add_row(f"  {status}", str(n), _pct(_rate(n, o["entities"])))
    t.add_row("entity grounding rate (excl. skipped)", "", _pct(o["entity_grounding_rate"]))
    t.add_row("regions judged", str(o["regions"]), "")
    t.add_row("regions accepted", str(o["regions_accepted"]), _pct(o["judge_accept_rate"]))
    console.print(t)

    if report["rejected_inputs"]:
        t = table("Inputs rejected, by reason", "reason", "inputs", "share of inputs")
        for r in report["rejected_inputs"]:
            t.add_row(r["reason"], str(r["count"]), _pct(r["share"]))
        console.print(t)
    if report["entity_reasons"]:
        t = table("Entities not grounded, by reason", "status", "reason", "entities", "share of entities", left=2)
        for r in report["entity_reasons"]:
            t.add_row(r["status"], r["reason"], str(r["count"]), _pct(r["share"]))
        console.print(t)
    if report["verdict_reasons"]:
        t = table("Judge verdicts, by reason", "reason", "regions", "share", "accepted")
        for r in report["verdict_reasons"]:
            t.add_row(r["reason"], str(r["regions"]), _pct(r["share"]), str(r["accepted"]))
        console.print(t)
    if report["by_root"]:
        shown = len(report["by_root"])
        t = table(f"By phrase root (top {shown} of {report['roots_total']})", "root", "entities", "grounded",
                  "rejected", "ungrounded", "skipped", "grounding rate", "regions", "accept rate")
        for r in report["by_root"]:
            t.add_row(r["root"], str(r["entities"]), str(r["grounded"]), str(r["rejected"]), str(r["ungrounded"]),
                      str(r["skipped"]), _pct(r["grounding_rate"]), str(r["regions"]), _pct(r["accept_rate"]))
        console.print(t)
    if report["by_det_score"]:
        t = table("By detector score band", "det_score", "regions", "accepted", "accept rate", "mean mask score",
                  "entities (best region)", "grounding rate")
        for r in report["by_det_score"]:
            t.add_row(r["band"], str(r["regions"]), str(r["accepted"]), _pct(r["accept_rate"]),
                      "—" if r["mean_mask_score"] is None else f"{r['mean_mask_score']:.3f}",
                      str(r["entities_by_best_region"]), _pct(r["entity_grounding_rate"]))
        console.print(t)

    j = report["judge"]
    if j["regions"]:
        token_cols = sorted({k for row in j["by_model"] for k in row if "tokens" in k})
        group_cols = [c for c in ("model", "prompt", "decided_by") if any(c in row for row in j["by_model"])]
        t = table("Judge", *group_cols, "regions", "accept rate", "latency ms p50/p95/max", *token_cols, "errors",
                  left=len(group_cols))
        for row in j["by_model"]:
            t.add_row(*[row.get(c, "") for c in group_cols], str(row["regions"]), _pct(row["accept_rate"]),
                      _ms(row.get("latency_ms", {})),
                      *[f"{row[c]['total']} (mean {row[c]['mean']})" if c in row else "—" for c in token_cols],
                      str(row["errors"]))
        console.print(t)
        if j["errors"]:
            t = table(f"Judge errors ({j['errors_total']}, {_pct(j['error_rate'])} of regions)",
                      "kind", "count", "share", "example")
            t.columns[-1].justify = "left"
            for e in j["errors"]:
                t.add_row(e["kind"], str(e["count"]), _pct(e["share"]), e["example"])
            console.print(t)
        else:
            console.print("judge errors: none")
    if report["worst_shards"]:
        t = table("Worst shards (lowest entity grounding rate first)", "shard", "samples in", "written",
                  "rejected share", "grounding rate", "accept rate", "judge errors")
        for s in report["worst_shards"]:
            t.add_row(s["file"], str(s["samples_in"]), str(s["samples_out"]), _pct(s["rejected_share"]),
                      _pct(s["entity_grounding_rate"]), _pct(s["judge_accept_rate"]), str(s["judge_errors"]))
        console.print(t)
    if report.get("stage_seconds"):
        console.print("stage seconds (summed over workers): " +
                      ", ".join(f"{k} {v}" for k, v in report["stage_seconds"].items()))
