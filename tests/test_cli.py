"""The command line itself: --version, one handler per command, the one error wrapper (fast, no build)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.cli import EXIT_BAD_INPUT, EXIT_FAILED, _COMMANDS, _parser, _run, main

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lookandlearn {__version__}\n"
    assert __version__ == version("look-and-learn")  # pipeline.__version__ and pyproject agree


def test_version_from_the_module():
    done = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"lookandlearn {__version__}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                names |= _commands(sub, full) or {full}
    return names


def test_every_command_has_one_handler():
    assert _commands(_parser()) == set(_COMMANDS)


def test_wrapper_exit_codes_and_no_secrets(capsys, monkeypatch):
    from pipeline.manifest import ManifestError
    from pipeline.publish import PublishError

    monkeypatch.setenv("HF_TOKEN", "sekrit-token-value")

    def raises(exc):
        def handler(args):
            raise exc
        return handler

    assert _run("publish", raises(PublishError("bad --repo")), None) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: bad --repo\n"
    assert _run("build", raises(ManifestError("detect.x: unknown field")), None) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: detect.x: unknown field\n"
    assert _run("build", raises(NotImplementedError("adjudicate.judge='x' is not available")), None) == EXIT_BAD_INPUT
    capsys.readouterr()
    # a plain ValueError is a failed run, not bad input; tokens never reach the terminal
    assert _run("publish", raises(ValueError("401 for hf_abcdefghijkl and sekrit-token-value")), None) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == "error: publish failed: ValueError: 401 for hf_*** and ***\n"
    assert _run("train", raises(NotImplementedError("geometry")), None) == EXIT_FAILED
    assert capsys.readouterr().err == "error: train failed: NotImplementedError: geometry\n"


def test_inspect_rejects_bad_numbers(tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--per-page", "0"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == "error: --per-page must be >= 1"


SAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "sample-random.yaml"


def _build_args(out, sets):
    return ["build", str(SAMPLE), "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)]]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_build_missing_input_is_exit_2(tmp_path, capsys, sample_manifest_args, executor):
    sets = [s for s in sample_manifest_args if not s.startswith("input.path=")]
    sets += [f"input.path={tmp_path / 'nope.jsonl'}", f"runtime.executor={executor}"]
    assert main(_build_args(tmp_path / "o", sets)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "input.path" in err and "nope.jsonl" in err and "does not exist" in err
    # nothing recorded that would refuse the rerun with the path fixed ("different input")
    assert not (tmp_path / "o" / "manifest.resolved.yaml").exists()


def test_build_changed_shard_size_on_rerun_is_exit_2(tmp_path, capsys):
    import yaml

    from pipeline.manifest import load_manifest, manifest_to_dict

    out = tmp_path / "o"
    out.mkdir()
    previous = manifest_to_dict(load_manifest(SAMPLE, out=str(out)))
    (out / "manifest.resolved.yaml").write_text(yaml.safe_dump(previous))
    assert main(_build_args(out, ["output.samples_per_shard=3"])) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "output.samples_per_shard" in err and err.count("\n") == 1
