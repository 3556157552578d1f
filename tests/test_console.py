"""What a build prints (issue 13, item 4): one progress bar, a summary table, never "None samples/s",
and nothing of Ray's own (its native ``core_worker`` lines, Ray Data's progress block) unless -v."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.console import drop_native_log_lines, rate_text, summary_table
from test_build_e2e import _cli

SAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "sample-random.yaml"
NATIVE = (b"[2026-12-03 07:20:20,967 E 25497 25497] core_worker.cc:2465: Actor with class name: "
          b"'MapWorker(MapBatches(GroundSegmentActor))' has constructor arguments in the object store\n")
# what Ray prints on its own: native C++ log lines, Ray Data's progress block and execution lines
RAY_NOISE = re.compile(r"core_worker|Running Dataset|streaming_executor|logging_progress|Execution plan|\(raylet\)")


def test_native_ray_lines_are_left_out_and_everything_else_passes(capfd):
    with drop_native_log_lines() as dropped:
        os.write(2, b"our own line\n")
        os.write(2, NATIVE)
        os.write(2, b"\rbuilding 3/8")  # a progress bar redraw: no newline, must not be held back
        os.write(2, b"\n[not a ray line] kept\n")
    err = capfd.readouterr().err
    assert "our own line\n" in err and "\rbuilding 3/8" in err and "[not a ray line] kept" in err
    assert "core_worker" not in err
    assert len(dropped) == 1 and "core_worker.cc" in dropped[0]
    os.write(2, NATIVE)  # the filter is gone after the block: fd 2 is the real stderr again
    assert "core_worker" in capfd.readouterr().err


def test_rate_is_never_none():
    assert rate_text(0, 3.0) == "no samples to process"
    assert rate_text(10, 0.0) == "-"
    assert rate_text(30, 12.0) == "2.50 samples/s"
    stats = {"shards": 1, "samples_out": 0, "samples_rejected": 0,
             "last_run": {"samples_processed": 0, "wall_seconds": 0.1, "samples_per_second": None}}
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(summary_table(stats))
    text = console.export_text()
    assert "None" not in text and "every shard was already complete" in text


def _build(out, sets, *extra):
    return main([*extra, "build", str(SAMPLE), "--out", str(out), *[x for s in sets for x in ("--set", s)]])


def test_local_build_prints_one_bar_and_a_summary_table(tmp_path, capfd, sample_manifest_args, sample_jsonl):
    lines = ['{"id": "a", "image": "images/scene-01.jpg", "caption": "a red circle above a small blue square"}',
             '{"id": "b", "image": "images/scene-02.png", "caption": "   "}',
             '{"id": "c", "image": "images/does-not-exist.jpg", "caption": "a dog"}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    sets = [*[s for s in sample_manifest_args if not s.startswith("input.path=")], f"input.path={tmp_path / 'in.jsonl'}",
            f"input.image_root={sample_jsonl.parent}", "runtime.executor=local"]
    assert _build(tmp_path / "o", sets) == 0
    out, err = capfd.readouterr()
    assert "build summary" in out and "3 in, 1 out, 2 rejected" in out and "1 written, 0 already complete" in out
    assert "top rejections" in out and "empty_caption 1" in out and "samples/s" in out
    assert "rejected 2" in err
    assert "shards 1/1" in err and "Loading weights" not in err  # our bar; not transformers' bars
    assert "None" not in out + err and not RAY_NOISE.search(out + err)
    # the rerun has nothing to do: it says so (this printed "None samples/s" before)
    assert _build(tmp_path / "o", sets) == 0
    out, err = capfd.readouterr()
    assert "every shard was already complete" in out and "no samples to process" in out
    assert "0 written, 1 already complete" in out and "None" not in out + err


def _build_process(out, sets, *extra):
    """The CLI in a fresh process, as a user runs it: what reaches its stdout and stderr. (In this
    process Ray's console handlers keep whichever sys.stderr was current when an earlier test first
    imported Ray, so a capture here would not see what a terminal sees.)"""
    proc = _cli([*extra, "build", str(SAMPLE), "--out", str(out), *[x for s in sets for x in ("--set", s)]])
    out, err = (b.decode() for b in proc.communicate(timeout=600))
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
def test_ray_build_is_quiet_without_v(tmp_path, sample_manifest_args):
    sets = [*sample_manifest_args, "runtime.executor=ray", "input.limit=8"]
    out, err = _build_process(tmp_path / "o", sets)
    assert "build summary" in out and "shards 1/1" in err
    assert not RAY_NOISE.search(out + err), RAY_NOISE.search(out + err)
    assert "None" not in out + err
    # -v gives Ray its console back (Ray Data's own progress / execution lines)
    out, err = _build_process(tmp_path / "v", sets, "-v")
    assert RAY_NOISE.search(out + err) and "build summary" in out
