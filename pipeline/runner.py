"""The build: list inputs → plan shards → run the stages → write complete shards.

The stages are one declared list (:func:`build_stages`; each a ``stages.base.Stage`` with its
``resources``). This module is the only place that knows about Ray: ``executor: ray`` turns the
list into a Ray Data plan (``cpu`` stages as tasks, ``model`` stages as an actor pool with one
model copy per actor, ``io`` stages as actors that reserve no CPU), ``executor: local`` runs the
very same list in a loop in this process (tests, debugging).

Resume: the input list and its split into shards are fixed by the manifest, so shard N always
holds the same samples. A shard whose completion record matches its files (``done/``, sizes) and
this build's settings fingerprint is skipped; a record with other settings stops the build
(``pipeline/outdir.py``; ``--overwrite`` starts over); any other shard is cleared and redone. Files are renamed into place only when whole, so a ``kill -9`` at any
moment leaves complete shards or garbage that the next run removes: never a duplicate.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import yaml

from pipeline import __version__
from pipeline.manifest import InputConfig, Manifest, ManifestError, manifest_to_dict
from pipeline.shared_limits import shared_limiter
from stages.adjudicate import AdjudicateStage
from stages.base import Stage, run_stages
from stages.ground_segment import GroundAndSegment, PrepareStage
from stages.parse import ParseStage
from stages.read import ReadStage
from stages.record import ROW_OK, SCHEMA_VERSION, rows as batch_rows

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
        AdjudicateStage(manifest.adjudicate, out_dir=_judge_dir(manifest.output.path)),
    ]


def _judge_dir(path: str) -> str | None:
    """The local output folder (absolute: Ray workers); None for object storage (no judge cache)."""
    return None if "://" in path else str(Path(path).resolve())


# --- Ray wrappers: one stage object per worker process, built on first use ----------------

_WORKER_STAGES: dict = {}


def _worker_stage(index: int, manifest_json: str, limiter=None) -> Stage:
    key = (index, manifest_json, getattr(limiter, "name", None))
    stage = _WORKER_STAGES.get(key)
    if stage is None:
        stage = build_stages(Manifest.model_validate_json(manifest_json))[index]
        if limiter is not None:
            stage.limiter = limiter
        stage.setup()
        _WORKER_STAGES[key] = stage
    return stage


def worker_manifest_json(manifest: Manifest) -> str:
    """The manifest the Ray workers get: without ``output.storage_options`` (credentials stay on the driver)."""
    output = manifest.output.model_copy(update={"storage_options": {}})
    return manifest.model_copy(update={"output": output}).model_dump_json()


def _cpu_task(index: int, name: str, manifest_json: str):
    """A Ray task function called ``name`` so that progress lines read MapBatches(parse)."""
    def fn(batch: dict) -> dict:
        return _worker_stage(index, manifest_json)(batch)

    fn.__name__ = fn.__qualname__ = name
    return fn


class _StageActor:
    """A stage in a Ray actor: built and set up once (the model loads when the actor starts)."""

    def __init__(self, index: int, manifest_json: str, limiter=None):
        self.stage = _worker_stage(index, manifest_json, limiter)

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


def check_output_matches(out: Path, manifest: Manifest, text: str | None = None) -> None:
    """Refuse other layout fields than the build in ``out`` (``text``: its resolved manifest,
    given for a build in object storage)."""
    if text is None:
        previous = Path(out) / "manifest.resolved.yaml"
        if not previous.exists():
            return
        text = previous.read_text()
    data = yaml.safe_load(text) or {}
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
    from stages.backends.check import check_detector, check_segmenter
    from stages.families import is_grounder

    check_detector(manifest.detect, "detect.model")
    if not is_grounder(manifest.detect):  # SAM 3 makes the masks itself: segment.model is not used
        check_segmenter(manifest.segment, "segment.model")


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


def plan(manifest: Manifest, writer, redone: dict | None = None) -> tuple[list[dict], dict[int, int], int]:
    """Pending items, ``{shard: rows expected}`` of the shards to build, and the number of complete
    shards kept. A shard is kept when its completion record matches its files (sizes; see
    ``ShardWriter.check``) and its settings fingerprint is this build's (else ManifestError);
    any other shard that left files is cleared and counted in ``redone`` by reason."""
    from pipeline.outdir import check_fingerprints
    from pipeline.sources import list_items

    items = list_items(manifest)
    per_shard: dict[int, int] = defaultdict(int)
    for item in items:
        per_shard[item["shard"]] += 1
    done, records = set(), {}
    redone = {} if redone is None else redone
    for shard in per_shard:
        reason = writer.check(shard)
        if reason is None:
            done.add(shard)
            records[shard] = writer.done_record(shard)
        elif writer.has_files(shard):
            reason = reason.split(":")[0]
            redone[reason] = redone.get(reason, 0) + 1
            log.warning("shard %d is redone: %s", shard, reason)
    check_fingerprints(writer.location, records, writer.settings)
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

def setup_stages(manifest: Manifest) -> list[Stage]:
    """The stage list, set up in this process (models loaded): the local executor, the Python API."""
    stages = build_stages(manifest)
    for stage in stages:
        stage.setup()
        stage._ready = True  # the row loop need not call setup() again
    return stages


def run_local(stages: list[Stage], rows: list[dict], batch_size: int):
    """Input rows through set-up stages in this process, ``batch_size`` rows a batch: the output batches."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield run_stages(stages, {k: [r[k] for r in chunk] for k in chunk[0]})


