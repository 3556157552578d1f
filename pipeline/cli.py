"""``lookandlearn`` command line (also ``python -m pipeline``).

Exit codes (DESIGN.md): 0 success, 1 run failed, 2 bad manifest or arguments (the message
names the field).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 as well; keep the message short
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lookandlearn", description="Look&Learn pseudo-grounding data engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    build = sub.add_parser("build", help="build a dataset from a manifest (resumes an interrupted build)")
    build.add_argument("manifest", help="YAML manifest (see manifests/)")
    build.add_argument("--out", help="output folder (overrides output.path)")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                       help="override a manifest field, e.g. --set detect.box_threshold=0.3 (repeatable)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    tiny = sub.add_parser("tiny-models", help="write randomly initialised tiny GroundingDINO and SAM models (tests, offline sample)")
    tiny.add_argument("dir")

    sample = sub.add_parser("sample-data", help="write the bundled offline sample inputs (captions.jsonl + images)")
    sample.add_argument("dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from pipeline.manifest import ManifestError

    try:
        if args.command == "build":
            return _build(args)
        if args.command == "tiny-models":
            from pipeline.tiny_models import write_tiny_models

            for name, path in write_tiny_models(Path(args.dir)).items():
                print(f"{name}: {path}")
            return EXIT_OK
        if args.command == "sample-data":
            from pipeline.sample_data import write_sample_data

            print(write_sample_data(Path(args.dir)))
            return EXIT_OK
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT


def _build(args) -> int:
    from pipeline.manifest import load_manifest
    from pipeline.runner import build
    from stages.models import ModelUnavailableError

    manifest = load_manifest(args.manifest, args.overrides, out=args.out)
    try:
        stats = build(manifest, progress=not args.no_progress)
    except ModelUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NotImplementedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 — the run failed; say why in one line, details at -v
        logging.getLogger("lookandlearn").debug("build failed", exc_info=True)
        print(f"error: build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    run = stats.get("last_run", {})
    print(f"wrote {stats['samples_out']} samples in {stats['shards']} shards to {manifest.output.path} "
          f"({stats['samples_rejected']} inputs rejected; {run.get('samples_per_second')} samples/s this run)")
    return EXIT_OK
