"""The declared types of a shard sample, as the ``dataset_info.features`` of a Hugging Face
dataset card (the YAML list ``datasets.Features._to_yaml_list`` writes; no ``datasets`` import).

Every build writes the same schema whatever its input format (docs/schema.md): a caption build
and a conversation build load together with ``datasets.load_dataset("webdataset", ...,
features=...)``. ``source.meta`` is declared ``json`` (``datasets.Json``, datasets >= 4.7): its
fields differ from input to input. A field a record holds that is not declared here would be
dropped without a word by ``datasets``; ``tests/test_schema_union.py`` checks every record of
its builds against :func:`undeclared_fields`.
"""
from __future__ import annotations

from typing import Any

from stages.record.schema import IMAGE_EXTS


def _v(dtype: str) -> dict:
    return {"dtype": dtype}


def _list(item: Any) -> dict:
    """A list of ``item`` (a dtype dict, or a struct given as ``{name: type}``)."""
    if isinstance(item, dict) and "dtype" in item:
        return {"list": item["dtype"]}
    return {"list": _fields(item)}


def _struct(fields: dict) -> dict:
    return {"struct": _fields(fields)}


def _fields(fields: dict) -> list[dict]:
    return [{"name": name, **value} for name, value in fields.items()]


STRING, INT32, INT64, FLOAT64, BOOL, JSON = (_v("string"), _v("int32"), _v("int64"), _v("float64"),
                                             _v("bool"), _v("json"))

RECORD = {
    "key": STRING,
    "source": _struct({"dataset": STRING, "id": STRING, "annotation_id": STRING,
                       "annotation_ids": _list(STRING), "meta": JSON}),
    "image": _struct({"width": INT32, "height": INT32, "sha256": STRING, "original_mode": STRING,
                      "reencoded": STRING}),
    "text": _struct({"caption": STRING, "captions": _list(STRING),
                     "conversations": _list({"from": STRING, "role": STRING, "value": STRING})}),
    "entities": _list({
        "id": INT32, "phrase": STRING, "start": INT32, "end": INT32, "turn": INT32, "root": STRING,
        "plural": BOOL, "status": STRING, "regions": _list(INT32), "reason": STRING,
        "expression": _struct({"start": INT32, "end": INT32, "text": STRING}),
    }),
    "regions": _list({
        "id": INT32, "entity": INT32, "box_xyxy": _list(FLOAT64), "det_score": FLOAT64,
        "mask_rle": _struct({"size": _list(INT32), "counts": STRING}), "mask_score": FLOAT64,
        "area": INT64, "verdict": _struct({"accept": BOOL, "reason": STRING, "judge": STRING, "prompt": STRING}),
    }),
    "provenance": _struct({"schema": INT32, "pipeline": STRING, "parser": STRING, "detector": STRING,
                           "segmenter": STRING}),
}


def card_features(image_ext: str | None) -> list[dict]:
    """``dataset_info.features`` of a build whose images are ``.{image_ext}`` (``None``: a build
    with ``image.store_format: keep``, every image member declared)."""
    exts = [image_ext] if image_ext else [e for e in IMAGE_EXTS if e != "jpeg"]
    return _fields({"__key__": STRING, "__url__": STRING, **{ext: _v("image") for ext in exts},
                    "json": _struct(RECORD)})


def undeclared_fields(record: dict) -> list[str]:
    """Dotted paths of the fields of ``record`` that :data:`RECORD` does not declare (what
    ``datasets`` would drop). ``source.meta`` is JSON: anything goes inside it."""
    out: list[str] = []
    _walk(record, _struct(RECORD), "", out)
    return sorted(set(out))


def _walk(value: Any, spec: dict, path: str, out: list[str]) -> None:
    if value is None:
        return
    if "struct" in spec:
        if not isinstance(value, dict):
            out.append(f"{path} (not an object)")
            return
        declared = {f["name"]: f for f in spec["struct"]}
        for name, sub in value.items():
            where = f"{path}.{name}" if path else name
            if name not in declared:
                out.append(where)
            else:
                _walk(sub, declared[name], where, out)
    elif "list" in spec:
        if not isinstance(value, list):
            out.append(f"{path} (not a list)")
            return
        item = spec["list"]
        item_spec = {"struct": item} if isinstance(item, list) else {"dtype": item}
        for element in value:
            _walk(element, item_spec, f"{path}[]", out)
