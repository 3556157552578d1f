"""``lookandlearn evaluate judge OUT [OUT ...] --labels FILE``: verdicts against human labels.

The label file is JSONL, one judged candidate region per line::

    {"key": "lookandlearn-sample-scene-003", "entity": 0, "region": 1, "accept": true}

``key`` is the sample key, ``region`` the region id within the sample (as in the shard's
``regions`` and the adjudication log), ``entity`` the entity id (optional; when given it must
match the log, a guard against labels written for another build), ``accept`` whether a person
would keep the region for the phrase. Blank lines and lines starting with ``#`` are ignored.

Each output folder's verdicts (the adjudication logs of its complete shards) are compared with
the labels: accept precision (of the regions the judge accepted, the share people accept),
accept recall (of the regions people accept, the share the judge accepted), overall agreement
and Cohen's kappa, also split by who decided (rules, llm, fallback). Build the same inputs
with two judges or two prompts into two folders and pass both to compare them.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


class LabelError(ValueError):
    """A label file that cannot be used (exit code 2)."""


def read_labels(path: str | Path) -> dict[tuple[str, int], dict]:
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"--labels: no such file: {path}")
    labels: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LabelError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise LabelError(f"{path}:{number}: expected an object with key, region, accept")
        if not isinstance(item.get("key"), str) or type(item.get("region")) is not int \
                or not isinstance(item.get("accept"), bool):
            raise LabelError(f"{path}:{number}: needs \"key\" (string), \"region\" (integer) and "
                             "\"accept\" (true/false)")
        if "entity" in item and item["entity"] is not None and type(item["entity"]) is not int:
            raise LabelError(f"{path}:{number}: \"entity\" must be an integer id")
        ident = (item["key"], item["region"])
        if ident in labels:
            raise LabelError(f"{path}:{number}: region {item['region']} of {item['key']} is labelled twice")
        labels[ident] = item
    if not labels:
        raise LabelError(f"{path}: no labels")
    return labels


def read_verdicts(out_dir: str | Path) -> list[dict]:
    """The adjudication log rows of the complete shards of an output folder."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    paths = sorted((out / "logs").glob("adjudication-*.parquet"))
    if not paths:
        raise LabelError(f"{out}: no adjudication logs (logs/adjudication-*.parquet); is it a build output?")
    rows = []
    for path in paths:
        number = path.stem.rsplit("-", 1)[-1]
        if not any((out / "shards").glob(f"*-{number}.tar")):
            continue  # an unfinished shard is not part of the output
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _scores(pairs: list[tuple[bool, bool]]) -> dict:
    """pairs of (judge accept, human accept)."""
    tp = sum(1 for j, h in pairs if j and h)
    fp = sum(1 for j, h in pairs if j and not h)
    fn = sum(1 for j, h in pairs if not j and h)
    tn = sum(1 for j, h in pairs if not j and not h)
    n = len(pairs)

    def ratio(a, b):
        return round(a / b, 4) if b else None

    agreement = (tp + tn) / n if n else None
    expected = (((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)) if n else None
    kappa = (round((agreement - expected) / (1 - expected), 4)
             if n and expected is not None and expected < 1 else None)
    return {"n": n, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "accept_precision": ratio(tp, tp + fp), "accept_recall": ratio(tp, tp + fn),
            "agreement": round(agreement, 4) if agreement is not None else None, "kappa": kappa}


def evaluate_judge(out_dir: str | Path, labels: dict[tuple[str, int], dict]) -> dict:
    verdicts = {(r["key"], int(r["region"])): r for r in read_verdicts(out_dir)}
    pairs: list[tuple[bool, bool]] = []
    by_decider: dict[str, list] = defaultdict(list)
    unmatched, entity_mismatch = [], []
    for ident, label in labels.items():
        row = verdicts.get(ident)
        if row is None:
            unmatched.append(ident)
            continue
        if label.get("entity") is not None and int(label["entity"]) != int(row["entity"]):
            entity_mismatch.append(ident)
            continue
        pair = (bool(row["accept"]), bool(label["accept"]))
        pairs.append(pair)
        by_decider[row.get("decided_by") or "rules"].append(pair)
    judges = sorted({(r.get("model") or "", r.get("prompt") or "", r.get("prompt_hash") or "")
                     for r in verdicts.values()})
    return {
        "out": str(out_dir),
        "judges": [{"model": m, "prompt": p, "prompt_hash": h} for m, p, h in judges],
        "labels": len(labels),
        "matched": len(pairs),
        "unmatched": len(unmatched),
        "entity_mismatch": len(entity_mismatch),
        **_scores(pairs),
        "by_decided_by": {k: _scores(v) for k, v in sorted(by_decider.items())},
    }


def format_table(results: list[dict]) -> str:
    head = ("output", "judge", "matched", "precision", "recall", "agreement", "kappa")
    lines = [head]
    for r in results:
        judge = ", ".join(sorted({f"{j['model']} {j['prompt']}".strip() for j in r["judges"]})) or "-"
        lines.append((r["out"], judge, f"{r['matched']}/{r['labels']}",
                      *(("-" if r[k] is None else f"{r[k]:.3f}") for k in ("accept_precision", "accept_recall",
                                                                            "agreement", "kappa"))))
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines)
    notes = [f"{r['out']}: {r['unmatched']} labels have no verdict in the logs" for r in results if r["unmatched"]]
    notes += [f"{r['out']}: {r['entity_mismatch']} labels name another entity than the log"
              for r in results if r["entity_mismatch"]]
    return text + ("\n" + "\n".join(notes) if notes else "")
