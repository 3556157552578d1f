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
    limit: int | None = Field(None, ge=1, description="use only the first N inputs")
    dataset: str | None = Field(None, description="source dataset name recorded in every sample (default: manifest name)")


class OutputConfig(_Section):
    path: str = "out/sample"
    samples_per_shard: int = Field(1000, ge=1)


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


def load_manifest(path: str | Path, overrides: list[str] | None = None, out: str | None = None) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {path} must be a mapping at the top level")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    if out:
        data.setdefault("output", {})["path"] = out
    # Relative input/output paths are relative to the working directory, like any CLI.
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_format_error(err, str(path))) from None


def manifest_to_dict(manifest: Manifest) -> dict:
    return manifest.model_dump(mode="json")
