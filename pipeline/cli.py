"""``lookandlearn`` command line (also ``python -m pipeline``).

Exit codes: 0 success, 1 run failed, 2 bad manifest or arguments (the message
names the field), 130 interrupted (Ctrl-C: one line; rerunning a build resumes it). One handler
per command (``_COMMANDS``), all run through one error wrapper (:func:`_run`). The developer tools
(``devkit``: tiny-models, sample-data, experiment, small-models, train's ``model.tiny_if_missing``) are imported
lazily inside those handlers only; a production run never loads them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.cli_devkit import add_devkit_parsers

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class BadArguments(ValueError):
    """Arguments a handler rejects after parsing (exit 2, the message as is)."""


def _version() -> str:
    from pipeline import __version__

    return __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 as well; keep the message short
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lookandlearn", description="Look&Learn pseudo-grounding data engine")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own logs, worker output and progress bars (hidden by default)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    build = sub.add_parser("build", help="build a dataset from a manifest (resumes an interrupted build)")
    build.add_argument("manifest", help="YAML manifest (see manifests/)")
    build.add_argument("--out", help="output folder (overrides output.path)")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                       help="override a manifest field, e.g. --set detect.box_threshold=0.3 (repeatable)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar (the summary table is still printed)")
    build.add_argument("--overwrite", action="store_true",
                       help="remove what an earlier build left in the output folder and build from scratch "
                            "(default: a rerun with other settings is refused)")

    tiny = sub.add_parser("tiny-models", help="write randomly initialised tiny GroundingDINO and SAM models (tests, offline sample)")
    tiny.add_argument("dir")
    tiny.add_argument("--family", action="append", default=[], metavar="FAMILY",
                      choices=["mm-grounding-dino", "owlv2", "sam_hq", "sam2", "sam3"],
                      help="also write this family's tiny random model (repeatable; README 'Model families')")

    sample = sub.add_parser("sample-data", help="write the bundled offline sample inputs (captions.jsonl + images)")
    sample.add_argument("dir")

    conv = sub.add_parser("convert", help="turn an original SAM / GroundingDINO checkpoint into a transformers "
                                          "folder (for the default backend; see README, Backends)")
    conv.add_argument("kind", choices=["sam", "groundingdino"], help="which model the checkpoint holds")
    conv.add_argument("checkpoint", metavar="CHECKPOINT", help="original .pth (e.g. sam_vit_h_4b8939.pth)")
    conv.add_argument("--out", required=True, metavar="DIR", help="transformers folder to write")
    conv.add_argument("--config", metavar="FILE", help="groundingdino: the original config .py (e.g. GroundingDINO_SwinT_OGC.py)")
    conv.add_argument("--text-encoder", metavar="DIR", help="groundingdino: local bert-base-uncased folder "
                                                             "(default: the config's text_encoder_type)")

    insp = sub.add_parser("inspect", help="report acceptance/grounding rates, judge latency and errors, worst shards; "
                                          "--html writes a self-contained gallery page")
    insp.add_argument("out", metavar="OUT", help="a build's output folder")
    insp.add_argument("--html", metavar="FILE", help="also write the HTML gallery to FILE")
    insp.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    insp.add_argument("--top", type=int, default=20, metavar="N", help="phrase roots to list (0 = all; default 20)")
    insp.add_argument("--worst", type=int, default=5, metavar="N", help="worst shards to list (0 = all; default 5)")
    insp.add_argument("--max-samples", type=int, default=1000, metavar="N",
                      help="gallery: at most N samples, evenly subsampled (default 1000)")
    insp.add_argument("--per-page", type=int, default=24, metavar="N", help="gallery: samples per page (default 24)")

    cost = sub.add_parser("cost", help="what a build of N inputs takes (GPU-hours, judge requests and tokens, output "
                                       "size, optionally USD), scaled from a finished pilot build (see README, Cost model)")
    cost.add_argument("out", metavar="OUT", help="a finished pilot build of the real data, with the real judge")
    cost.add_argument("--images", type=int, required=True, metavar="N", help="inputs of the full build (e.g. 665000)")
    cost.add_argument("--gpu-images-per-s", type=float, default=None, metavar="R",
                      help="ground+segment images/s on one GPU (default: the H200 rate bench/results/gpu.json measured)")
    cost.add_argument("--gpus", type=int, default=1, metavar="K", help="GPUs working in parallel (wall time)")
    cost.add_argument("--usd-per-gpu-hour", type=float, default=None, metavar="USD")
    cost.add_argument("--usd-per-m-prompt-tokens", type=float, default=None, metavar="USD")
    cost.add_argument("--usd-per-m-completion-tokens", type=float, default=None, metavar="USD")
    cost.add_argument("--json", action="store_true", help="print the estimate as JSON")

    pub = sub.add_parser("publish", help="upload shards, index, logs, stats, manifest and dataset card "
                                         "to the Hugging Face Hub (--repo) or any fsspec URL (--to)")
    pub.add_argument("out", metavar="OUT", help="a build's output folder")
    dest = pub.add_mutually_exclusive_group(required=True)
    dest.add_argument("--repo", metavar="USER/NAME", help="Hub dataset repository (created if absent)")
    dest.add_argument("--to", metavar="URL", help="fsspec destination: a local path, file://, s3://, gs://, ...")
    pub.add_argument("--private", action="store_true", help="create the Hub repository private (an existing one keeps its visibility)")
    pub.add_argument("--dry-run", action="store_true", help="print exactly what would be uploaded and where; upload nothing")
    pub.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                     help="leave out files matching GLOB (relative to OUT, e.g. 'logs/*'); repeatable")
    pub.add_argument("--revision", metavar="BRANCH", help="Hub branch to commit to (default: main)")
    pub.add_argument("--message", metavar="TEXT", help="Hub commit message")

    trn = sub.add_parser("train", help="fine-tune a VLM with LM loss + λ·where-to-look attention loss (see manifests/train-*.yaml); "
                                       "TensorBoard logs, loss_history.csv and loss_curve.png in train.output_dir")
    trn.add_argument("manifest", help="YAML training manifest (see manifests/train-sample.yaml)")
    trn.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                     help="override a manifest field, e.g. --set wtl.lambda=0.3 (repeatable)")

    add_devkit_parsers(sub, _Parser)   # experiment shapes, small-models (pipeline/cli_devkit.py)

    # evaluate KIND ...: one sub-command per kind of evaluation
    about = ("evaluate a build or a model: judge (verdicts vs human labels), labels (groundings vs gold masks), "
             "coco-truth (gold masks from COCO), grounding (a trained model's attention as masks)")
    evaluate = sub.add_parser("evaluate", help=about, description=about)
    ev_sub = evaluate.add_subparsers(dest="evaluate_command", required=True, parser_class=_Parser)
    ev_judge = ev_sub.add_parser("judge", help="agreement of judge verdicts with human labels: accept precision, "
                                               "recall, overall agreement (several OUTs compare judges/prompts)")
    ev_judge.add_argument("out", metavar="OUT", nargs="+", help="build output folder(s)")
    ev_judge.add_argument("--labels", required=True, metavar="FILE",
                          help='JSONL: {"key", "entity", "region", "accept": true|false} per line (see README)')
    ev_judge.add_argument("--json", metavar="FILE", help="also write the full results as JSON to FILE ('-' = stdout only)")
    ev_lab = ev_sub.add_parser("labels", help="a build's groundings against gold masks: entity precision, recall, "
                                              "F1 (IoU >= 0.5), IoU distribution, false grounding (see README)")
    ev_lab.add_argument("out", metavar="OUT", help="build output folder")
    ev_lab.add_argument("--truth", required=True, metavar="FILE",
                        help='JSONL: {"id", "entities": [{"turn", "start", "end", "phrase", "mask": RLE|null}]} per input')
    ev_lab.add_argument("--iou", type=float, default=0.5, help="IoU at which a grounding counts as correct (0.5)")
    ev_lab.add_argument("--top", type=int, default=20, help="phrase roots to list (0 = all)")
    ev_lab.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="print the report as JSON instead of tables (--json), or also write it to FILE")
    ev_coco = ev_sub.add_parser("coco-truth", help="write a truth file for `evaluate labels` from COCO instance "
                                                   "annotations and a file linking phrases to annotation ids")
    ev_coco.add_argument("instances", metavar="INSTANCES", help="COCO instances JSON (images, annotations)")
    ev_coco.add_argument("--links", required=True, metavar="FILE",
                         help='JSONL: {"id", "image_id", "entities": [{"turn", "start", "end", "phrase", "annotations": [ids]}]}')
    ev_coco.add_argument("--out", required=True, metavar="FILE", help="truth JSONL to write")
    ev_gr = ev_sub.add_parser("grounding", help="attention read-out as masks: heatmaps of phrase tokens mapped to "
                                                "pixels, thresholded; mask IoU, cIoU/gIoU, pointing game, overlays")
    ev_gr.add_argument("--model", required=True, help="VLM folder or hub id (e.g. a `lookandlearn train` output_dir)")
    ev_gr.add_argument("--shards", help="build output / shard folder: score every grounded entity of the split")
    ev_gr.add_argument("--image", help="a single image (with --phrase)")
    ev_gr.add_argument("--phrase", action="append", default=[], help="phrase to read out (with --image; repeatable)")
    ev_gr.add_argument("--caption", help="caption containing the phrases (default: the phrases joined)")
    ev_gr.add_argument("--layers", type=int, nargs="+", help="language-model layers (default: middle third)")
    ev_gr.add_argument("--threshold", choices=["relative", "otsu", "topk"], default="relative")
    ev_gr.add_argument("--value", type=float, help="relative: fraction of max (0.5); topk: fraction of pixels (0.1)")
    ev_gr.add_argument("--limit", type=int)
    ev_gr.add_argument("--overlays", metavar="DIR", help="write overlay PNGs here: phrase, attention heat map, read-out "
                                                          "and true mask outlines, cropped-away pixels in grey (see README)")
    ev_gr.add_argument("--json", metavar="FILE", help="write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    name = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    return _run(name, _COMMANDS[name], args)


# Errors that mean "bad manifest, arguments or inputs" (exit 2), by module and class name. An instance
# can exist only once its module is imported, so they are looked up in sys.modules instead of imported
# here (pipeline.inspect pulls in pandas; a failing import must not hide the real error).
_BAD_INPUT_ERRORS = (("pipeline.manifest", "ManifestError"), ("stages.models", "ModelUnavailableError"),
                     ("stages.record.shards", "NotAnOutputError"), ("pipeline.publish", "PublishError"),
                     ("pipeline.evaluate_judge", "LabelError"), ("pipeline.convert", "ConvertError"))


def _bad_input(name: str, exc: Exception) -> bool:
    if isinstance(exc, (BadArguments, *_ALSO_BAD_INPUT.get(name, ()))):
        return True
    for module, cls in _BAD_INPUT_ERRORS:
        error = getattr(sys.modules.get(module), cls, None)
        if isinstance(error, type) and isinstance(exc, error):
            return True
    return False


def _run(name: str, handler, args) -> int:
    """Run one command's handler: a known bad-input error is exit 2 with its message, any other
    error exit 1 with one line (``NAME failed: Type: message``; the traceback at -v). Messages never
    show a Hub token."""
    try:
        return handler(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line, not the traceback of wherever the run was
        print("interrupted; rerun the same command to resume: complete shards are kept" if name == "build"
              else f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 — say why in one line, details at -v
        if _bad_input(name, exc):
            print(f"error: {_no_secrets(str(exc))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        logging.getLogger("lookandlearn").debug("%s failed", name, exc_info=True)
        print(f"error: {name} failed: {type(exc).__name__}: {_no_secrets(str(exc))}", file=sys.stderr)
        return EXIT_FAILED


def _no_secrets(text: str) -> str:
    """Hide anything that looks like a Hub token in an error message."""
    import os
    import re

    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    from pipeline.store import redact  # object-storage credentials (AWS_* of the environment)

    return redact(text.replace(token, "***") if token else text)


def _build(args) -> int:
    from pipeline.manifest import load_manifest
    from pipeline.runner import build

    manifest = load_manifest(args.manifest, args.overrides, out=args.out)
    stats = build(manifest, progress=not args.no_progress, overwrite=args.overwrite, verbose=args.verbose)
    from pipeline.console import print_summary

    print_summary(stats, str(manifest.output.path))  # shards, samples, top rejections, wall time, samples/s
    return EXIT_OK


def _tiny_models(args) -> int:
    from devkit.tiny_models import write_tiny_models

    for name, path in write_tiny_models(Path(args.dir)).items():
        print(f"{name}: {path}")
    if args.family:
        from devkit.tiny_families import write_tiny_family

        for family in args.family:
            print(f"{family}: {write_tiny_family(Path(args.dir), family)} (RANDOM weights, tests only)")
    return EXIT_OK


def _sample_data(args) -> int:
    from devkit.sample_data import write_sample_data

    print(write_sample_data(Path(args.dir)))
    return EXIT_OK


def _convert(args) -> int:
    if args.kind == "sam":
        from pipeline.convert import convert_sam

        print(f"wrote {convert_sam(args.checkpoint, args.out)}: use it as segment.model (segment.backend: transformers)")
    else:
        from pipeline.convert_gdino import convert_groundingdino

        folder = convert_groundingdino(args.checkpoint, args.out, config=args.config, text_encoder=args.text_encoder)
        print(f"wrote {folder}: use it as detect.model (detect.backend: transformers)")
    return EXIT_OK


def _inspect(args) -> int:
    from pipeline.inspect import analyze, render

    for name in ("top", "worst", "max_samples", "per_page"):
        if getattr(args, name) < (0 if name in ("top", "worst") else 1):
            raise BadArguments(f"--{name.replace('_', '-')} must be {'>= 0' if name in ('top', 'worst') else '>= 1'}")
    from pipeline.store import local_copy

    with local_copy(args.out) as out:  # a build in object storage: read from a temporary copy
        return _inspect_folder(args, out, analyze, render)


def _inspect_folder(args, out: str, analyze, render) -> int:
    import json

    report = analyze(out, top=args.top, worst=args.worst)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 140))
        render(report, console)
    if args.html:
        from pipeline.gallery import write_gallery

        info = write_gallery(out, args.html, max_samples=args.max_samples, per_page=args.per_page, report=report)
        print(f"gallery: {info['path']} ({info['shown']} of {info['samples']} samples, {info['bytes'] / 1e6:.1f} MB)",
              file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _cost(args) -> int:
    import json

    from pipeline.cost import MEASURED_GPU_RATE, Prices, estimate, render
    from pipeline.store import local_copy

    prices = Prices(args.usd_per_gpu_hour, args.usd_per_m_prompt_tokens, args.usd_per_m_completion_tokens)
    with local_copy(args.out) as out:
        result = estimate(Path(out), args.images, MEASURED_GPU_RATE if args.gpu_images_per_s is None else args.gpu_images_per_s, args.gpus, prices)
    result["pilot"]["folder"] = args.out
    if args.json:
        print(json.dumps(result, indent=1))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cost of {args.images:,} inputs", show_header=False)
    for what, value in render(result):
        table.add_row(what, value)
    Console().print(table)
    return EXIT_OK


def _publish(args) -> int:
    from pipeline.publish import run
    from pipeline.store import local_copy

    with local_copy(args.out) as out:  # a build in object storage: published from a temporary copy
        return run(out, repo=args.repo, to=args.to, private=args.private, dry_run=args.dry_run,
               exclude=args.exclude, revision=args.revision, message=args.message)


def _train(args) -> int:
    import json

    from pipeline.train import load_train_manifest, run_train

    manifest = load_train_manifest(args.manifest, args.overrides)
    model = manifest.model
    if model.tiny_if_missing and not (Path(model.path) / "config.json").is_file():
        from devkit.tiny_vlms import write_tiny_vlm  # the offline sample's stand-in model

        write_tiny_vlm(Path(model.path), model.tiny_if_missing)
    summary = run_train(manifest)
    print(json.dumps(summary, indent=2, default=str))
    return EXIT_OK


def _experiment_shapes(args) -> int:
    from devkit.experiments.shapes import run_shapes_cli, setting_from_args

    if args.sweep and any(v is not None for v in (args.seeds, args.lams, args.query, args.schedule)):
        raise BadArguments("--sweep sets the seeds, λ, query and schedule of its grid; "
                           "leave out --seeds, --lambda, --query and --schedule")
    try:
        st, lams = setting_from_args(args)
    except ValueError as exc:
        raise BadArguments(str(exc)) from None
    return run_shapes_cli(args, st, lams)


def _small_models_train(args) -> int:
    from devkit.small_models import train_small_models_cli

    return train_small_models_cli(args)


def _small_models_evaluate(args) -> int:
    from devkit.small_models import evaluate_small_models_cli

    return evaluate_small_models_cli(args)


def _evaluate_judge(args) -> int:
    import json

    from pipeline.evaluate_judge import evaluate_judge, format_table, read_labels

    labels = read_labels(args.labels)
    results = [evaluate_judge(out, labels) for out in args.out]
    if args.json == "-":
        print(json.dumps(results, indent=2))
        return EXIT_OK
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return EXIT_OK


def _evaluate_labels(args) -> int:
    from pipeline.evaluate_labels import main as labels_main

    return labels_main(args)


def _evaluate_coco_truth(args) -> int:
    from pipeline.labels_truth import coco_truth, write_truth

    print(write_truth(coco_truth(args.instances, args.links), args.out))
    return EXIT_OK


def _evaluate_grounding(args) -> int:
    from pipeline.evaluate_grounding import main as grounding_main

    return grounding_main(args)


# command (with its sub-command) -> handler(args) -> exit code
_COMMANDS = {
    "build": _build,
    "tiny-models": _tiny_models,
    "sample-data": _sample_data,
    "convert": _convert,
    "inspect": _inspect,
    "cost": _cost,
    "publish": _publish,
    "train": _train,
    "experiment shapes": _experiment_shapes,
    "small-models train": _small_models_train,
    "small-models evaluate": _small_models_evaluate,
    "evaluate judge": _evaluate_judge,
    "evaluate grounding": _evaluate_grounding,
    "evaluate labels": _evaluate_labels,
    "evaluate coco-truth": _evaluate_coco_truth,
}
# further exit-2 errors of one command: a build asking for a judge or feature that is not available
_ALSO_BAD_INPUT: dict[str, tuple[type[Exception], ...]] = {"build": (NotImplementedError,)}
