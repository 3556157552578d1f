"""lookandlearn inspect: the report's numbers, judge columns read dynamically, the gallery file."""
from __future__ import annotations

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.inspect import analyze


@pytest.fixture(scope="module")
def report(sample_out):
    return analyze(sample_out, top=0, worst=0)


def _reseal(out, shard):
    """Rewrite a shard's completion record after a test edited its files on purpose."""
    from stages.record.shards import file_digest, shard_files

    files = shard_files(out, verify=False)[0][shard]
    done = json.loads(files["done"].read_text())
    for kind, entry in done["files"].items():
        entry.update(file_digest(files[kind]))
    files["done"].write_text(json.dumps(done))


def _copy(sample_out, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(sample_out, dst)
    return dst


def test_report_agrees_with_stats_json(report, sample_out):
    stats = json.loads((sample_out / "stats.json").read_text())
    o = report["overall"]
    for key in ("samples_in", "samples_out", "samples_rejected", "samples_with_grounding", "entities",
                "regions", "regions_accepted"):
        assert o[key] == stats[key], key
    assert {k: v for k, v in o["entities_by_status"].items() if v} == stats["entities_by_status"]
    assert o["entity_grounding_rate"] == stats["rates"]["entities_grounded"]
    assert o["judge_accept_rate"] == stats["rates"]["judge_accept"]
    assert report["shards"] == {"complete": stats["shards"], "incomplete": []}

    # every breakdown adds up to the totals
    assert sum(r["count"] for r in report["rejected_inputs"]) == stats["samples_rejected"]
    assert {r["reason"]: r["count"] for r in report["rejected_inputs"]} == stats["rejected_by_reason"]
    assert sum(r["entities"] for r in report["by_root"]) == stats["entities"]
    assert sum(r["regions"] for r in report["by_root"]) == stats["regions"]
    assert sum(r["regions"] for r in report["by_det_score"]) == stats["regions"]
    assert sum(r["accepted"] for r in report["by_det_score"]) == stats["regions_accepted"]
    assert {r["reason"]: r["regions"] for r in report["verdict_reasons"]} == stats["verdicts_by_reason"]
    assert sum(r["count"] for r in report["entity_reasons"]) == stats["entities"] - stats["entities_by_status"]["grounded"]
    for band in report["by_det_score"]:
        assert band["hi"] - band["lo"] == pytest.approx(0.05) and band["lo"] <= 1
    # the sample's thresholds make verdicts depend on the score: high bands accept more
    rates = [b["accept_rate"] for b in report["by_det_score"] if b["regions"]]
    assert rates[-1] > rates[0]

    judge = report["judge"]
    assert judge["regions"] == stats["regions"] and judge["errors_total"] == 0 and judge["errors"] == []
    [rules] = judge["by_model"]
    assert (rules["model"], rules["prompt"]) == ("rules", "rules.v2")
    assert set(rules["latency_ms"]) == {"mean", "p50", "p95", "max"}

    worst = report["worst_shards"]
    assert len(worst) == stats["shards"]
    keys = [w["entity_grounding_rate"] for w in worst]
    assert keys == sorted(keys)
    assert sum(w["samples_in"] for w in worst) == stats["samples_in"]


def test_cli_tables_and_json(sample_out, capsys):
    assert main(["inspect", str(sample_out), "--top", "5"]) == 0
    text = capsys.readouterr().out
    for title in ("Overall", "Inputs rejected, by reason", "Entities not grounded, by reason",
                  "Judge verdicts, by reason", "By phrase root (top 5 of", "By detector score band", "Judge",
                  "Worst shards", "sample-000000.tar", "low_det_score", "judge errors: none"):
        assert title in text, title

    assert main(["inspect", str(sample_out), "--json", "--worst", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["overall"]["samples_out"] > 0 and len(data["worst_shards"]) == 2


def test_llm_judge_columns_latency_and_errors(sample_out, tmp_path, capsys):
    """Columns an LLM judge adds to the logs (decided_by, error kinds, token counts) show up."""
    out = _copy(sample_out, tmp_path)
    path = sorted((out / "logs").glob("*.parquet"))[0]
    table = pq.read_table(path)
    n = table.num_rows
    assert n >= 3
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        row["model"], row["prompt"] = "gpt-4o-mini", "judge.v1"
        row["latency_ms"] = 100.0 + 10 * i
        row["decided_by"] = "llm" if i % 2 else "rules"
        row["prompt_tokens"], row["completion_tokens"] = 400 + i, 20
        row["error"] = {0: "timeout: no reply in 30 s", 1: "bad_json: Expecting value"}.get(i, "")
    pq.write_table(pa.Table.from_pylist(rows), path)
    _reseal(out, 0)  # the edited log is the shard's now (else the sha256 check calls it corrupt)

    report = analyze(out)
    judge = report["judge"]
    assert {"decided_by", "prompt_tokens", "completion_tokens"} <= set(judge["log_columns"])
    assert judge["errors_total"] == 2
    assert {e["kind"]: e["count"] for e in judge["errors"]} == {"timeout": 1, "bad_json": 1}
    llm = [r for r in judge["by_model"] if r.get("model") == "gpt-4o-mini"]
    assert sum(r["regions"] for r in llm) == n and {r["decided_by"] for r in llm} == {"llm", "rules"}
    assert all(r["latency_ms"]["max"] >= 100 for r in llm)
    assert sum(r["prompt_tokens"]["total"] for r in llm) == sum(400 + i for i in range(n))
    assert sum(w["judge_errors"] for w in analyze(out, worst=0)["worst_shards"]) == 2

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("decided_by", "prompt_tokens", "timeout", "bad_json", "Judge errors (2,"):
        assert word in text, word


def test_incomplete_shards_are_listed_not_counted(sample_out, tmp_path, report):
    out = _copy(sample_out, tmp_path)
    (out / "index" / "sample-000001.parquet").unlink()
    partial = analyze(out)
    assert partial["shards"] == {"complete": report["shards"]["complete"] - 1, "incomplete": [1]}
    assert partial["overall"]["samples_out"] < report["overall"]["samples_out"]


def test_not_an_output_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a Look&Learn output folder" in capsys.readouterr().err


def _blob(html: str) -> dict:
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


def test_gallery_file_is_self_contained(sample_out, tmp_path, report, capsys):
    page = tmp_path / "gallery.html"
    assert main(["inspect", str(sample_out), "--html", str(page)]) == 0
    assert f"gallery: {page}" in capsys.readouterr().out
    html = page.read_text()
    data = _blob(html)
    samples = data["samples"]
    assert data["meta"]["total"] == data["meta"]["shown"] == len(samples) == report["overall"]["samples_out"]
    assert data["meta"]["per_page"] == 24
    # nothing outside the file: no http(s) resources, every image a data URI, downscaled
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html)
    assert all(s["img"].startswith("data:image/jpeg;base64,") and s["w"] <= 384 for s in samples)
    regions = [r for s in samples for r in s["regions"]]
    assert len(regions) == report["overall"]["regions"]
    assert all(r["mask"].startswith("data:image/png;base64,") for r in regions)
    assert sum(r["accept"] for r in regions) == report["overall"]["regions_accepted"]
    for s in samples:
        for e in s["entities"]:
            block = next(b for b in s["text"] if b["turn"] == e["turn"])
            assert block["text"][e["start"]:e["end"]] == e["phrase"]


def test_gallery_subsamples_large_runs(sample_out, tmp_path):
    from pipeline.gallery import write_gallery

    info = write_gallery(sample_out, tmp_path / "g.html", max_samples=5, per_page=2)
    data = _blob((tmp_path / "g.html").read_text())
    assert info["shown"] == len(data["samples"]) == 5 and info["samples"] == data["meta"]["total"] > 5
    keys = [s["key"] for s in data["samples"]]
    assert len(set(keys)) == 5
