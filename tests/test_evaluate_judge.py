"""lookandlearn evaluate judge: verdicts of a build against a JSONL file of human labels."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.evaluate_judge import LabelError, evaluate_judge, read_labels
from stages.write import LOG_SCHEMA


def _out(tmp_path: Path, name: str, accepts: dict[tuple[str, int], bool], decided_by="llm", complete=True) -> Path:
    """A build output with one shard whose log holds the given verdicts."""
    out = tmp_path / name
    for sub in ("logs", "shards"):
        (out / sub).mkdir(parents=True)
    rows = [{"shard": 0, "key": key, "entity": region // 2, "region": region, "accept": accept,
             "reason": "x", "model": "judge-a", "prompt": "judge.v1", "prompt_hash": "abc",
             "decided_by": decided_by(region) if callable(decided_by) else decided_by}
            for (key, region), accept in accepts.items()]
    pq.write_table(pa.Table.from_pylist(rows, schema=LOG_SCHEMA), out / "logs" / "adjudication-000000.parquet")
    if complete:
        (out / "shards" / "t-000000.tar").write_bytes(b"")
    return out


def _labels(tmp_path: Path, items: list[dict]) -> Path:
    path = tmp_path / "labels.jsonl"
    path.write_text("# human labels\n" + "\n".join(json.dumps(i) for i in items) + "\n\n")
    return path


LABELS = [  # human: regions 0, 1, 2 good; 3, 4, 5 bad
    {"key": "a", "entity": 0, "region": 0, "accept": True},
    {"key": "a", "entity": 0, "region": 1, "accept": True},
    {"key": "a", "entity": 1, "region": 2, "accept": True},
    {"key": "a", "entity": 1, "region": 3, "accept": False},
    {"key": "b", "entity": 2, "region": 4, "accept": False},
    {"key": "b", "region": 5, "accept": False},
]


def test_precision_recall_agreement(tmp_path):
    # judge: accepts 0, 1 (right), 3 (wrong); rejects 2 (wrong), 4, 5 (right)
    verdicts = {("a", 0): True, ("a", 1): True, ("a", 2): False, ("a", 3): True, ("b", 4): False, ("b", 5): False,
                ("b", 6): True}
    out = _out(tmp_path, "o", verdicts, decided_by=lambda r: "rules" if r >= 4 else "llm")
    result = evaluate_judge(out, read_labels(_labels(tmp_path, LABELS)))
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (2, 1, 1, 2)
    assert result["accept_precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["accept_recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["agreement"] == pytest.approx(4 / 6, abs=1e-4)
    assert result["kappa"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["matched"] == 6 and result["unmatched"] == 0
    assert result["by_decided_by"]["rules"]["n"] == 2 and result["by_decided_by"]["llm"]["n"] == 4
    assert result["judges"] == [{"model": "judge-a", "prompt": "judge.v1", "prompt_hash": "abc"}]


def test_unmatched_and_wrong_entity_and_incomplete_shards(tmp_path):
    labels = read_labels(_labels(tmp_path, LABELS + [{"key": "c", "region": 0, "accept": True}]))
    out = _out(tmp_path, "o", {("a", 0): True, ("a", 1): True, ("a", 2): True, ("a", 3): False,
                               ("b", 4): False, ("b", 5): False})
    labels[("a", 0)]["entity"] = 9
    result = evaluate_judge(out, labels)
    assert result["unmatched"] == 1 and result["entity_mismatch"] == 1 and result["matched"] == 5
    assert result["agreement"] == 1.0
    unfinished = _out(tmp_path, "u", {("a", 0): True}, complete=False)
    assert evaluate_judge(unfinished, labels)["matched"] == 0


def test_cli_compares_outputs_and_writes_json(tmp_path, capsys):
    good = _out(tmp_path, "good", {("a", 0): True, ("a", 1): True, ("a", 2): True, ("a", 3): False,
                                   ("b", 4): False, ("b", 5): False})
    bad = _out(tmp_path, "bad", {k: True for k in [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 4), ("b", 5)]})
    labels = _labels(tmp_path, LABELS)
    report = tmp_path / "eval.json"
    assert main(["evaluate", "judge", str(good), str(bad), "--labels", str(labels), "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "precision" in table and "agreement" in table and str(good) in table and str(bad) in table
    results = json.loads(report.read_text())
    assert [r["agreement"] for r in results] == [1.0, 0.5]
    assert [r["accept_precision"] for r in results] == [1.0, 0.5]


@pytest.mark.parametrize("content, message", [
    ('{"key": "a", "region": 0}\n', "needs"),
    ('{"key": "a", "region": 0, "accept": true}\nnot json\n', "labels.jsonl:2: not JSON"),
    ('{"key": "a", "region": 0, "accept": true}\n{"key": "a", "region": 0, "accept": false}\n', "labelled twice"),
    ('{"key": "a", "region": "0", "accept": true}\n', "needs"),
    ("\n", "no labels"),
])
def test_bad_label_files_exit_2_naming_the_line(tmp_path, capsys, content, message):
    out = _out(tmp_path, "o", {("a", 0): True})
    path = tmp_path / "labels.jsonl"
    path.write_text(content)
    with pytest.raises(LabelError, match=message):
        read_labels(path)
    assert main(["evaluate", "judge", str(out), "--labels", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, capsys):
    labels = _labels(tmp_path, LABELS)
    assert main(["evaluate", "judge", str(tmp_path / "nothing"), "--labels", str(labels)]) == 2
    assert "no adjudication logs" in capsys.readouterr().err
    assert main(["evaluate", "judge", str(tmp_path), "--labels", str(tmp_path / "missing.jsonl")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "judge", str(tmp_path)])  # --labels is required
    assert exc.value.code == 2