def _execute_local(manifest: Manifest, rows: list[dict]):
    yield from run_local(setup_stages(manifest), rows, manifest.runtime.cpu_batch_size)


# What the plan may hold in the object store at once (issue 9, bench/stream.py). With the whole
# object store as the budget (GBs) Ray Data's backpressure starts late: the CPU stages ran far ahead
# of the model actor and memory grew with the input.
_PLAN_OBJECT_STORE_BYTES = 256 * _MB


def _bound_streaming(ctx) -> None:
    """Keep the Ray Data plan streaming with bounded memory (see _PLAN_OBJECT_STORE_BYTES)."""
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=_PLAN_OBJECT_STORE_BYTES)


def _actor_cpus(workers: int, cpus: float) -> float:
    """One CPU per model actor, but never all of them: actors that held every CPU would leave none
    for the CPU stages and the plan would wait forever (a 1-CPU cluster, or as many actors as CPUs
    on a CPU-only run); then the actors share the CPUs with the tasks."""
    return min(1.0, max(cpus - 1, 0) / workers)


def _cpu_task_cpus(stages: list[Stage], cpus: float) -> float:
    """CPUs per CPU-stage task: 1, or less when the CPUs left beside the model actors cannot give
    each run of CPU stages (Ray fuses consecutive ones into one operator) a whole CPU. Ray Data
    reserves CPUs for operators upstream first, so on 2 CPUs the model actor and the fused
    read->parse->prepare task took both and adjudicate, the last stage, got a CPU only once every
    input had been read: the first shard at 140 s of a 160 s, 3,000-row build (issue 9)."""
    runs, previous, held = 0, None, 0.0
    for stage in stages:
        kind = stage.resources.kind
        if kind == "cpu" and previous != "cpu":
            runs += 1
        if kind == "model":
            held += stage.resources.workers * _actor_cpus(stage.resources.workers, cpus)
        previous = kind
    return min(1.0, max(cpus - held, 1.0) / max(runs, 1))


def _execute_ray(manifest: Manifest, rows: list[dict], first: int = 0, verbose: bool = False):
    """The Ray Data plan of the stages (from number ``first`` on: tests start later with rows that
    hold what that stage reads); yields the output batches. Ray's own logs, worker output and
    progress bars reach the console only when ``verbose`` (``-v``; ``pipeline.console.quiet_ray``)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data

    from pipeline.console import quiet_ray

    runtime = manifest.runtime
    started_here, limiters = False, []
    if not ray.is_initialized():
        # quiet: no worker output forwarded, only Ray's errors (its logs stay in its session folder)
        kwargs = {"include_dashboard": False, "log_to_driver": verbose,
                  "logging_level": logging.INFO if verbose else logging.ERROR}
        if runtime.ray_address:
            kwargs["address"] = runtime.ray_address
        else:
            kwargs["num_cpus"] = runtime.num_cpus or os.cpu_count()
            kwargs["object_store_memory"] = runtime.object_store_memory_mb * _MB
            # Keep idle workers instead of ending them: the CPU stages run as fractional-CPU tasks
            # (_cpu_task_cpus), more at once than Ray's default soft limit (one worker per CPU),
            # and each restarted worker imports torch/spaCy again. 1,500 rows on 2 CPUs:
            # 190 s with the default, 118.5 s with 8 (bench/results/stream-throughput.md).
            os.environ.setdefault("RAY_num_workers_soft_limit", str(2 * int(kwargs["num_cpus"]) + 4))
        ray.init(**kwargs)
        started_here = True
    quiet = None if verbose else quiet_ray(ray)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order
        _bound_streaming(ctx)
        manifest_json = worker_manifest_json(manifest)
        gpus = ray.cluster_resources().get("GPU", 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        use_gpu = gpus >= 1 and runtime.device != "cpu"
        check_cluster_fits(build_stages(manifest), ray.cluster_resources(), use_gpu)
        task_cpus = _cpu_task_cpus(build_stages(manifest), cpus)
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // runtime.cpu_batch_size))
        for index, stage in enumerate(build_stages(manifest)):
            if index < first:
                continue
            res = stage.resources
            size = res.batch_size or runtime.cpu_batch_size
            common = {"batch_size": size, "batch_format": "numpy"}
            if res.kind == "cpu":
                ds = ds.map_batches(_cpu_task(index, stage.name, manifest_json), num_cpus=task_cpus, **common)
                continue
            actor = {"fn_constructor_kwargs": {"index": index, "manifest_json": manifest_json},
                     "compute": ray.data.ActorPoolStrategy(size=res.workers)}
            limiter = shared_limiter(ray, stage)
            if limiter is not None:  # rate limits for all the stage's actors together
                limiters.append(limiter)
                actor["fn_constructor_kwargs"]["limiter"] = limiter
            if res.kind == "io":
                # waits on the network, not the CPU: no CPU reserved, so it never starves the CPU stages
                ds = ds.map_batches(_actor_class(stage.name), num_cpus=0, **actor, **common)
                continue
            extra = {"num_gpus": res.gpus} if use_gpu and res.gpus else {}
            # A distinct resource request also keeps Ray from fusing the CPU tasks into the actor.
            extra["memory"] = res.memory_mb * _MB
            actor_cpus = _actor_cpus(res.workers, cpus)
            ds = ds.map_batches(_actor_class(stage.name), num_cpus=actor_cpus, **extra, **actor, **common)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        for limiter in limiters:
            ray.kill(limiter.actor)
        if started_here:
            ray.shutdown()
        if quiet is not None:
            quiet.close()


# --- the build -----------------------------------------------------------------------------

def build(manifest: Manifest, progress: bool = True, overwrite: bool = False, verbose: bool = False) -> dict:
    """Build into ``output.path`` holding its lock (``pipeline/outdir.py``); ``overwrite`` first
    removes what an earlier build left there instead of refusing other settings. ``progress``: the
    progress bar on stderr; ``verbose``: Ray's own logs and progress too (``-v``)."""
    from pipeline.outdir import check_is_build_folder, clear_build, lock

    if "://" in manifest.output.path:  # object storage (pipeline/remote_out.py)
        from pipeline.remote_out import remote_build

        with remote_build(manifest, overwrite, check_output_matches, check_models) as remote:
            return _build_locked(manifest, remote.staging, progress, verbose, remote=remote)
    out = Path(manifest.output.path)
    check_is_build_folder(out)
    if not overwrite:
        check_output_matches(out, manifest)
    check_models(manifest)
    with lock(out):
        if overwrite:
            clear_build(out)
        return _build_locked(manifest, out, progress, verbose)


