"""What the LLM judge is shown: the versioned prompt template and the sample as JSON.

A template is ``prompts/NAME.md`` with a ``## system`` and a ``## user`` part; the user part
holds ``{{payload}}`` once, replaced by the sample (caption or assistant turns, every entity that
has candidates, and per candidate its id, normalised box, position words, detector score and
mask share) as canonical JSON with ``<``/``>`` escaped.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from stages.record import entity_text, is_caption_turn

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"


@dataclass(frozen=True)
class Prompt:
    name: str
    hash: str
    system: str
    user: str

    def render(self, payload_json: str) -> tuple[str, str]:
        # one replace on the fixed template: text inside the payload is never substituted again
        return self.system, self.user.replace("{{payload}}", payload_json, 1)


def load_prompt(name: str) -> Prompt:
    """``judge.v1`` -> ``prompts/judge.v1.md`` (or a path to a ``.md`` file)."""
    path = Path(name)
    if not (path.suffix == ".md" and path.is_file()):
        path = PROMPTS_DIR / f"{name}.md"
    if not path.is_file():
        raise FileNotFoundError(f"adjudicate.prompt: no prompt template {name!r} (looked for {path})")
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^## (system|user)[ \t]*$", text, flags=re.M)
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}
    if set(sections) != {"system", "user"} or sections["user"].count("{{payload}}") != 1:
        raise ValueError(f"prompt template {path} needs a '## system' and a '## user' part, "
                         "the user part with {{payload}} exactly once")
    return Prompt(name=path.stem, hash=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
                  system=sections["system"].strip(), user=sections["user"].strip())


def position_words(box_norm: list[float]) -> str:
    x0, y0, x1, y1 = box_norm
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    where = "center" if (horizontal, vertical) == ("center", "middle") else f"{vertical} {horizontal}"
    share = max(x1 - x0, 0) * max(y1 - y0, 0)
    size = ("tiny" if share < 0.01 else "small" if share < 0.1 else "medium" if share < 0.4
            else "large" if share < 0.8 else "almost the whole image")
    return f"{where}, {size}"


def build_payload(record: dict, region_ids: list[int]) -> tuple[dict, dict[int, list[int]]]:
    """The sample as shown to the judge, and ``{entity id: [candidate ids]}`` that were shown."""
    width, height = record["image"]["width"], record["image"]["height"]
    wanted = set(region_ids)
    entities = {e["id"]: e for e in record["entities"]}
    shown: dict[int, list[int]] = {}
    for region in record["regions"]:
        if region["id"] in wanted:
            shown.setdefault(region["entity"], []).append(region["id"])
    regions = {r["id"]: r for r in record["regions"]}
    def turn_of(entity_id: int):  # None for the single caption (turn -1, or null in schema 1)
        turn = entities[entity_id].get("turn")
        return None if is_caption_turn(turn) else turn

    turns = sorted({turn_of(e) for e in shown}, key=lambda t: -1 if t is None else t)
    payload: dict = {}
    if turns == [None]:
        payload["caption"] = record["text"]["caption"]
    else:
        payload["turns"] = {str(t): entity_text(record, entities[next(e for e in shown if turn_of(e) == t)])
                            for t in turns}
    payload["entities"] = []
    for entity_id in sorted(shown):
        entity = entities[entity_id]
        item = {"id": entity_id, "phrase": entity["phrase"], "plural": bool(entity.get("plural"))}
        if turn_of(entity_id) is not None:
            item["turn"] = entity["turn"]
        expression = (entity.get("expression") or {}).get("text")
        if expression and expression != entity["phrase"]:
            item["expression"] = expression
        item["candidates"] = []
        for rid in shown[entity_id]:
            region = regions[rid]
            x0, y0, x1, y1 = region["box_xyxy"]
            box = [round(x0 / width, 3), round(y0 / height, 3), round(x1 / width, 3), round(y1 / height, 3)]
            item["candidates"].append({
                "id": rid, "box": box, "position": position_words(box),
                "det_score": round(float(region["det_score"]), 3),
                "mask_share": round(float(region.get("area") or 0) / max(width * height, 1), 4),
            })
        payload["entities"].append(item)
    return payload, shown


def payload_json(payload: dict) -> str:
    """Canonical JSON of the payload; ``<``/``>`` escaped so a caption cannot close ``<data>``."""
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e")
