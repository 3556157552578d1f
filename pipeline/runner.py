"""The build: list inputs → plan shards → run the stages → write complete shards.

Stages are plain objects (``setup()`` + ``__call__(batch)``). This module is the only place
that knows about Ray: ``executor: ray`` turns the stages into a Ray Data plan (CPU stages as
tasks, ground+segment as an actor pool, one model copy per actor), ``executor: local`` runs
the very same objects in a loop in this process (tests, debugging).

Resume: the input list and its split into shards are fixed by the manifest, so shard N always
holds the same samples. A shard whose files are all in place is skipped; any other shard is
cleared and redone. Files are renamed into place only when whole, so a ``kill -9`` at any
moment leaves complete shards or garbage that the next run removes: never a duplicate.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml
from tqdm import tqdm

from pipeline import __version__
from pipeline.manifest import Manifest, ManifestError, manifest_to_dict
from stages.record import rows as batch_rows

log = logging.getLogger("lookandlearn")

STAGE_ORDER = ("read", "parse", "ground_segment", "adjudicate")
# Fields that decide which samples land in which shard: a rerun into the same folder with
# different values would mix two builds, so it is refused.
_LAYOUT_FIELDS = ("name", "input", "output.samples_per_shard")


def make_stage(name: str, manifest: Manifest):
    if name == "read":
        from pipeline.sources import ReadStage
        return ReadStage(manifest.image)
    if name == "parse":
        from stages.parse import ParseStage
        return ParseStage(manifest.parse)
    if name == "prepare":
        from stages.model_stage import PrepareStage
        return PrepareStage(manifest.detect, manifest.segment, manifest.runtime)
    if name == "ground_segment":
        from stages.model_stage import GroundAndSegment
        return GroundAndSegment(manifest.detect, manifest.segment, manifest.runtime)
    if name == "adjudicate":
        from stages.adjudicate import AdjudicateStage
        # the output folder: the LLM judge reuses the answers in its logs (absolute: Ray workers)
        return AdjudicateStage(manifest.adjudicate, out_dir=str(Path(manifest.output.path).resolve()))
    raise KeyError(name)


def run_timed(name: str, stage, batch: dict) -> dict:
    """Call a stage and add its wall time, shared equally, to each row's ``times``."""
    started = time.perf_counter()
    out = stage(batch)
    n = len(out["seq"])
    share = (time.perf_counter() - started) / max(n, 1)
    times = list(out.get("times") if "times" in out else ["{}"] * n)
    for i in range(n):
        t = json.loads(times[i] or "{}")
        t[name] = t.get(name, 0.0) + share
        times[i] = json.dumps(t)
    out = dict(out)
    out["times"] = times
    if name == "ground_segment":
        out.pop("pixels", None)  # decoded pixels are not needed downstream; free the memory
    return out


# --- Ray wrappers: one stage object per worker process, built on first use ----------------

_WORKER_STAGES: dict = {}


def _ray_cpu_stage(batch: dict, name: str, manifest_json: str) -> dict:
    stage = _WORKER_STAGES.get((name, manifest_json))
    if stage is None:
        stage = make_stage(name, Manifest.model_validate_json(manifest_json))
        stage.setup()
        _WORKER_STAGES[(name, manifest_json)] = stage
    return run_timed(name, stage, batch)


def _named_cpu_stage(name: str, manifest_json: str):
    """A Ray task function called ``name`` so that progress lines read MapBatches(parse)."""
    def fn(batch: dict) -> dict:
        return _ray_cpu_stage(batch, name, manifest_json)

    fn.__name__ = fn.__qualname__ = name
    return fn


class GroundSegmentActor:
    def __init__(self, manifest_json: str):
        self.stage = make_stage("ground_segment", Manifest.model_validate_json(manifest_json))
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        return run_timed("ground_segment", self.stage, batch)


class JudgeActor:
    """The LLM judge (judge: openai): I/O-bound, many requests in flight on one event loop."""

    def __init__(self, manifest_json: str):
        self.stage = make_stage("adjudicate", Manifest.model_validate_json(manifest_json))
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        return run_timed("adjudicate", self.stage, batch)


# --- planning ------------------------------------------------------------------------------

def _layout(data: dict) -> dict:
    out = {}
    for field in _LAYOUT_FIELDS:
        node = data
        for part in field.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        out[field] = node
    return out


def check_output_matches(out: Path, manifest: Manifest) -> None:
    previous = out / "manifest.resolved.yaml"
    if not previous.exists():
        return
    old = _layout(yaml.safe_load(previous.read_text()) or {})
    new = _layout(manifest_to_dict(manifest))
    if old != new:
        changed = [k for k in new if old.get(k) != new.get(k)]
        raise ManifestError(
            f"{out} holds a build with different {', '.join(changed)}; resuming would mix two "
            f"datasets. Use another output.path (or delete {out}).")


def check_models(manifest: Manifest) -> None:
    """Fail before any work when a model cannot be loaded (e.g. offline and not cached)."""
    from stages.models import check_model_available

    check_model_available(manifest.detect.model, manifest.detect.revision, "detect.model")
    check_model_available(manifest.segment.model, manifest.segment.revision, "segment.model")


def plan(manifest: Manifest, writer) -> tuple[list[dict], dict[int, int], int]:
    from pipeline.sources import list_items

    items = list_items(manifest)
    per_shard: dict[int, int] = defaultdict(int)
    for item in items:
        per_shard[item["shard"]] += 1
    done = {s for s in per_shard if writer.is_complete(s)}
    for shard in per_shard:
        if shard not in done:
            writer.clear(shard)
    pending = [item for item in items if item["shard"] not in done]
    expected = {s: n for s, n in per_shard.items() if s not in done}
    return pending, expected, len(done)


