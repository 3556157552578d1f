"""Shards (docs/schema.md) -> training examples and batches for a VLM family.

* A caption becomes ``[user: <image> + instruction, assistant: caption]`` (instruction
  configurable); a list of captions (``text.captions``) the same exchange once per caption, in
  one example; instruction conversations are used as they are (the first human turn's
  ``<image>`` placeholder becomes the image slot).
* The text is what the processor's chat template produces. Entity character spans (offsets into
  the text of ``turn``: -1 the caption, else the index into ``captions`` or ``conversations``)
  are located in that exact text and become token spans via the tokenizer's offset mapping; the
  processor's own ``input_ids`` (image placeholders expanded) are aligned with that
  tokenisation, so nothing is re-derived by hand.
* Labels are -100 everywhere except the assistant answers (and the end-of-turn token after each).
* Each grounded entity's mask (union of accepted regions, COCO RLE) goes through the family's
  geometry (``stages.train.geometry``) onto the image-token grid.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from stages import record as rec
from stages.record import rle, shards
from stages.train.geometry import geometry_for

DEFAULT_INSTRUCTION = "Describe the image briefly."
IMAGE_TOKENS = {"llava": "<image>", "llava_next": "<image>", "qwen2_vl": "<|image_pad|>"}


# --------------------------------------------------------------------------- shards
def iter_shard_samples(paths: Iterable[str | Path]) -> Iterator[dict]:
    """Yield ``{"key", "image": bytes, "ext", "record": dict}`` from the shards, in order."""
    for record, image, ext in shards.iter_records(paths, images=True):
        if image is None:
            raise ValueError(f"sample {record.get('key')}: needs an image and a .json")
        yield {"key": record["key"], "image": image, "ext": ext, "record": record}


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def entity_mask(record: dict, entity: dict) -> np.ndarray | None:
    """Union of the entity's accepted regions' masks (None when it has none)."""
    h, w = record["image"]["height"], record["image"]["width"]
    out = None
    for region in rec.accepted_regions(record, entity):
        if region.get("mask_rle") is None:
            continue
        m = rle.decode(region["mask_rle"])
        if m.shape != (h, w):
            raise ValueError(f"mask size {m.shape} != image ({h}, {w})")
        out = m if out is None else (out | m)
    return out


# --------------------------------------------------------------------------- examples
@dataclass
class DataConfig:
    family: str
    instruction: str = DEFAULT_INSTRUCTION
    query: str = "phrase"         # phrase: the phrase's own tokens; predict: one token to the left
    max_length: int = 2048


def _strip_image_tag(value: str) -> str:
    """The image turn's text as the chat message carries it: the LLaVA ``<image>`` tag dropped
    (the image is a content item of its own)."""
    return value.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")


def _templated_offset(record: dict, ent: dict, turn_text: str, offset: int) -> int:
    """Where character ``offset`` of the entity's stored turn text falls in ``turn_text``, the
    text the template got: offsets count the ``<image>`` tag (docs/schema.md), the template
    does not (the tag never lies inside a phrase, so the characters removed before ``offset``
    are the shift)."""
    stored = rec.entity_text(record, ent)
    if stored == turn_text:
        return offset
    return len(_strip_image_tag(stored[:offset]))


def _messages(record: dict, instruction: str) -> tuple[list[dict], list[str], dict[int, int]]:
    """Chat messages, the plain text of each message (entity offsets index these texts), and
    ``{entity turn: message index}``: a conversation's turns are its messages; a caption (turn
    -1) is the answer to ``instruction``; a list of captions (``text.captions``) is the same
    question asked again before each caption, caption ``i`` the answer in message ``2 i + 1``."""
    text = record["text"]
    if isinstance(text.get("captions"), list) and not text.get("conversations"):
        msgs, turns, where = [], [], {}
        for i, caption in enumerate(text["captions"]):
            ask = [{"type": "text", "text": instruction}]
            msgs.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + ask})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
            turns += [instruction, caption]
            where[i] = 2 * i + 1
        return msgs, turns, where
    if text.get("conversations"):
        msgs, turns = [], []
        image_done = False
        for turn in text["conversations"]:
            who = rec.speaker(turn)
            role = "assistant" if who in rec.ASSISTANT_ROLES else "system" if who == "system" else "user"
            value = turn["value"]
            content = []
            if role == "user" and not image_done:
                content.append({"type": "image"})
                image_done = True
                value = _strip_image_tag(value)
            content.append({"type": "text", "text": value})
            msgs.append({"role": role, "content": content})
            turns.append(value)
        return msgs, turns, {i: i for i in range(len(turns))}
    caption = text["caption"]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
    return msgs, [instruction, caption], {rec.CAPTION_TURN: 1}


def build_example(sample: dict, processor, cfg: DataConfig, image: np.ndarray | None = None) -> dict | None:
    """One training example (tensors without batch dim + entity targets), or None when the text
    does not fit ``max_length``."""
    record = sample["record"]
    if image is None:
        image = decode_image(sample["image"])
    msgs, turns, where = _messages(record, cfg.instruction)
    text = processor.apply_chat_template(msgs, tokenize=False)
    # where each turn's text sits in the templated text
    starts, cursor = [], 0
    for t in turns:
        pos = text.find(t, cursor)
        if pos < 0:
            raise ValueError(f"{record['key']}: turn text not found in the chat template output")
        starts.append(pos)
        cursor = pos + len(t)
    roles = [m["role"] for m in msgs]
    tok = processor.tokenizer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    out = processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)
    full_ids = out["input_ids"][0]
    if full_ids.shape[0] > cfg.max_length:
        return None
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKENS[cfg.family])
    # align: the processor's ids are the plain tokenisation with image-token runs expanded
    pos_map, j = [], 0
    full = full_ids.tolist()
    for t in ids:
        if j >= len(full) or full[j] != t:
            raise ValueError(f"{record['key']}: processor ids do not match the tokenizer's")
        pos_map.append(j)
        j += 1
        if t == image_id:
            while j < len(full) and full[j] == image_id:
                j += 1
    if j != len(full):
        raise ValueError(f"{record['key']}: trailing processor ids")
    # labels: assistant answers (+ the token right after, end of turn)
    labels = torch.full_like(full_ids, -100)
    for turn_i, (role, t) in enumerate(zip(roles, turns)):
        if role != "assistant":
            continue
        a, b = starts[turn_i], starts[turn_i] + len(t)
        idx = [k for k, (s, e) in enumerate(offsets) if e > a and s < b]
        if idx:
            idx.append(idx[-1] + 1) if idx[-1] + 1 < len(ids) else None
            for k in idx:
                labels[pos_map[k]] = full_ids[pos_map[k]]
    h, w = image.shape[:2]
    geo = geometry_for(cfg.family, processor, h, w)
    img_pos = (full_ids == image_id).nonzero().flatten()
    img_pos = img_pos[: geo.n_tokens]  # LLaVA-NeXT: the base grid comes first
    if img_pos.numel() != geo.n_tokens:
        raise ValueError(f"{record['key']}: {img_pos.numel()} image tokens, geometry expects {geo.n_tokens}")
    entities = []
    for ent in record.get("entities", []):
        if ent.get("status") != "grounded":
            continue
        mask = entity_mask(record, ent)
        if mask is None or not mask.any():
            continue
        turn = ent.get("turn")
        turn_i = where.get(rec.CAPTION_TURN if rec.is_caption_turn(turn) else int(turn))
        if turn_i is None:
            raise ValueError(f"{record['key']}: entity {ent.get('id')} has turn {turn}, not a text of the sample")
        a = starts[turn_i] + _templated_offset(record, ent, turns[turn_i], ent["start"])
        b = starts[turn_i] + _templated_offset(record, ent, turns[turn_i], ent["end"])
        toks = [pos_map[k] for k, (s, e) in enumerate(offsets) if e > a and s < b and e > s]
        if cfg.query == "predict":
            toks = [p - 1 for p in toks]
        if not toks:
            continue
        entities.append({"phrase": ent["phrase"], "queries": toks,
                         "target": torch.from_numpy(geo.mask_to_grid(mask).reshape(-1))})
    ex = {k: v[0] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in out.items()}
    ex.pop("mm_token_type_ids", None) if cfg.family != "qwen2_vl" else None
    ex["labels"] = labels
    ex["image_positions"] = img_pos
    ex["entities"] = entities
    ex["geometry"] = geo
    ex["key"] = record.get("key", sample.get("key"))
    return ex


# --------------------------------------------------------------------------- batches
class Collator:
    """Pads a list of examples into a model batch plus the where-to-look tensors:

    ``wtl_q_index`` (B, Q) query positions (-1 pad), ``wtl_v_index`` (B, V) image-token positions
    (-1 pad), ``wtl_ent_sample`` (E,), ``wtl_ent_qmask`` (E, Q) float weights (1/|T_e| on the
    entity's query columns), ``wtl_target`` (E, V) area-averaged masks (0 on padding).
    """

    def __init__(self, pad_token_id: int, family: str, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.family = family
        self.padding_side = padding_side

    def _pad(self, seqs, value):
        n = max(s.shape[0] for s in seqs)
        out = torch.full((len(seqs), n), value, dtype=seqs[0].dtype)
        for i, s in enumerate(seqs):
            if self.padding_side == "right":
                out[i, : s.shape[0]] = s
            else:
                out[i, n - s.shape[0]:] = s
        return out

    def __call__(self, examples: list[dict]) -> dict:
        batch = {
            "input_ids": self._pad([e["input_ids"] for e in examples], self.pad_token_id),
            "attention_mask": self._pad([e["attention_mask"] for e in examples], 0),
            "labels": self._pad([e["labels"] for e in examples], -100),
        }
        if "mm_token_type_ids" in examples[0]:
            batch["mm_token_type_ids"] = self._pad([e["mm_token_type_ids"] for e in examples], 0)
        if self.family == "qwen2_vl":
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in examples])
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in examples])
        elif self.family == "llava_next":
            n = max(e["pixel_values"].shape[1] for e in examples)
            pv = [torch.nn.functional.pad(e["pixel_values"], (0, 0, 0, 0, 0, 0, 0, n - e["pixel_values"].shape[1]))
                  for e in examples]
            batch["pixel_values"] = torch.cat(pv)
            batch["image_sizes"] = torch.cat([e["image_sizes"] for e in examples])
        else:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in examples])
        shift = [batch["input_ids"].shape[1] - e["input_ids"].shape[0] if self.padding_side == "left" else 0
                 for e in examples]
        queries = [sorted({q for ent in e["entities"] for q in ent["queries"]}) for e in examples]
        n_q = max([len(q) for q in queries] + [1])
        n_v = max(e["image_positions"].numel() for e in examples)
        q_index = torch.full((len(examples), n_q), -1, dtype=torch.long)
        v_index = torch.full((len(examples), n_v), -1, dtype=torch.long)
        ent_sample, ent_qmask, target = [], [], []
        for b, e in enumerate(examples):
            col = {q: i for i, q in enumerate(queries[b])}
            if queries[b]:
                q_index[b, : len(queries[b])] = torch.tensor(queries[b]) + shift[b]
            v_index[b, : e["image_positions"].numel()] = e["image_positions"] + shift[b]
            for ent in e["entities"]:
                w = torch.zeros(n_q)
                for q in ent["queries"]:
                    w[col[q]] = 1.0 / len(ent["queries"])
                t = torch.zeros(n_v)
                t[: ent["target"].numel()] = ent["target"]
                ent_sample.append(b)
                ent_qmask.append(w)
                target.append(t)
        batch["wtl_q_index"] = q_index
        batch["wtl_v_index"] = v_index
        batch["wtl_ent_sample"] = torch.tensor(ent_sample, dtype=torch.long)
        batch["wtl_ent_qmask"] = torch.stack(ent_qmask) if ent_qmask else torch.zeros(0, n_q)
        batch["wtl_target"] = torch.stack(target) if target else torch.zeros(0, n_v)
        return batch


WTL_KEYS = ("wtl_q_index", "wtl_v_index", "wtl_ent_sample", "wtl_ent_qmask", "wtl_target")


class ShardDataset(torch.utils.data.Dataset):
    """All samples of the shards, prepared eagerly (the sample and test sets are small; a
    streaming IterableDataset over the same ``build_example`` is the path for large builds)."""

    def __init__(self, paths, processor, cfg: DataConfig, limit: int | None = None):
        self.examples = []
        self.skipped = 0
        for sample in iter_shard_samples(paths):
            if limit is not None and len(self.examples) >= limit:
                break
            ex = build_example(sample, processor, cfg)
            if ex is None:
                self.skipped += 1
                continue
            ex.pop("geometry")
            self.examples.append(ex)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
