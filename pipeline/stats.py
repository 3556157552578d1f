"""Run-level outputs: stats.json (sum of per-shard stats), manifest.resolved.yaml, README.md card."""
from __future__ import annotations

import hashlib
import json
import platform
from collections import Counter
from pathlib import Path

import yaml

from pipeline.manifest import Manifest, manifest_to_dict
from stages.families import is_grounder
from stages.judges.stats import merge_judge_stats
from stages.record import SCHEMA_VERSION
from stages.record.features import card_features


def aggregate_stats(out_dir: Path, run: dict | None = None, complete: set[int] | None = None) -> dict:
    """Sum every complete shard's stats into stats.json (so resumed runs add up exactly).
    ``complete``: the complete shards' numbers when ``out_dir`` is a staging copy without the tars
    (a build into object storage, ``pipeline/remote_out.py``)."""
    totals: Counter = Counter()
    by_key: dict[str, Counter] = {k: Counter() for k in (
        "rejected_by_reason", "entities_by_status", "skipped_by_reason", "verdicts_by_reason", "stage_seconds")}
    shards = 0
    judge_shards: list[dict] = []
    for path in sorted((out_dir / "stats").glob("*.json")):
        if complete is not None:
            if not path.stem.isdigit() or int(path.stem) not in complete:
                continue
        elif not any((out_dir / "shards").glob(f"*-{path.stem}.tar")) or not (out_dir / "done" / path.name).exists():
            continue  # shard not complete: its stats are not part of the output
        stats = json.loads(path.read_text())
        shards += 1
        for key, value in stats.items():
            if key in by_key:
                by_key[key].update(value)
            elif key == "judge":
                judge_shards.append(value)
            elif key != "shard":
                totals[key] += value
    entities = totals["entities"]
    candidates = entities - by_key["entities_by_status"].get("skipped", 0)
    result = {
        "shards": shards,
        **{k: totals[k] for k in ("samples_in", "samples_out", "samples_rejected",
                                   "samples_with_grounding", "entities", "regions", "regions_accepted")},
        "rates": {
            "sample_keep": _rate(totals["samples_out"], totals["samples_in"]),
            "samples_with_grounding": _rate(totals["samples_with_grounding"], totals["samples_out"]),
            "entities_grounded": _rate(by_key["entities_by_status"].get("grounded", 0), candidates),
            "judge_accept": _rate(totals["regions_accepted"], totals["regions"]),
        },
        **{k: dict(sorted(v.items())) for k, v in by_key.items() if k != "stage_seconds"},
        "stage_seconds": {k: round(v, 3) for k, v in by_key["stage_seconds"].items()},
        # requests, retries, errors by kind, tokens, latency p50/p95, who decided (stages/judges/stats.py)
        "judge": merge_judge_stats(judge_shards),
    }
    if run:
        result["last_run"] = run
    (out_dir / "stats.json").write_text(json.dumps(result, indent=2, sort_keys=False))
    return result


def _rate(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _model_revision(name: str, revision: str | None) -> str:
    """Exact revision of a model: the hub commit hash from the local cache, or a hash of a
    local folder's config (random tiny models included), so the card says what was used."""
    path = Path(name)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.glob("*.json")):
            digest.update(f.read_bytes())
        return f"local:{digest.hexdigest()[:12]}"
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, revision=revision, local_files_only=True)
        return Path(folder).name
    except Exception:
        return revision or "unresolved"


def resolved_models(manifest: Manifest) -> dict:
    """The exact detector and segmenter revisions (part of the shards' settings fingerprint)."""
    return {"detector_revision": _model_revision(manifest.detect.model, manifest.detect.revision),
            "segmenter_revision": _model_revision(manifest.segment.model, manifest.segment.revision)}


