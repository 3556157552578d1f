"""The stage base (stages/base.py): the shared row loop every stage uses, and the declared stage list
the runner builds both executors from."""
from __future__ import annotations

import json

import numpy as np

from stages.base import Resources, Row, Stage, run_stages
from stages.record import ROW_OK, ROW_REJECTED, dumps, loads


class Tag(Stage):
    """Adds its name to every live record; raises on a record whose caption says 'boom'."""

    name = "tag"

    def __init__(self):
        self.setups = 0
        self.seen: list[list[int]] = []

    def setup(self) -> None:
        self.setups += 1

    def process(self, rows: list[Row]) -> None:
        self.seen.append([row.index for row in rows])
        for row in rows:
            if row.record["text"]["caption"] == "boom":
                raise RuntimeError("cannot\n handle this")
            row.record.setdefault("tags", []).append(self.name)
            if row.record["text"]["caption"] == "drop":
                row.reject("dropped: asked to")


def _batch(captions, statuses=None, as_numpy=False):
    n = len(captions)
    batch = {"key": [f"k{i}" for i in range(n)], "status": statuses or [ROW_OK] * n, "reason": [""] * n,
             "record": [dumps({"key": f"k{i}", "text": {"caption": c}}) for i, c in enumerate(captions)],
             "times": ["{}"] * n}
    if as_numpy:
        batch = {k: np.array(v, dtype=object) for k, v in batch.items()}
    return batch


def test_live_rows_are_processed_rejected_ones_pass_through_untouched():
    stage = Tag()
    batch = _batch(["a", "b", "c"], statuses=[ROW_OK, ROW_REJECTED, ROW_OK])
    out = stage(batch)
    assert stage.seen == [[0, 2]]
    assert out["record"][1] == batch["record"][1]
    assert [loads(out["record"][i])["tags"] for i in (0, 2)] == [["tag"], ["tag"]]
    assert out["status"] == [ROW_OK, ROW_REJECTED, ROW_OK]


def test_setup_runs_once_per_stage_object():
    stage = Tag()
    stage(_batch(["a"]))
    stage(_batch(["b"]))
    assert stage.setups == 1


def test_a_rejected_row_keeps_its_incoming_record():
    batch = _batch(["a", "drop"])
    out = Tag()(batch)
    assert out["status"] == [ROW_OK, ROW_REJECTED]
    assert out["reason"][1] == "dropped: asked to"
    assert out["record"][1] == batch["record"][1]  # the half-made edit is not written back


def test_a_failing_row_becomes_a_rejection_named_after_the_stage_and_its_batch_mates_survive():
    stage = Tag()
    out = stage(_batch(["a", "boom", "c"]))
    assert stage.seen[0] == [0, 1, 2]                  # the batch call failed...
    assert stage.seen[1:] == [[0], [1], [2]]           # ...so each row was retried alone
    assert out["status"] == [ROW_OK, ROW_REJECTED, ROW_OK]
    assert out["reason"][1] == "tag_failed: RuntimeError: cannot handle this"
    assert [loads(out["record"][i])["tags"] for i in (0, 2)] == [["tag"], ["tag"]]


def test_numpy_columns_stay_numpy_and_time_is_shared_among_rows():
    out = Tag()(_batch(["a", "b"], as_numpy=True))
    assert isinstance(out["record"], np.ndarray) and out["record"].dtype == object
    times = [json.loads(t) for t in out["times"]]
    assert all(set(t) == {"tag"} and t["tag"] >= 0 for t in times)
    assert times[0]["tag"] == times[1]["tag"]


class AddArray(Stage):
    name = "add"
    drops = ("key",)
    fills = {"arr": np.zeros(0)}

    def process(self, rows):
        for row in rows:
            row["arr"] = np.ones(row.index + 1)


def test_new_columns_fill_untouched_rows_and_declared_drops_are_dropped():
    out = AddArray()(_batch(["a", "b"], statuses=[ROW_REJECTED, ROW_OK]))
    assert "key" not in out
    assert isinstance(out["arr"], np.ndarray) and out["arr"].dtype == object  # ragged arrays: object column
    assert out["arr"][0].shape == (0,) and out["arr"][1].shape == (2,)


def test_a_fill_column_exists_even_when_every_row_was_rejected_before():
    out = AddArray()(_batch(["a", "b"], statuses=[ROW_REJECTED, ROW_REJECTED]))
    assert [a.shape for a in out["arr"]] == [(0,), (0,)]


def test_new_columns_come_in_one_order_whoever_set_them_first():
    class Two(Stage):
        name = "two"

        def process(self, rows):
            for row in rows:
                for col in (("b", "a") if row.index == 0 else ("a", "b")):
                    row[col] = 1
    assert list(Two()(_batch(["x", "y"])))[-2:] == ["a", "b"]


def test_run_stages_chains_and_accumulates_times():
    out = run_stages([Tag(), AddArray()], _batch(["a"]))
    assert set(json.loads(out["times"][0])) == {"tag", "add"}


def test_the_runner_builds_both_executors_from_one_declared_list(tmp_path):
    from pipeline.manifest import Manifest
    from pipeline.runner import build_stages

    manifest = Manifest.model_validate({"name": "x", "input": {"path": str(tmp_path / "in.jsonl")},
                                        "runtime": {"model_workers": 3, "actors_per_gpu": 2}})
    stages = build_stages(manifest)
    assert [s.name for s in stages] == ["read", "parse", "prepare", "ground_segment", "adjudicate"]
    assert all(isinstance(s, Stage) for s in stages)
    kinds = {s.name: s.resources for s in stages}
    assert kinds["ground_segment"] == Resources("model", workers=3, gpus=0.5, memory_mb=1024)
    assert kinds["adjudicate"].kind == "cpu"
    manifest.adjudicate = manifest.adjudicate.model_copy(update={"judge": "openai", "model": "m", "workers": 2,
                                                                 "batch_size": 96})
    judge = build_stages(manifest)[-1].resources
    assert (judge.kind, judge.workers, judge.batch_size) == ("io", 2, 96)


def test_every_stage_is_timed_under_its_name_in_a_local_build(sample_out):
    """The local loop runs the same list as the Ray plan, prepare included."""
    stats = json.loads((sample_out / "stats.json").read_text())
    assert set(stats["stage_seconds"]) == {"read", "parse", "prepare", "ground_segment", "adjudicate"}
