"""``lookandlearn evaluate labels OUT --truth FILE``: a build's groundings against gold masks.

The truth file (``pipeline/labels_truth.py``, README "Evaluate labels") lists, per input, the
noun phrases with the mask of what each names, or null when it names nothing in the image. Each
truth entity is matched to the build's entity of the same sample (by the input id or sample key),
turn (null and -1 both mean the caption), and ``start``/``end``; failing that, by the same phrase
text in the same turn. An entity is *grounded* when the build accepted at least one region for it;
its mask is the union of the accepted regions' masks.

* precision: of the grounded entities that have a truth line, the share whose mask has IoU >=
  ``iou`` (0.5) with the truth mask (a grounded phrase that names nothing is a false grounding);
* recall: of the truth entities that name something, the share grounded with IoU >= ``iou``
  (a phrase the parser did not find, or an input the build rejected, is a miss);
* the IoU distribution of the grounded entities that name something; the false-grounding rate
  (of the phrases that name nothing, the share grounded);
* the same by entity status, phrase root, detector-score band (best candidate) and judge decision.

Build entities without a truth line (phrases nobody labelled, e.g. "a gray background") are
counted, not scored. Shards are read through the record module, complete shards only.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.inspect import _band
from pipeline.labels_truth import TruthEntity, TruthError, read_truth
from stages.record import accepted_regions, rle
from stages.record.shards import iter_records, shard_files

IOU_BINS = [round(0.1 * k, 1) for k in range(11)]
NO_SAMPLE, NOT_FOUND = "(no sample)", "(not found)"


def _turn(value) -> int | None:
    return None if value in (None, -1) else int(value)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _union(record: dict, entity: dict, shape: tuple[int, int]) -> np.ndarray | None:
    regions = accepted_regions(record, entity)
    if not regions:
        return None
    out = np.zeros(shape, bool)
    for region in regions:
        mask = rle.decode(region["mask_rle"])
        if mask.shape != shape:
            raise TruthError(f"sample {record['key']}: region {region.get('id')} mask is {list(mask.shape)}, "
                             f"the truth mask {list(shape)}")
        out |= mask
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def _decision(record: dict, entity: dict) -> str:
    cands = [r for r in record.get("regions", []) if r.get("entity") == entity.get("id")]
    if not cands:
        return "no candidates"
    judge = next((str((r.get("verdict") or {}).get("judge")) for r in cands if r.get("verdict")), "?")
    return f"{judge}: " + ("accept" if accepted_regions(record, entity) else "reject all")


def _match(truth: list[TruthEntity], entities: list[dict]) -> list[tuple[dict | None, str]]:
    """The build entity of each truth entity and how it was found (``span``, ``phrase``, ``none``)."""
    by_span = {(_turn(e.get("turn")), e.get("start"), e.get("end")): e for e in entities}
    used: set[int] = set()
    out: list[tuple[dict | None, str]] = [(None, "none")] * len(truth)
    for k, t in enumerate(truth):
        e = by_span.get((t.turn, t.start, t.end))
        if e is not None and id(e) not in used:
            used.add(id(e))
            out[k] = (e, "span")
    for k, t in enumerate(truth):
        if out[k][0] is None:
            e = next((e for e in entities if id(e) not in used and _turn(e.get("turn")) == t.turn
                      and _norm(e.get("phrase", "")) == _norm(t.phrase)), None)
            if e is not None:
                used.add(id(e))
                out[k] = (e, "phrase")
    return out


def read_records(out: str | Path) -> tuple[dict[str, dict], dict]:
    """The records of a build's complete shards by sample key, and the shard counts."""
    files, incomplete = shard_files(out)
    records = {record["key"]: record for f in files.values() for record, _, _ in iter_records(f["tar"])}
    return records, {"shards": len(files), "incomplete_shards": len(incomplete)}


