"""The LLM judge's reply: one pydantic model that validates it and gives the JSON schema sent.

A valid reply is a JSON object (a surrounding Markdown code fence is tolerated) that answers
every entity shown (``visual``) and every candidate shown (``accept`` + ``reason``), each
exactly once, with ids that were shown and the right types (strict: ``1`` is not ``true``,
``"3"`` is not an id). Keys the schema does not name are ignored. Anything else is a
:class:`ReplyError` whose ``kind`` is ``empty_reply``, ``malformed_json`` or ``invalid_reply``.
"""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_REASON_CHARS = 200


class ReplyError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _Part(BaseModel):
    # strict types; unknown keys are ignored when reading but not offered in the schema
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"additionalProperties": False})


class CandidateAnswer(_Part):
    id: int
    accept: bool
    reason: str

    @field_validator("reason")
    @classmethod
    def _one_short_line(cls, value: str) -> str:
        return " ".join(value.split())[:MAX_REASON_CHARS]


class EntityAnswer(_Part):
    id: int
    visual: bool
    candidates: list[CandidateAnswer]


class Reply(_Part):
    """The whole reply. Validated with ``context={"shown": {entity id: [candidate ids]}}`` it
    also checks the ids: shown ids only, every entity and candidate answered exactly once."""

    entities: list[EntityAnswer]

    @model_validator(mode="after")
    def _answers_what_was_shown(self, info: ValidationInfo) -> Reply:
        shown = (info.context or {}).get("shown")
        if shown is None:
            return self
        seen_entities: set[int] = set()
        seen: set[int] = set()
        for entity in self.entities:
            if entity.id not in shown:
                _invalid(f"unknown entity id {entity.id}")
            if entity.id in seen_entities:
                _invalid(f"entity {entity.id} answered twice")
            seen_entities.add(entity.id)
            for cand in entity.candidates:
                if cand.id not in shown[entity.id]:
                    _invalid(f"unknown candidate id {cand.id} for entity {entity.id}")
                if cand.id in seen:
                    _invalid(f"candidate {cand.id} answered twice")
                seen.add(cand.id)
        missing_entities = sorted(set(shown) - seen_entities)
        if missing_entities:
            _invalid(f"entities not answered: {missing_entities}")
        missing = sorted(rid for ids in shown.values() for rid in ids if rid not in seen)
        if missing:
            _invalid(f"candidates not answered: {missing}")
        return self


def _invalid(detail: str):
    raise PydanticCustomError("invalid_reply", "{detail}", {"detail": detail})


def parse_reply(text: str | None, shown: dict[int, list[int]]) -> dict[int, dict]:
    """Validate a reply: ``{region id: {"accept", "reason", "visual"}}`` or :class:`ReplyError`."""
    if text is None or not text.strip():
        raise ReplyError("empty_reply", "no content")
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ReplyError("malformed_json", f"{exc.msg} at char {exc.pos}") from None
    try:
        reply = Reply.model_validate(data, context={"shown": shown})
    except ValidationError as exc:
        error = exc.errors()[0]
        try:
            detail = _describe(error, data)
        except (KeyError, IndexError, TypeError):
            detail = f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
        raise ReplyError("invalid_reply", detail) from None
    return {cand.id: {"accept": cand.accept, "reason": cand.reason, "visual": entity.visual}
            for entity in reply.entities for cand in entity.candidates}


def _describe(error: dict, data) -> str:
    """The first validation error in the words of the reply: which entity or candidate, what is wrong."""
    if error["type"] == "invalid_reply":
        return error["ctx"]["detail"]
    loc = error["loc"]
    if len(loc) < 2:
        return "expected an object with an 'entities' list"
    entity = data["entities"][loc[1]]
    if len(loc) == 2 or loc[2] == "id":
        return "entity without an integer id"
    eid = entity["id"]
    if loc[2] == "visual":
        return f"entity {eid}: 'visual' is not true/false"
    if len(loc) == 3:
        return f"entity {eid}: no 'candidates' list"
    if len(loc) == 4 or loc[4] == "id":
        return f"entity {eid}: candidate without an integer id"
    rid = entity["candidates"][loc[3]]["id"]
    what = "is not true/false" if loc[4] == "accept" else "is not a string"
    return f"candidate {rid}: '{loc[4]}' {what}"


@lru_cache(maxsize=1)
def _base_schema() -> dict:
    schema = Reply.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if k not in ("title", "description")}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def reply_schema(shown: dict[int, list[int]]) -> dict:
    """JSON schema of a valid reply for this sample: :class:`Reply`'s, self-contained (no
    ``$ref``, which not every server's guided decoding follows), ids restricted to the ones shown."""
    schema = copy.deepcopy(_base_schema())
    entity = schema["properties"]["entities"]["items"]
    entity["properties"]["id"]["enum"] = sorted(shown)
    candidate = entity["properties"]["candidates"]["items"]
    candidate["properties"]["id"]["enum"] = sorted({rid for ids in shown.values() for rid in ids})
    return schema