def write_resolved_manifest(out_dir: Path, manifest: Manifest, extra: dict | None = None) -> dict:
    data = manifest_to_dict(manifest)
    data["resolved"] = {
        **resolved_models(manifest),
        "judge": manifest.adjudicate.judge,
        "python": platform.python_version(),
        **(extra or {}),
    }
    data.get("output", {}).pop("storage_options", None)  # may hold credentials: never written
    if data["adjudicate"].get("base_url"):
        pass  # endpoints are fine to record; API keys are never part of the manifest
    (out_dir / "manifest.resolved.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return data


CARD_TEMPLATE = """---
{header}---

# {name}

Pseudo-grounding dataset built with Look&Learn `{version}` (sample schema {schema}): every
concrete noun phrase of each caption is tied to segmentation masks of the image regions it names
(GroundingDINO boxes → SAM masks → judged), or marked as not grounded with the reason.

{warning}

## Source data
{source_rows}

## Contents
- `shards/*.tar`: WebDataset shards; per sample `{{key}}.jpg|png|webp` and `{{key}}.json`
  (entities with character offsets, regions with boxes, COCO RLE masks and verdicts).
- `index/*.parquet`: one row per sample; `logs/*.parquet`: every judge decision;
  `rejected/*.parquet`: inputs that could not be used, with the reason.
- `stats.json` (totals; `stats/*.json` per shard) and `manifest.resolved.yaml` (the manifest as run).

## Sample schema
`{{key}}.json`: `key`; `source` (`dataset`, `id`, `meta` = the input's extra fields as JSON:
url, license, similarity ...); `image` (`width`, `height`, `sha256`); `text` (`caption`,
`captions`, or `conversations`); `entities[]` (`id`, `phrase`, `start`/`end` character offsets into
the text of `turn`: -1 the caption, else the index into `captions` or `conversations`, `root`,
`plural`, `expression`, `status` = grounded | rejected |
ungrounded | skipped, `regions` = accepted region ids, `reason`); `regions[]` (`id`, `entity`,
`box_xyxy` in pixels, `det_score`, `mask_rle` COCO RLE at the stored size, `mask_score`, `area`,
`verdict`); `provenance`. Every field is described in `docs/schema.md` of Look&Learn `{version}`.

## Load
The `configs` entry in this card's header points `load_dataset` at the shards:
```python
from datasets import load_dataset
ds = load_dataset("USER/NAME", split="train")  # this repository's id, or its local folder
# any copy of the shards, alone or with other Look&Learn builds (caption or conversation, one
# schema): the declared features (`dataset_info` above) keep every field typed the same
from datasets import load_dataset_builder
features = load_dataset_builder("USER/NAME").info.features
ds = load_dataset("webdataset", data_files={{"train": ["shards/*.tar", "../other-build/shards/*.tar"]}},
                  split="train", features=features)
```
The declared features need `datasets` >= 4.7 (`source.meta` is a `Json` field).
Each row has the image (`{image_ext}`) and the record (`json`); a region's mask is
`pycocotools.mask.decode(region["mask_rle"])` (the counts string encoded to bytes).

## Statistics
| | |
|---|---|
{stats_rows}

{breakdowns}

## How it was built
{built_rows}

<details><summary>Resolved manifest (<code>manifest.resolved.yaml</code>)</summary>

```yaml
{manifest_yaml}```

</details>
"""


def _judges_used(out_dir: Path, complete: set[int] | None = None) -> list[tuple[str, str, int]]:
    """(judge model, prompt version, regions) from the adjudication logs of complete shards."""
    import pyarrow.parquet as pq

    used: Counter = Counter()
    for path in sorted((out_dir / "logs").glob("adjudication-*.parquet")):
        number = path.stem.rsplit("-", 1)[-1]
        if complete is not None:
            if not number.isdigit() or int(number) not in complete:
                continue
        elif not any((out_dir / "shards").glob(f"*-{number}.tar")):
            continue
        names = pq.read_schema(path).names
        cols = [c for c in ("model", "prompt") if c in names]
        if not cols:
            continue
        table = pq.read_table(path, columns=cols).to_pydict()
        n = len(table[cols[0]])
        used.update(zip(table.get("model", [""] * n), table.get("prompt", [""] * n)))
    return [(str(m or ""), str(pv or ""), c) for (m, pv), c in sorted(used.items(), key=lambda kv: -kv[1])]


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((counts or {}).items(), key=lambda kv: -kv[1])) or "none"