def score_rows(out: str | Path, truth: dict[str, list[TruthEntity]], iou: float = 0.5,
               records: tuple[dict[str, dict], dict] | None = None) -> tuple[list[dict], dict]:
    """One row per truth entity (status, root, band, decision, grounded, iou, correct) and counts;
    ``records``: :func:`read_records`'s answer when the caller has it (e.g. re-judged in memory)."""
    records, shard_counts = records or read_records(out)
    by_source: dict[str, list[str]] = defaultdict(list)
    for key, record in records.items():
        by_source[str((record.get("source") or {}).get("id"))].append(key)
    rows, counts = [], Counter(truth_lines=len(truth), **shard_counts)
    for ident, entities in truth.items():
        keys = [ident] if ident in records else by_source.get(ident, [])
        if len(keys) > 1:
            raise TruthError(f"--truth: id {ident!r} names {len(keys)} samples ({', '.join(keys[:3])}, ...): "
                             "use the sample key")
        record = records.get(keys[0]) if keys else None
        counts["lines_matched" if record else "lines_without_sample"] += 1
        matches = _match(entities, record.get("entities", [])) if record else [(None, "none")] * len(entities)
        if record:
            counts["build_entities_unlabelled"] += len(record.get("entities", [])) - sum(e is not None for e, _ in matches)
        for t, (e, how) in zip(entities, matches):
            counts[f"matched_by_{how}"] += 1
            row = {"id": ident, "key": record["key"] if record else None, "turn": t.turn, "start": t.start,
                   "end": t.end, "phrase": t.phrase, "names": t.mask is not None, "matched": how,
                   "status": NO_SAMPLE if record is None else NOT_FOUND if e is None else str(e.get("status")),
                   "root": str((e or {}).get("root") or t.phrase.split()[-1]).lower(),
                   "band": "(no candidates)", "decision": "(no sample)" if record is None else "no candidates",
                   "grounded": False, "iou": None}
            if e is not None:
                scores = [float(r.get("det_score") or 0) for r in record.get("regions", []) if r.get("entity") == e.get("id")]
                if scores:
                    lo, hi = _band(max(scores))
                    row["band"] = f"{lo:.2f}-{hi:.2f}"
                row["decision"] = _decision(record, e)
                want = rle.decode(t.mask.model_dump()) if t.mask is not None else None
                shape = want.shape if want is not None else (record["image"]["height"], record["image"]["width"])
                if want is not None and tuple(shape) != (record["image"]["height"], record["image"]["width"]):
                    raise TruthError(f"--truth: id {ident!r}, phrase {t.phrase!r}: mask size {list(shape)} is not the "
                                     f"stored image's [{record['image']['height']}, {record['image']['width']}]")
                got = _union(record, e, tuple(shape))
                row["grounded"] = got is not None
                if got is not None and want is not None:
                    row["iou"] = round(_iou(got, want), 4)
            row["correct"] = row["names"] and row["iou"] is not None and row["iou"] >= iou
            rows.append(row)
    return rows, dict(counts)


