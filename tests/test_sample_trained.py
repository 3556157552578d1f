"""manifests/sample.yaml (`make build-dataset`) builds the offline sample with the small TRAINED
models under models/, and its labels mean something: against the sample's truth.jsonl it grounds
far better than the same inputs through the random tiny models (manifests/sample-random.yaml,
the session's ``sample_out``), and on its 120 held-out scenes plus the showcase (341 phrases that
name an object, 37 that name nothing) it meets the label targets. Measured here 2026-12-07:
precision 0.936, recall 0.815, false grounding 1 of 37, mean IoU 0.843; the bounds leave about
ten entities of slack for another machine's floating point, no more."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_sample_manifest_uses_the_trained_models_and_the_sweeps_choice():
    manifest = yaml.safe_load((REPO / "manifests" / "sample.yaml").read_text())
    assert manifest["detect"]["model"] == "models/shapes-grounding-dino"
    assert manifest["segment"]["model"] == "models/shapes-sam"
    chosen = json.loads((REPO / "bench" / "results" / "labels-sweep.json").read_text())["chosen"]
    assert manifest["detect"]["box_threshold"] == chosen["box_threshold"]
    assert manifest["detect"]["text_threshold"] == chosen["text_threshold"]
    assert manifest["adjudicate"]["min_det_score"] == chosen["min_det_score"]
    sweep = json.loads((REPO / "bench" / "results" / "labels-sweep.json").read_text())
    if chosen["rules"] == "v2":     # the sweep's rules.v2: exclusive regions (the default) and its plural floor
        assert manifest["adjudicate"].get("exclusive_regions", True) is True
        assert manifest["adjudicate"]["plural_min_det_score"] == sweep["plural_floor"]
    assert manifest["adjudicate"]["judge"] == "rules"


def test_trained_sample_grounds_what_the_truth_says(sample_jsonl, sample_out, tmp_path, monkeypatch):
    from pipeline.evaluate_labels import evaluate_labels, read_records
    from pipeline.labels_truth import read_truth
    from pipeline.manifest import load_manifest
    from pipeline.runner import build

    monkeypatch.chdir(REPO)    # the manifest names models/ relative to the repository, as `make` runs it
    out = tmp_path / "sample"
    build(load_manifest(REPO / "manifests" / "sample.yaml", [f"input.path={sample_jsonl}", "runtime.executor=local"],
                        out=str(out)), progress=False)
    truth = Path(sample_jsonl).with_name("truth.jsonl")
    trained = evaluate_labels(out, truth)["overall"]
    assert trained["names_something"] >= 300 and trained["names_nothing"] >= 30
    assert trained["precision"] >= 0.9 and trained["recall"] >= 0.78 and trained["mean_iou"] >= 0.8
    assert trained["false_grounded"] <= 2

    # against the random tiny models on the rows both built (sample-random.yaml stops before the
    # held-out scenes)
    showcase = {i: e for i, e in read_truth(truth).items() if not i.startswith("heldout-")}
    random = evaluate_labels(sample_out, showcase)["overall"]
    assert (random["f1"] or 0.0) <= evaluate_labels(out, showcase)["overall"]["f1"] - 0.3

    # the labels sweep re-judges one build per detector setting in memory: at the build's own
    # settings that gives back exactly the records the build wrote
    sweep = _labels_sweep()
    records, counts = read_records(out)
    sets = [f"input.path={sample_jsonl}"]
    again = sweep.rejudge(records, sets)
    assert again == records
    assert any(r["regions"] for r in records.values())
    stricter = sweep.rejudge(records, sets + ["adjudicate.min_det_score=0.99"])
    assert all(not r["verdict"]["accept"] for rec in stricter.values() for r in rec["regions"])
    assert evaluate_labels(out, truth, records=(stricter, counts))["overall"]["grounded"] == 0
    assert evaluate_labels(out, truth, records=(again, counts))["overall"] == trained


def _labels_sweep():
    import importlib.util

    spec = importlib.util.spec_from_file_location("labels_sweep", REPO / "bench" / "labels_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
