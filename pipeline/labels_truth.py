"""Gold labels for ``lookandlearn evaluate labels``: the truth file, and a converter from COCO-style
instance annotations.

The truth file is JSONL, one line per input (blank lines and ``#`` comments allowed)::

    {"id": "scene-01", "entities": [
        {"turn": null, "start": 0, "end": 12, "phrase": "a red circle", "mask": {"size": [480, 640], "counts": "..."}},
        {"turn": null, "start": 19, "end": 37, "phrase": "a small blue square", "mask": null}]}

``id`` is the input's id (the record's ``source.id``) or the sample key; ``turn`` is null (or -1)
for a caption, else the conversation turn the offsets index into; ``start``/``end``/``phrase`` the
noun phrase; ``mask`` the COCO RLE (at the stored image's size) of the union of the instances the
phrase names, or null when it names nothing in the image.

:func:`coco_truth` writes such lines from COCO instance annotations (``instances_*.json``: images
with ``height``/``width``, annotations with ``segmentation`` as polygons or RLE) and a *links* file
that ties each phrase to the annotation ids it names (JSONL, one line per input)::

    {"id": "391895", "image_id": 391895, "entities": [
        {"turn": null, "start": 0, "end": 5, "phrase": "A man", "annotations": [2040147]}]}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.evaluate_judge import LabelError


class TruthError(LabelError):
    """A truth or links file that cannot be used (exit code 2)."""


class _Mask(BaseModel):
    model_config = ConfigDict(extra="ignore")
    size: list[int] = Field(min_length=2, max_length=2)
    counts: str


class TruthEntity(BaseModel):
    model_config = ConfigDict(extra="ignore")
    turn: int | None = None
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    phrase: str
    mask: _Mask | None

    @field_validator("turn")
    @classmethod
    def _caption(cls, v):        # -1: the caption (a sentinel some writers use instead of null)
        if v is not None and v < -1:
            raise ValueError("turn must be null, -1 (the caption) or a turn index >= 0")
        return None if v == -1 else v


class TruthLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | int
    entities: list[TruthEntity]


class _Link(BaseModel):
    model_config = ConfigDict(extra="ignore")
    turn: int | None = None
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    phrase: str
    annotations: list[int]


class _LinkLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | int
    image_id: int | None = None
    entities: list[_Link]


def _json_lines(path: Path, what: str) -> Iterator[tuple[int, object]]:
    if not path.is_file():
        raise TruthError(f"{what}: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TruthError(f"{what}: {path} is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise TruthError(f"{path}:{number}: not JSON ({exc.msg})") from None


def _where(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"field {'.'.join(str(p) for p in err['loc']) or '(line)'}: {err['msg']}"


def read_truth(path: str | Path) -> dict[str, list[TruthEntity]]:
    """``{id: [entity, ...]}`` of a truth file; TruthError (exit 2) naming the line and field."""
    path = Path(path)
    truth: dict[str, list[TruthEntity]] = {}
    for number, item in _json_lines(path, "--truth"):
        try:
            line = TruthLine.model_validate(item)
        except ValidationError as exc:
            raise TruthError(f"{path}:{number}: {_where(exc)}") from None
        ident = str(line.id)
        if ident in truth:
            raise TruthError(f"{path}:{number}: id {ident!r} appears twice")
        for k, e in enumerate(line.entities):
            if e.end <= e.start:
                raise TruthError(f"{path}:{number}: field entities.{k}: end ({e.end}) must be after start ({e.start})")
        truth[ident] = line.entities
    if not truth:
        raise TruthError(f"{path}: no truth lines")
    return truth


def coco_truth(instances: str | Path, links: str | Path) -> list[dict]:
    """Truth lines from COCO instance annotations and a links file (module docstring)."""
    from stages.record import rle

    instances, links = Path(instances), Path(links)
    try:
        coco = json.loads(instances.read_text(encoding="utf-8"))
        images = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in coco["images"]}
        anns = {int(a["id"]): a for a in coco["annotations"]}
    except FileNotFoundError:
        raise TruthError(f"instances: no such file: {instances}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TruthError(f"{instances}: not COCO instance annotations (images with id/height/width, "
                         f"annotations with id/image_id/segmentation): {type(exc).__name__}: {exc}") from None
    out = []
    for number, item in _json_lines(links, "--links"):
        try:
            line = _LinkLine.model_validate(item)
        except ValidationError as exc:
            raise TruthError(f"{links}:{number}: {_where(exc)}") from None
        image_id = line.image_id if line.image_id is not None else line.id
        try:
            height, width = images[int(image_id)]
        except (KeyError, ValueError):
            raise TruthError(f"{links}:{number}: image {image_id!r} is not in {instances}") from None
        entities = []
        for e in line.entities:
            masks = []
            for ann_id in e.annotations:
                ann = anns.get(ann_id)
                if ann is None or int(ann.get("image_id", -1)) != int(image_id):
                    raise TruthError(f"{links}:{number}: annotation {ann_id} is not an annotation of image {image_id}")
                masks.append(rle.decode(rle.from_coco(ann["segmentation"], height, width)))
            mask = None
            if masks:
                union = masks[0]
                for m in masks[1:]:
                    union = union | m
                mask = rle.encode(union[None])[0]
            entities.append({"turn": e.turn, "start": e.start, "end": e.end, "phrase": e.phrase, "mask": mask})
        out.append({"id": line.id, "entities": entities})
    return out


def write_truth(lines: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return path