def _build_locked(manifest: Manifest, out: Path, progress: bool, verbose: bool = False, remote=None) -> dict:
    from pipeline.console import BuildProgress, quiet_transformers
    from pipeline.outdir import settings_of
    from pipeline.stats import aggregate_stats, resolved_models, write_card, write_resolved_manifest
    from stages.write import ShardWriter

    extra = {"pipeline": __version__, "schema": SCHEMA_VERSION}   # a new record schema never resumes old shards
    if manifest.adjudicate.judge == "openai":
        from stages.judges.prompt import load_prompt

        prompt = load_prompt(manifest.adjudicate.prompt)
        extra.update(judge_model=manifest.adjudicate.model, judge_prompt=prompt.name, judge_prompt_hash=prompt.hash)
    settings = settings_of(manifest, {**resolved_models(manifest), **extra})
    writer = remote.writer(manifest.name, settings) if remote else ShardWriter(out, manifest.name, settings)
    started = time.perf_counter()
    redone: dict[str, int] = {}
    pending, expected, skipped = plan(manifest, writer, redone)
    log.info("%d shards to build, %d already complete%s", len(expected), skipped,
             "".join(f"; shards redone: {n} ({why})" for why, n in sorted(redone.items())))
    rows = _input_rows(pending)
    buffers: dict[int, list[dict]] = defaultdict(list)
    written = rejected = 0
    if rows:
        if manifest.runtime.executor == "ray":
            batches = _execute_ray(manifest, rows, verbose=verbose)
        else:
            batches = _execute_local(manifest, rows)
        # closing(): on an error or Ctrl-C the plan ends (Ray shut down, stderr restored) before the error is reported
        with closing(batches), BuildProgress(len(rows), len(expected), enabled=progress) as bar, \
                quiet_transformers(verbose):
            for batch in batches:
                done = bad = 0
                for row in batch_rows(batch):
                    shard = int(row["shard"])
                    buffers[shard].append(row)
                    bad += row["status"] != ROW_OK
                    if len(buffers[shard]) == expected[shard]:
                        writer.write_shard(shard, buffers.pop(shard))
                        done += 1
                written, rejected = written + done, rejected + bad
                bar.advance(len(batch["seq"]), rejected=bad, shards=done)
        if buffers:
            missing = {s: expected[s] - len(b) for s, b in buffers.items()}
            raise RuntimeError(f"rows missing from shards {missing}: the executor lost samples")
    elapsed = time.perf_counter() - started
    run = {"samples_processed": len(rows), "samples_rejected": rejected, "shards_written": written,
           "shards_skipped": skipped,
           "shards_redone": redone, "wall_seconds": round(elapsed, 2),
           "samples_per_second": round(len(rows) / elapsed, 3) if rows and elapsed else None,
           "executor": manifest.runtime.executor}
    # written only now: every shard is complete and made with these settings, so the manifest
    # and the card describe what the shards hold
    if remote:
        return remote.finish(manifest, run, extra, __version__)
    resolved = write_resolved_manifest(out, manifest, extra)
    stats = aggregate_stats(out, run)
    write_card(out, manifest, stats, resolved, __version__)
    return stats
