"""The Python API: :func:`build` a dataset, or :class:`Labeler` / :func:`label` samples in memory.

Both take a manifest as a YAML path, a dict of the same fields, or a validated
``pipeline.manifest.Manifest``; a dict goes through the same pydantic model as a YAML file, so a
bad field is a :class:`ManifestError` naming it. ``build`` is the CLI's ``lookandlearn build``
(``pipeline/runner.py``); the labeler runs the runner's own stage list (``build_stages``) through
the local executor's loop (``run_local``), so a labelled sample is the record a shard would hold.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.manifest import Manifest, ManifestError, parse_override, read_manifest_yaml, validate_manifest

ManifestLike = str | os.PathLike | Mapping | Manifest
# what a Labeler needs no input for: a manifest written only to label may leave `input` out
_NO_INPUT = {"format": "jsonl", "path": "(in memory)"}


class Rejected(ValueError):
    """A sample the pipeline rejected (an unreadable image, an empty caption, ...). ``reason`` is
    what a build writes to ``rejected/`` (``short_snake_case: detail``), ``key`` the sample key."""

    def __init__(self, reason: str, key: str = ""):
        super().__init__(f"{key}: {reason}" if key else reason)
        self.reason, self.key = reason, key


def load(manifest: ManifestLike, *, out: str | os.PathLike | None = None,
         overrides: Mapping[str, Any] | Iterable[str] | None = None, source: str | None = None,
         input_optional: bool = False) -> Manifest:
    """A validated manifest from a YAML path, a dict or a ``Manifest``, with ``overrides``
    (``{"detect.box_threshold": 0.3}``, values as given; or ``["detect.box_threshold=0.3"]`` as on
    the command line) and ``out`` (``output.path``) applied. Raises :class:`ManifestError`."""
    if isinstance(manifest, Manifest):
        data, where = manifest.model_dump(mode="json", by_alias=True), source or "(Manifest)"
    elif isinstance(manifest, Mapping):
        data, where = copy.deepcopy(dict(manifest)), source or "(dict)"
    elif isinstance(manifest, (str, os.PathLike)):
        data, where = read_manifest_yaml(manifest), str(manifest)
    else:
        raise ManifestError(f"manifest must be a YAML path, a dict or a Manifest, not {type(manifest).__name__}")
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = [parse_override(item) for item in overrides or []]
    for key, value in pairs:
        _set(data, str(key), value)
    if out is not None:
        _set(data, "output.path", os.fspath(out))
    if input_optional and "input" not in data:
        data["input"] = dict(_NO_INPUT)
    return validate_manifest(data, where)


def _set(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ManifestError(f"override {dotted}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


# --- build -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildResult:
    """What :func:`build` made: the output folder and its ``stats.json`` (as a dict)."""

    path: Path
    stats: dict = field(repr=False)

    @property
    def shards(self) -> list[Path]:
        """The shard tars of the build, in order."""
        return sorted((self.path / "shards").glob("*.tar"))


def build(manifest: ManifestLike, *, out: str | os.PathLike | None = None,
          overrides: Mapping[str, Any] | Iterable[str] | None = None, overwrite: bool = False,
          progress: bool = False) -> BuildResult:
    """``lookandlearn build``: build (or resume) the dataset of ``manifest`` into ``out`` (default
    ``output.path``). ``overwrite`` rebuilds a folder made with other settings from scratch.
    Raises :class:`ManifestError` for a bad manifest, input, output folder or model."""
    from pipeline.runner import build as run_build

    m = load(manifest, out=out, overrides=overrides)
    stats = run_build(m, progress=progress, overwrite=overwrite)
    return BuildResult(Path(m.output.path), stats)


# --- label -------------------------------------------------------------------------------

class Labeler:
    """The stages of a build, set up once in this process (spaCy, GroundingDINO, SAM and the judge
    loaded on construction), labelling images in memory. ``runtime.executor`` is not used: this
    always runs in-process (``runtime.device``, ``dtype`` and ``cpu_batch_size`` are).

    ``label`` returns the sample record exactly as a shard's ``{key}.json`` holds it
    (docs/schema.md): entities, regions with boxes, COCO-RLE masks (``decode_mask``) and verdicts.
    The stored image bytes are not returned. An LLM judge journals its answers under
    ``output.path`` as in a build.
    """

    def __init__(self, manifest: ManifestLike, *, overrides: Mapping[str, Any] | Iterable[str] | None = None):
        from pipeline.runner import check_models, setup_stages

        self.manifest = load(manifest, overrides=overrides, input_optional=True)
        check_models(self.manifest)
        self.stages = setup_stages(self.manifest)
        self.dataset = self.manifest.input.dataset or self.manifest.name

    def label(self, image: Any, caption: str | None = None, *, conversations: list | None = None,
              id: str | None = None, meta: Mapping | None = None) -> dict:
        """Label one image (a path, image file bytes, a PIL image or an ``(H, W, 3)`` uint8 array)
        with its ``caption`` or LLaVA ``conversations``. The record's key is
        ``{input.dataset or name}-{id}``; ``id`` defaults to the file name's stem for a path,
        else a hash of the image; ``meta`` (the input's other fields) becomes ``source.meta``.
        Raises :class:`Rejected` when the pipeline rejects the sample."""
        [result] = self.label_many([{"image": image, "caption": caption, "conversations": conversations,
                                     "id": id, "meta": meta}])
        return result

    def label_many(self, samples: Iterable[Mapping | tuple], *, errors: str = "raise") -> list:
        """Label many samples, ``runtime.cpu_batch_size`` per model call: each a dict with ``image``
        and ``caption`` or ``conversations`` (and ``id``, ``meta``), or an ``(image, caption)`` pair. Returns
        the records in order; a rejected sample raises :class:`Rejected` (``errors="raise"``) or
        stands in the list as its :class:`Rejected` (``errors="return"``)."""
        from pipeline.runner import run_local
        from stages.record import ROW_OK, check_record, loads, rows as batch_rows

        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        rows = []
        for seq, sample in enumerate(samples):
            if isinstance(sample, tuple):
                sample = dict(zip(("image", "caption"), sample))
            item = _item(self.dataset, seq, **sample)
            rows.append({"seq": seq, "shard": 0, "key": item["key"], "item": item, "times": "{}"})
        out: list = []
        for batch in run_local(self.stages, rows, self.manifest.runtime.cpu_batch_size) if rows else ():
            for row in batch_rows(batch):
                if row["status"] != ROW_OK:
                    out.append(Rejected(str(row["reason"]), str(row["key"])))
                    continue
                record = loads(row["record"])
                problems = check_record(record)
                if problems:  # as the shard writer: a stage bug never passes silently
                    raise ValueError(f"sample {record['key']} breaks the schema: {problems}")
                out.append(record)
        if errors == "raise":
            for result in out:
                if isinstance(result, Rejected):
                    raise result
        return out


def _item(dataset: str, seq: int, image: Any = None, caption: str | None = None,
          conversations: list | None = None, id: str | None = None, meta: Mapping | None = None) -> dict:
    """The work item of one in-memory sample: what ``pipeline.sources.list_items`` makes of an
    input line, with the same text checks and cleaning (the image bytes ride in ``image_ref``)."""
    from pipeline.source_text import _clean_fields, _text_and_check, source_meta
    from stages.record import make_key

    if caption is not None and conversations is not None:
        raise ValueError("give a caption or conversations, not both")
    ref, default_id = _image_ref(image)
    source_id = str(id) if id is not None and str(id).strip() else default_id
    obj = {"conversations": conversations} if conversations is not None else {"caption": caption}
    try:
        text, precheck = _text_and_check(_clean_fields(obj))
    except (ValueError, RecursionError) as exc:  # nested too deep (_TooDeep)
        text, precheck = obj, f"bad_json: {exc}"
    return {"seq": seq, "shard": 0, "key": make_key(dataset, source_id),
            "source": {"dataset": dataset, "id": source_id, "meta": source_meta(meta)}, "image_ref": ref, "text": text,
            "precheck": precheck}


def _image_ref(image: Any) -> tuple[dict, str]:
    """``image_ref`` for the read stage, and the default source id."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return {"path": str(path.absolute())}, path.stem or "image"
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        data = _encode(image)
    return {"bytes": data}, hashlib.sha256(data).hexdigest()[:16]


def _encode(image: Any) -> bytes:
    """A PIL image or a uint8 array as lossless PNG bytes (then stored as ``image.store_format``)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        if not isinstance(image, np.ndarray):
            raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


_LAST: tuple[str, Labeler] | None = None


def label(image: Any, caption: str | None = None, *, manifest: ManifestLike,
          conversations: list | None = None, id: str | None = None,
          overrides: Mapping[str, Any] | Iterable[str] | None = None) -> dict:
    """One call: label ``image`` + ``caption`` (or ``conversations``) with the models of
    ``manifest``. The last labeler is kept, so repeated calls with the same manifest load the
    models once; hold a :class:`Labeler` yourself to control that."""
    global _LAST
    m = load(manifest, overrides=overrides, input_optional=True)
    key = m.model_dump_json()
    if _LAST is None or _LAST[0] != key:
        _LAST = None  # free the old models before loading new ones
        _LAST = (key, Labeler(m))
    return _LAST[1].label(image, caption, conversations=conversations, id=id)


def decode_mask(region_or_rle: Mapping) -> "Any":
    """A region's mask (``region`` or its ``mask_rle``) as an ``(H, W)`` bool numpy array."""
    from stages.record import rle

    return rle.decode(region_or_rle.get("mask_rle", region_or_rle))