def _rate(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def summarise(rows: list[dict]) -> dict:
    """Precision, recall, F1, mean IoU and false grounding of a set of truth-entity rows."""
    named = [r for r in rows if r["names"]]
    ghosts = [r for r in rows if not r["names"]]
    grounded = sum(r["grounded"] for r in rows)
    tp = sum(r["correct"] for r in rows)
    p, rc = _rate(tp, grounded), _rate(tp, len(named))
    ious = [r["iou"] for r in named if r["iou"] is not None]
    return {"entities": len(rows), "names_something": len(named), "grounded": grounded, "correct": tp,
            "precision": p, "recall": rc,
            "f1": None if p is None or rc is None else round(2 * p * rc / (p + rc), 4) if p + rc else 0.0,
            "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
            "names_nothing": len(ghosts), "false_grounded": sum(r["grounded"] for r in ghosts),
            "false_grounding_rate": _rate(sum(r["grounded"] for r in ghosts), len(ghosts))}


def _distribution(rows: list[dict]) -> dict:
    ious = np.array([r["iou"] for r in rows if r["names"] and r["iou"] is not None])
    named = [r for r in rows if r["names"]]
    hist = np.histogram(ious, bins=IOU_BINS)[0].tolist() if len(ious) else [0] * (len(IOU_BINS) - 1)
    out = {"grounded_with_truth_mask": int(len(ious)),
           "bins": [{"lo": lo, "hi": hi, "count": int(c)} for lo, hi, c in zip(IOU_BINS, IOU_BINS[1:], hist)],
           "mean_iou_all": round(sum(r["iou"] or 0.0 for r in named) / len(named), 4) if named else None}
    if len(ious):
        out.update({q: round(float(np.quantile(ious, v)), 4) for q, v in
                    (("p10", 0.1), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p90", 0.9))})
        out["mean"] = round(float(ious.mean()), 4)
    return out


def _by(rows: list[dict], field: str, top: int = 0) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r[field])].append(r)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    if field == "band":
        ordered = sorted(groups.items(), key=lambda kv: kv[0])
    if top:
        ordered = ordered[:top]
    return [{field: name, **summarise(members)} for name, members in ordered]


def evaluate_labels(out: str | Path, truth: dict[str, list[TruthEntity]] | str | Path, iou: float = 0.5,
                    top: int = 20, records: tuple[dict[str, dict], dict] | None = None) -> dict:
    """The whole report, JSON-ready (``records``: see :func:`score_rows`)."""
    if not isinstance(truth, dict):
        truth = read_truth(truth)
    rows, counts = score_rows(out, truth, iou, records)
    return {"out": str(out), "iou_threshold": iou, "counts": counts, "overall": summarise(rows),
            "iou_distribution": _distribution(rows),
            "by_status": _by(rows, "status"), "by_root": _by(rows, "root", top), "by_det_score": _by(rows, "band"),
            "by_decision": _by(rows, "decision"), "entities": rows}


# --- output -----------------------------------------------------------------------------------------

def _cell(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


_COLUMNS = ("entities", "names_something", "grounded", "correct", "precision", "recall", "f1", "mean_iou",
            "names_nothing", "false_grounded", "false_grounding_rate")
_HEADERS = ("entities", "named", "grounded", "correct", "precision", "recall", "F1", "mean IoU",
            "name nothing", "false grounded", "false rate")


def render(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:      # eleven number columns: wider than 80 even with short headers
        console = Console()
        console = Console(width=max(console.width, 132))
    c = report["counts"]
    console.print(f"[bold]{report['out']}[/bold]: {c.get('truth_lines', 0)} truth lines, "
                  f"{c.get('lines_matched', 0)} matched to samples, {c.get('lines_without_sample', 0)} without one; "
                  f"entities matched by span {c.get('matched_by_span', 0)}, by phrase {c.get('matched_by_phrase', 0)}, "
                  f"not found {c.get('matched_by_none', 0)}; build entities without truth (not scored) "
                  f"{c.get('build_entities_unlabelled', 0)}; correct = IoU >= {report['iou_threshold']}")

    def table(title: str, key: str | None, rows: list[dict]) -> None:
        t = Table(title=title, title_justify="left")
        if key:
            t.add_column(key)
        for h in _HEADERS:
            t.add_column(h, justify="right")
        for row in rows:
            t.add_row(*([str(row[key])] if key else []), *(_cell(row[col]) for col in _COLUMNS))
        console.print(t)

    table("Overall", None, [report["overall"]])
    d = report["iou_distribution"]
    t = Table(title=f"Mask IoU of grounded entities that name something ({d['grounded_with_truth_mask']}; "
                    f"mean over all named, ungrounded = 0: {_cell(d['mean_iou_all'])})", title_justify="left")
    for col in ("IoU", "count"):
        t.add_column(col, justify="right")
    for b in d["bins"]:
        t.add_row(f"{b['lo']:.1f}-{b['hi']:.1f}", str(b["count"]))
    if "p50" in d:
        t.add_row("p10 / p50 / p90", f"{d['p10']:.3f} / {d['p50']:.3f} / {d['p90']:.3f}")
    console.print(t)
    table("By entity status", "status", report["by_status"])
    table("By phrase root", "root", report["by_root"])
    table("By detector-score band (best candidate)", "band", report["by_det_score"])
    table("By judge decision", "decision", report["by_decision"])


def main(args) -> int:
    report = evaluate_labels(args.out, read_truth(args.truth), iou=args.iou, top=args.top)
    if args.json == "-":
        print(json.dumps(report, indent=1))
        return 0
    render(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
