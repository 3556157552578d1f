"""The build: list inputs → plan shards → run the stages → write complete shards.

The stages are one declared list (:func:`build_stages`; each a ``stages.base.Stage`` with its
``resources``). This module is the only place that knows about Ray: ``executor: ray`` turns the
list into a Ray Data plan (``cpu`` stages as tasks, ``model`` stages as an actor pool with one
model copy per actor, ``io`` stages as actors that reserve no CPU), ``executor: local`` runs the
very same list in a loop in this process (tests, debugging).

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
from pipeline.manifest import InputConfig, Manifest, ManifestError, manifest_to_dict
from stages.adjudicate import AdjudicateStage
from stages.base import Stage, run_stages
from stages.ground_segment import GroundAndSegment, PrepareStage
from stages.parse import ParseStage
from stages.read import ReadStage
from stages.record import rows as batch_rows

log = logging.getLogger("lookandlearn")

# Fields that decide which samples land in which shard: a rerun into the same folder with
# different values would mix two builds, so it is refused.
_LAYOUT_FIELDS = ("name", "input", "output.samples_per_shard")
_MB = 1024 * 1024


def build_stages(manifest: Manifest) -> list[Stage]:
    """The stages of a build, in order. The local loop and the Ray plan both run exactly this
    list; where each stage runs is read from its declared ``resources``, nothing else."""
    return [
        ReadStage(manifest.image),
        ParseStage(manifest.parse),
        PrepareStage(manifest.detect, manifest.segment, manifest.runtime),
        GroundAndSegment(manifest.detect, manifest.segment, manifest.runtime),
        # the output folder: the LLM judge reuses the answers in its logs (absolute: Ray workers)
        AdjudicateStage(manifest.adjudicate, out_dir=str(Path(manifest.output.path).resolve())),
    ]


# --- Ray wrappers: one stage object per worker process, built on first use ----------------

_WORKER_STAGES: dict = {}


def _worker_stage(index: int, manifest_json: str) -> Stage:
    stage = _WORKER_STAGES.get((index, manifest_json))
    if stage is None:
        stage = build_stages(Manifest.model_validate_json(manifest_json))[index]
        stage.setup()
        _WORKER_STAGES[(index, manifest_json)] = stage
    return stage


def _cpu_task(index: int, name: str, manifest_json: str):
    """A Ray task function called ``name`` so that progress lines read MapBatches(parse)."""
    def fn(batch: dict) -> dict:
        return _worker_stage(index, manifest_json)(batch)

    fn.__name__ = fn.__qualname__ = name
    return fn


class _StageActor:
    """A stage in a Ray actor: built and set up once (the model loads when the actor starts)."""

    def __init__(self, index: int, manifest_json: str):
        self.stage = _worker_stage(index, manifest_json)

    def __call__(self, batch: dict) -> dict:
        return self.stage(batch)


def _actor_class(name: str) -> type:
    """A :class:`_StageActor` subclass named after the stage, for Ray's progress lines."""
    return type("".join(part.title() for part in name.split("_")) + "Actor", (_StageActor,), {})


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
    data = yaml.safe_load(previous.read_text()) or {}
    if isinstance(data.get("input"), dict):
        # fields added to input: since that build was made take their defaults, as they did then
        try:
            data["input"] = InputConfig.model_validate(data["input"]).model_dump(mode="json")
        except ValueError:
            pass  # not a valid input section: compared as it is, so it differs
    old = _layout(data)
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


def check_cluster_fits(stages: list[Stage], cluster: dict, use_gpu: bool) -> None:
    """Refuse model actor pools the Ray cluster cannot hold (``cluster``: ``ray.cluster_resources()``):
    Ray would wait for them forever, or fail in its own words. One model copy per actor, at most
    one actor per CPU, ``memory_mb`` of host memory and (with GPUs) ``gpus`` of a GPU each."""
    cpus, gpus, memory = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0), cluster.get("memory", 0.0)
    for stage in stages:
        res = stage.resources
        if res.kind != "model":
            continue
        limits = {"CPUs": int(cpus)}
        if res.memory_mb:
            limits[f"{res.memory_mb} MB of memory each (runtime.model_memory_mb)"] = int(memory // (res.memory_mb * _MB))
        if use_gpu and res.gpus:
            limits[f"{res.gpus:g} GPU each (runtime.actors_per_gpu)"] = int(gpus / res.gpus + 1e-9)
        most = min(limits.values())
        if res.workers > most:
            raise ManifestError(
                f"runtime.model_workers={res.workers}: the Ray cluster has {cpus:g} CPUs, {gpus:g} GPUs and "
                f"{memory / 1024 ** 3:.1f} GB of memory for the {stage.name} actors (one model copy each, "
                f"limited by: {', '.join(limits)}); set runtime.model_workers to at most {max(most, 1)}"
                + ("" if most >= 1 else ", and lower runtime.model_memory_mb or give the cluster more"))


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
    stages = build_stages(manifest)
    for stage in stages:
        stage.setup()
    size = manifest.runtime.cpu_batch_size
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        yield run_stages(stages, {k: [r[k] for r in chunk] for k in chunk[0]})


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
            kwargs["object_store_memory"] = runtime.object_store_memory_mb * _MB
        ray.init(**kwargs)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order
        manifest_json = manifest.model_dump_json()
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        use_gpu = gpus >= 1 and runtime.device != "cpu"
        check_cluster_fits(build_stages(manifest), ray.cluster_resources(), use_gpu)
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // runtime.cpu_batch_size))
        for index, stage in enumerate(build_stages(manifest)):
            res = stage.resources
            size = res.batch_size or runtime.cpu_batch_size
            common = {"batch_size": size, "batch_format": "numpy"}
            if res.kind == "cpu":
                ds = ds.map_batches(_cpu_task(index, stage.name, manifest_json), num_cpus=1, **common)
                continue
            actor = {"fn_constructor_kwargs": {"index": index, "manifest_json": manifest_json},
                     "compute": ray.data.ActorPoolStrategy(size=res.workers)}
            if res.kind == "io":
                # waits on the network, not the CPU: no CPU reserved, so it never starves the CPU stages
                ds = ds.map_batches(_actor_class(stage.name), num_cpus=0, **actor, **common)
                continue
            extra = {"num_gpus": res.gpus} if use_gpu and res.gpus else {}
            # A distinct resource request also keeps Ray from fusing the CPU tasks into the actor.
            extra["memory"] = res.memory_mb * _MB
            # One CPU per actor, but never all of them: actors that held every CPU would leave none
            # for the CPU stages and the plan would wait forever (a 1-CPU cluster, or as many
            # actors as CPUs on a CPU-only run); then the actors share the CPUs with the tasks.
            actor_cpus = min(1.0, max(cpus - 1, 0) / res.workers)
            ds = ds.map_batches(_actor_class(stage.name), num_cpus=actor_cpus, **extra, **actor, **common)
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
        from stages.judges.prompt import load_prompt

        prompt = load_prompt(manifest.adjudicate.prompt)
        extra.update(judge_model=manifest.adjudicate.model, judge_prompt=prompt.name, judge_prompt_hash=prompt.hash)
    started = time.perf_counter()
    # the inputs are listed before manifest.resolved.yaml is written: a missing input must not leave
    # a record that refuses the rerun with the path fixed ("a build with different input")
    pending, expected, skipped = plan(manifest, writer)
    resolved = write_resolved_manifest(out, manifest, extra)
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