def _input_rows(items: list[dict]) -> list[dict]:
    return [{"seq": it["seq"], "shard": it["shard"], "key": it["key"],
             "item": json.dumps(it, ensure_ascii=False), "times": "{}"} for it in items]


# --- executors -----------------------------------------------------------------------------

def _execute_local(manifest: Manifest, rows: list[dict]):
    stages = [(name, make_stage(name, manifest)) for name in STAGE_ORDER]
    for _, stage in stages:
        stage.setup()
    size = manifest.runtime.cpu_batch_size
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        batch = {k: [r[k] for r in chunk] for k in chunk[0]}
        for name, stage in stages:
            batch = run_timed(name, stage, batch)
        yield batch


def _execute_ray(manifest: Manifest, rows: list[dict]):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data

    runtime = manifest.runtime
    started_here = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": True,
                  "logging_level": logging.WARNING}
        if runtime.ray_address:
            kwargs["address"] = runtime.ray_address
        else:
            kwargs["num_cpus"] = runtime.num_cpus or os.cpu_count()
            kwargs["object_store_memory"] = runtime.object_store_memory_mb * 1024 * 1024
        ray.init(**kwargs)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order
        manifest_json = manifest.model_dump_json()
        size = runtime.cpu_batch_size
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // size))
        # prepare: CPU workers resize the images for the models (uint8), so the GPU actor only
        # copies, normalises and runs them (stages/prep.py)
        for name in ("read", "parse", "prepare"):
            ds = ds.map_batches(_named_cpu_stage(name, manifest_json), batch_size=size, batch_format="numpy", num_cpus=1)
        use_gpu = gpus >= 1 and runtime.device != "cpu"
        model_args = {"num_gpus": 1 / runtime.actors_per_gpu} if use_gpu else {}
        # A distinct resource request also keeps Ray from fusing the CPU tasks into the actor.
        model_args["memory"] = runtime.model_memory_mb * 1024 * 1024
        # One CPU per actor, but never all of them: actors that held every CPU would leave none
        # for the CPU stages and the plan would wait forever (a 1-CPU cluster, or as many
        # actors as CPUs on a CPU-only run); then the actors share the CPUs with the tasks.
        actor_cpus = min(1.0, max(cpus - 1, 0) / runtime.model_workers)
        ds = ds.map_batches(
            GroundSegmentActor, fn_constructor_kwargs={"manifest_json": manifest_json},
            batch_size=size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=runtime.model_workers), num_cpus=actor_cpus, **model_args)
        if manifest.adjudicate.judge == "openai":
            # waits on the network, not the CPU: no CPU reserved, so it never starves the CPU stages
            ds = ds.map_batches(
                JudgeActor, fn_constructor_kwargs={"manifest_json": manifest_json},
                batch_size=max(size, manifest.adjudicate.batch_size), batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=manifest.adjudicate.workers), num_cpus=0)
        else:
            ds = ds.map_batches(_named_cpu_stage("adjudicate", manifest_json), batch_size=size, batch_format="numpy", num_cpus=1)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        if started_here:
            ray.shutdown()


# --- the build -----------------------------------------------------------------------------

def build(manifest: Manifest, progress: bool = True) -> dict:
    from pipeline.stats import aggregate_stats, write_card, write_resolved_manifest
    from stages.write import ShardWriter

    out = Path(manifest.output.path)
    check_output_matches(out, manifest)
    check_models(manifest)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, manifest.name)
    extra = {"pipeline": __version__}
    if manifest.adjudicate.judge == "openai":
        from stages.llm_judge import load_prompt

        prompt = load_prompt(manifest.adjudicate.prompt)
        extra.update(judge_model=manifest.adjudicate.model, judge_prompt=prompt.name, judge_prompt_hash=prompt.hash)
    resolved = write_resolved_manifest(out, manifest, extra)

    started = time.perf_counter()
    pending, expected, skipped = plan(manifest, writer)
    log.info("%d shards to build, %d already complete", len(expected), skipped)
    rows = _input_rows(pending)
    buffers: dict[int, list[dict]] = defaultdict(list)
    written = 0
    if rows:
        execute = _execute_ray if manifest.runtime.executor == "ray" else _execute_local
        bar = tqdm(total=len(rows), desc="samples", unit="sample", disable=not progress,
                   file=sys.stderr, mininterval=1.0)
        for batch in execute(manifest, rows):
            for row in batch_rows(batch):
                shard = int(row["shard"])
                buffers[shard].append(row)
                if len(buffers[shard]) == expected[shard]:
                    writer.write_shard(shard, buffers.pop(shard))
                    written += 1
            bar.update(len(batch["seq"]))
        bar.close()
        if buffers:
            missing = {s: expected[s] - len(b) for s, b in buffers.items()}
            raise RuntimeError(f"rows missing from shards {missing}: the executor lost samples")
    elapsed = time.perf_counter() - started
    run = {"samples_processed": len(rows), "shards_written": written, "shards_skipped": skipped,
           "wall_seconds": round(elapsed, 2),
           "samples_per_second": round(len(rows) / elapsed, 3) if rows and elapsed else None,
           "executor": manifest.runtime.executor}
    stats = aggregate_stats(out, run)
    write_card(out, manifest, stats, resolved, __version__)
    return stats
