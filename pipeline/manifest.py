"""Manifests: YAML validated by pydantic, with ``--set dotted.key=value`` overrides.

Unknown or invalid fields raise :class:`ManifestError` whose message names the field and
what is allowed; the CLI turns it into exit code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.adjudicate import AdjudicateConfig
from stages.ground import DetectConfig
from stages.parse import ParseConfig
from stages.read import ImageConfig
from stages.segment import SegmentConfig


class ManifestError(ValueError):
    """A manifest or override that cannot be used (exit code 2)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    format: Literal["jsonl", "llava", "coco-captions", "webdataset"] = "jsonl"
    path: str = Field(..., description="input file (jsonl/llava/coco annotations) or shard pattern/folder (webdataset)")
    image_root: str | None = Field(None, description="folder image paths are relative to (default: the input file's folder)")
    allow_outside_image_root: bool = Field(
        False, description="read image paths that resolve (symlinks followed) outside image_root; default: such "
                           "samples are rejected with 'outside_image_root: <path>'")
    limit: int | None = Field(None, ge=1, description="use only the first N inputs")
    dataset: str | None = Field(None, description="source dataset name recorded in every sample (default: manifest name)")
    coco_per_image: bool = Field(
        False, description="coco-captions only: one sample per image holding all its captions (text.captions; "
                           "entity turn = caption index) instead of one sample per caption")

    @model_validator(mode="after")
    def _per_image_is_coco(self):
        if self.coco_per_image and self.format != "coco-captions":
            raise ValueError(f"input.coco_per_image is only for input.format coco-captions (got {self.format!r})")
        return self


class CardConfig(_Section):
    """What the dataset card (README.md of the build) says about the source data; none of it
    changes a shard (left out of the settings fingerprint)."""
    license: str = Field("other", description="Hub license id of the build (e.g. cc-by-4.0, the source's terms); "
                                              "'other' with license_name / license_link for anything else")
    license_name: str | None = Field(None, description="name of an 'other' license (Hub card license_name)")
    license_link: str | None = Field(None, description="URL or file of an 'other' license (Hub card license_link)")
    homepage: str | None = Field(None, description="the source dataset's homepage, linked from the card")
    citation: str | None = Field(None, description="BibTeX of the source dataset, printed in the card")


class OutputConfig(_Section):
    path: str = Field("out/sample", description="output folder, or an fsspec URL (s3://bucket/prefix, gs://...; "
                                                "file:// is a local folder); see README, Output")
    samples_per_shard: int = Field(1000, ge=1)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options of a URL output.path (e.g. endpoint_url); "
                                          "never written to the output. Credentials: prefer the environment (AWS_*)")

    @field_validator("path")
    @classmethod
    def _file_url(cls, value: str) -> str:
        # file:///data/x is the local folder /data/x: the same build as without the scheme
        return value[len("file://"):] if value.startswith("file://") else value


class RuntimeConfig(_Section):
    executor: Literal["ray", "local"] = Field("ray", description="ray = Ray Data plan; local = plain loop in this process")
    ray_address: str | None = Field(None, description="existing cluster (ray://host:10001 or host:6379); default: embedded local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for embedded local Ray (default: all)")
    object_store_memory_mb: int = Field(2048, ge=256, description="object store size for embedded local Ray")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_workers: int = Field(1, ge=1, description="ground+segment actors in all (one model copy each; "
                                                     "GPUs used = model_workers / actors_per_gpu when GPUs exist)")
    actors_per_gpu: int = Field(1, ge=1, description="ground+segment actors sharing one GPU (2 lets one actor's "
                                                      "host work overlap the other's GPU work)")
    model_memory_mb: int = Field(1024, ge=128, description="host memory Ray reserves for each ground+segment actor")
    cpu_batch_size: int = Field(32, ge=1, description="rows per batch for CPU stages")
    seed: int = 0


class Manifest(_Section):
    name: str = Field(..., description="dataset name; used in shard file names")
    input: InputConfig
    image: ImageConfig = ImageConfig()
    parse: ParseConfig = ParseConfig()
    detect: DetectConfig = DetectConfig()
    segment: SegmentConfig = SegmentConfig()
    adjudicate: AdjudicateConfig = AdjudicateConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    card: CardConfig = CardConfig()

    @field_validator("name")
    @classmethod
    def _name_is_file_safe(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError("use letters, digits, '_' and '-' only (it names shard files)")
        return value

    @model_validator(mode="after")
    def _judge_needs_endpoint(self):
        if self.adjudicate.judge == "openai" and not self.adjudicate.model:
            raise ValueError("adjudicate.model is required when adjudicate.judge is 'openai'")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid manifest {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field")
        elif e["type"] == "missing":
            lines.append(f"  {field}: required field is missing")
        else:
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ManifestError(f"--set {dotted}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ManifestError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ManifestError(f"--set {text!r}: empty key")
    # YAML scalars: numbers, booleans and null come out typed; anything else stays a string.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


class _ManifestLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (a billion-laughs file would eat memory without limit)
    and duplicate keys (YAML keeps the last one silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ManifestError(f"YAML aliases are not allowed (*{event.anchor} at line "
                                f"{event.start_mark.line + 1}); write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ManifestError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_manifest_yaml(path: str | Path) -> dict:
    """A manifest file as a dict (build and train manifests): UTF-8 YAML, a mapping at the top,
    no aliases, no duplicate keys; anything else is a :class:`ManifestError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {path} is not UTF-8 text (byte {exc.start}): is it a YAML file?") from None
    except OSError as exc:
        raise ManifestError(f"manifest {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_ManifestLoader) or {}  # noqa: S506 — a SafeLoader subclass
    except ManifestError as exc:
        raise ManifestError(f"manifest {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {path} must be a mapping at the top level")
    return data


def load_manifest(path: str | Path, overrides: list[str] | None = None, out: str | None = None) -> Manifest:
    path = Path(path)
    data = read_manifest_yaml(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    if out:
        data.setdefault("output", {})["path"] = out
    # Relative input/output paths are relative to the working directory, like any CLI.
    return validate_manifest(data, str(path))


def validate_manifest(data: dict, source: str = "(dict)") -> Manifest:
    """A manifest from a dict (a loaded YAML file, or one built in Python: the ``lookandlearn``
    API); an invalid one is a :class:`ManifestError` naming each bad field and ``source``."""
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {source} must be a mapping, not {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_format_error(err, source)) from None


def manifest_to_dict(manifest: Manifest) -> dict:
    return manifest.model_dump(mode="json")
