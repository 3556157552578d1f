"""Chaos: kill -9 a Ray build of the sample at random moments, many times in a row on one output
folder, then let a last run finish: the result equals an uninterrupted build.

Each kill takes the whole process group (the driver, GCS, raylet and the Ray agents) at a seeded
random moment: a random delay after the start, a random few ms after the run's first new shard, or as soon as a shard's temporary files appear. (Ray workers start their own process
groups; they exit once the raylet is gone.) The kill points covered are printed (``-s`` shows them): before the
run wrote a shard (Ray start, model loading, the first blocks), between shards, while a shard's
files were being written (temporary files present), after the last shard (stats, card), or the
run had already finished.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from test_build_e2e import SAMPLE, _build, _cli, _rejected, _records, assert_same_samples  # noqa: F401
from test_build_e2e import module_overrides  # noqa: F401 - the fixture

KILLS = 3
SEED = 9


def _tars(out: Path) -> int:
    return len(list((out / "shards").glob("*.tar"))) if (out / "shards").is_dir() else 0


def _temporary(out: Path) -> set[Path]:
    return set(out.rglob(".*.tmp")) if out.is_dir() else set()


@pytest.mark.slow
def test_repeated_kill_9_then_final_run_equals_uninterrupted(module_overrides, tmp_path):  # noqa: F811
    out = tmp_path / "chaos"
    sets = module_overrides + ["output.samples_per_shard=2", "runtime.cpu_batch_size=2", "runtime.executor=ray"]
    args = ["build", str(SAMPLE), "--out", str(out), "--no-progress"] + [x for s in sets for x in ("--set", s)]
    reference = tmp_path / "uninterrupted"             # the same layout, the local loop, no kill
    _build(reference, sets[:-1], executor="local")
    total = _tars(reference)
    rng = random.Random(SEED)
    points: list[str] = []
    for _ in range(KILLS):
        before, stale = _tars(out), _temporary(out)        # a killed write leaves temporary files
        # a seeded random moment: a random delay, or a few ms after the run's first new shard, or the
        # first temporary file of a shard being written (Ray's start alone can take 15 s here)
        mode = rng.choice(["delay", "after shards", "mid-write"])
        delay, extra = rng.uniform(0.5, 12.0), rng.uniform(0.0, 0.05)   # shards come in bursts
        proc = _cli(args, start_new_session=True)
        start = time.monotonic()
        deadline = start + (delay if mode == "delay" else 240)
        while time.monotonic() < deadline and proc.poll() is None:
            if mode == "after shards" and _tars(out) > before:
                deadline = min(deadline, time.monotonic() + extra)
            if mode == "mid-write" and _temporary(out) - stale:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode == 0, err.decode()[-3000:]
            points.append("finished")
            continue
        writing, at_kill = bool(_temporary(out) - stale), _tars(out)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.communicate()
        if writing:
            points.append("during a shard write")
        elif at_kill == total:
            points.append("after the last shard")
        elif at_kill == before:
            points.append("before this run's first shard")
        else:
            points.append("between shards")
    final = _cli(args)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err.decode()[-3000:]
    print("\nkill points:", {p: points.count(p) for p in sorted(set(points))}, points)
    assert_same_samples(_records(out), _records(reference), exact=False)
    assert _rejected(out) == _rejected(reference)
    assert not list(out.rglob(".*.tmp"))