def write_card(out_dir: Path, manifest: Manifest, stats: dict, resolved: dict, version: str,
               complete: set[int] | None = None) -> None:
    """README.md: a Hub dataset card (YAML header valid for ``huggingface_hub.DatasetCard``,
    with the ``configs`` entry ``datasets.load_dataset(repo)`` follows) plus the statistics,
    the models with revisions, the judge and prompt version, and the resolved manifest."""
    out_dir = Path(out_dir)
    card = manifest.card
    header = {
        "pretty_name": manifest.name,
        "license": card.license,
        **{k: v for k, v in (("license_name", card.license_name), ("license_link", card.license_link)) if v},
        "language": ["en"],
        "annotations_creators": ["machine-generated"],
        "task_categories": ["image-segmentation", "image-to-text"],
        "tags": ["grounding", "referring-expression-segmentation", "webdataset", "look-and-learn"],
        "size_categories": [_size_category(stats.get("samples_out", 0))],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
        "dataset_info": {"config_name": "default", "features": card_features(
            None if manifest.image.store_format == "keep" else manifest.image.store_format)},
    }
    rates = stats.get("rates", {})
    rows = [
        ("samples written", stats.get("samples_out")), ("inputs read", stats.get("samples_in")),
        ("inputs rejected", stats.get("samples_rejected")),
        ("samples with ≥ 1 grounded entity", stats.get("samples_with_grounding")),
        ("share of samples with grounding", rates.get("samples_with_grounding")),
        ("entities", stats.get("entities")),
        ("share of entities grounded (excluding skipped)", rates.get("entities_grounded")),
        ("candidate regions judged", stats.get("regions")), ("regions accepted", stats.get("regions_accepted")),
        ("judge accept share", rates.get("judge_accept")), ("shards", stats.get("shards")),
    ]
    breakdowns = "\n".join([
        f"- entities by status: {_counts(stats.get('entities_by_status'))}",
        f"- skipped entities by reason: {_counts(stats.get('skipped_by_reason'))}",
        f"- judge verdicts by reason: {_counts(stats.get('verdicts_by_reason'))}",
        f"- inputs rejected by reason: {_counts(stats.get('rejected_by_reason'))}",
    ])
    res = resolved.get("resolved", {})
    judges = _judges_used(out_dir, complete)
    built = [
        f"- Look&Learn `{version}`; parser: spaCy `{manifest.parse.model}` noun chunks expanded to referring expressions"
        + (f" (`{res['parser']}`)" if res.get("parser") else ""),
        f"- detector: `{manifest.detect.model}` (revision `{res.get('detector_revision')}`), "
        f"box threshold {manifest.detect.box_threshold}, text threshold {manifest.detect.text_threshold}",
        f"- segmenter: `{manifest.segment.model}` (revision `{res.get('segmenter_revision')}`)"
        if not is_grounder(manifest.detect) else "- segmenter: none (the SAM 3 detector makes the masks; "
                                                 "`segment.model` is not used)",
        f"- judge: `{manifest.adjudicate.judge}`" + (f", model `{manifest.adjudicate.model}`" if manifest.adjudicate.model else ""),
    ]
    for model, prompt, n in judges:
        built.append(f"  - `{model}` with prompt version `{prompt}`: {n} regions")
    for key, value in res.items():
        if "prompt" in key:
            built.append(f"- {key}: `{value}`")
    random_models = any("random" in str(m).lower() for m in (manifest.detect.model, manifest.segment.model))
    warning = ("> **Built with randomly initialised tiny models (tests / offline sample).** "
               "Masks and verdicts carry no meaning; do not use this data for training."
               if random_models else "")
    text = CARD_TEMPLATE.format(
        header=yaml.safe_dump(header, sort_keys=False, allow_unicode=True), name=manifest.name, version=version,
        schema=SCHEMA_VERSION, source_rows=_source_rows(manifest), warning=warning, image_ext=manifest.image.store_format if manifest.image.store_format != "keep" else "jpg|png|webp",
        stats_rows="\n".join(f"| {k} | {'—' if v is None else v} |" for k, v in rows),
        breakdowns=breakdowns, built_rows="\n".join(built),
        manifest_yaml=yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True),
    )
    (out_dir / "README.md").write_text(text.replace("\n\n\n", "\n\n"))


def _source_rows(manifest: Manifest) -> str:
    """The card's "Source data" section: the input, its homepage, license and citation (``card.*``)."""
    card, inp = manifest.card, manifest.input
    rows = [f"- dataset `{inp.dataset or manifest.name}`, read as `{inp.format}`"
            + (" (one sample per image, all its captions)" if inp.coco_per_image else "")]
    if card.homepage:
        rows.append(f"- homepage: <{card.homepage}>")
    lic = card.license_name or card.license
    rows.append(f"- license: {lic}" + (f" (<{card.license_link}>)" if card.license_link else "")
                + ("" if card.license != "other" or card.license_name else
                   " — set `card.license` (or `card.license_name` / `card.license_link`) in the manifest"))
    if card.citation:
        rows.append("\n```bibtex\n" + card.citation.strip() + "\n```")
    return "\n".join(rows)


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"
