"""GroundingDINO prompts from phrases, and boxes per phrase from its outputs (pure functions).

Per sample the distinct (normalised) phrases of the candidate entities form GroundingDINO
prompts ``"a man . a red helmet ."``; a sample whose phrases do not fit in the token limit gets
several prompts, each phrase in exactly one of them (:func:`build_prompts`). Predictions are
tied back to phrases by **token positions**: the token range of each phrase is known from the
tokenizer's offsets for the prompt built here, a query's score for a phrase is the max sigmoid
logit over that range, and a query becomes a box of the phrase when that score is >=
``text_threshold`` and the query's max score (over all prompt tokens, as in GroundingDINO) is >=
``box_threshold`` (:func:`phrase_scores`). Decoded label strings are never compared. Boxes are
scaled to the stored image, clipped, degenerate ones dropped, then per-phrase NMS and the top
``max_boxes_per_phrase`` by score (:func:`select_boxes`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

MIN_BOX_SIDE = 1.0  # pixels; narrower/shorter boxes (after clipping) are degenerate
# At most this many candidate boxes per phrase enter NMS (best scores first): with a low
# threshold every one of GroundingDINO's 900 queries is a candidate, and NMS is quadratic.
PRE_NMS_TOP_K = 300

# GroundingDINO treats '.' and '?' as phrase delimiters (its SPECIAL_TOKENS), so they cannot
# appear inside a phrase.
_DELIMS = re.compile(r"[.?]+")
_SPACE = re.compile(r"\s+")


def normalize_phrase(phrase: str) -> str:
    """Prompt text of a phrase: lower case, GroundingDINO delimiters removed, whitespace collapsed."""
    return _SPACE.sub(" ", _DELIMS.sub(" ", str(phrase).lower())).strip()


@dataclass(frozen=True)
class Prompt:
    """One GroundingDINO text prompt.

    ``keys``: the normalised phrases it holds, in order; ``spans``: for each key, the token
    index range ``[start, end)`` of that phrase in ``tokenizer(text)`` (special tokens included
    in the indexing, so index 0 is ``[CLS]``); ``n_tokens``: length of the tokenized prompt.
    """

    text: str
    keys: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    n_tokens: int


def _token_spans(tokenizer, text: str, char_spans: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    spans = []
    for c0, c1 in char_spans:
        idx = [t for t, (s, e) in enumerate(offsets) if e > s and s >= c0 and e <= c1]
        spans.append((idx[0], idx[-1] + 1) if idx else (0, 0))
    return spans, len(enc["input_ids"])


def build_prompts(keys: Sequence[str], tokenizer, max_tokens: int) -> list[Prompt]:
    """Pack distinct normalised phrases into as few prompts of at most ``max_tokens`` tokens
    (``[CLS]``/``[SEP]`` and the ``.`` after each phrase included) as greedy order allows.

    Every phrase that has at least one token lands in exactly one prompt; a phrase too long
    for a prompt of its own is cut to its first ``max_tokens - 3`` tokens.
    """
    if max_tokens < 4:
        raise ValueError(f"max_tokens must be at least 4, got {max_tokens}")
    pieces: list[tuple[str, str, int]] = []  # (key, text used in the prompt, n tokens)
    seen: set[str] = set()
    for key in keys:
        if not key or key in seen:
            continue
        seen.add(key)
        enc = tokenizer(key, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        if n == 0:
            continue
        text = key
        if n + 3 > max_tokens:
            n = max_tokens - 3
            text = key[: enc["offset_mapping"][n - 1][1]]
        pieces.append((key, text, n))

    groups: list[list[tuple[str, str, int]]] = []
    used = max_tokens + 1
    for piece in pieces:
        cost = piece[2] + 1  # the phrase and its " ."
        if used + cost > max_tokens:
            groups.append([])
            used = 2  # [CLS] ... [SEP]
        groups[-1].append(piece)
        used += cost

    prompts = []
    for group in groups:
        parts, char_spans, pos = [], [], 0
        for _, text, _ in group:
            char_spans.append((pos, pos + len(text)))
            parts.append(text)
            pos += len(text) + 3  # " . "
        text = " . ".join(parts) + " ."
        spans, n_tokens = _token_spans(tokenizer, text, char_spans)
        if n_tokens > max_tokens:  # wordpiece is compositional across " . ": should not happen
            raise RuntimeError(f"prompt of {n_tokens} tokens exceeds the limit {max_tokens}: {text!r}")
        prompts.append(Prompt(text=text, keys=tuple(k for k, _, _ in group), spans=tuple(spans),
                              n_tokens=n_tokens))
    return prompts


def phrase_scores(logits: torch.Tensor, spans: Sequence[tuple[int, int]],
                  box_threshold: float, text_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tie queries to phrases by token positions.

    ``logits``: (num_queries, num_text_tokens) raw GroundingDINO logits of one prompt (padding
    positions may be ``-inf``); ``spans``: token range ``[start, end)`` of each phrase.
    Returns ``(keep, scores)``, both (num_queries, num_phrases): ``scores[q, p]`` is the max
    sigmoid over phrase p's tokens; ``keep[q, p]`` is ``scores[q, p] >= text_threshold`` and the
    query's max sigmoid over all tokens ``>= box_threshold``. A phrase with an empty span is never kept.
    """
    probs = logits.float().sigmoid()
    num_queries = probs.shape[0]
    scores = torch.zeros((num_queries, len(spans)), dtype=probs.dtype, device=probs.device)
    valid = torch.zeros(len(spans), dtype=torch.bool, device=probs.device)
    for p, (start, end) in enumerate(spans):
        if end > start:
            scores[:, p] = probs[:, start:end].amax(dim=-1)
            valid[p] = True
    query_max = probs.amax(dim=-1) if probs.shape[-1] else torch.zeros(num_queries, device=probs.device)
    keep = (scores >= text_threshold) & (query_max >= box_threshold)[:, None] & valid[None, :]
    return keep, scores


def batch_phrase_scores(logits: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]],
                        box_threshold: float, text_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`phrase_scores` for a batch of prompts at once, on the logits' device (same values):
    ``logits`` (B, num_queries, num_text_tokens), ``spans[b]`` the phrase spans of prompt b. Returns
    ``(keep, scores)`` of shape (B, num_queries, max phrases); columns past a prompt's own phrases
    are never kept. Only these small tensors need to reach the host, not the logits."""
    probs = logits.float().sigmoid()
    n_b, n_q, n_t = probs.shape
    n_p = max((len(s) for s in spans), default=0)
    masks = torch.zeros((n_p, n_b, n_t), dtype=torch.bool)
    valid = torch.zeros((n_b, n_p), dtype=torch.bool)
    for b, row in enumerate(spans):
        for p, (start, end) in enumerate(row):
            if end > start:
                masks[p, b, start:end] = True
                valid[b, p] = True
    if probs.device.type == "cuda":
        masks = masks.pin_memory().to(probs.device, non_blocking=True)
        valid = valid.pin_memory().to(probs.device, non_blocking=True)
    scores = torch.zeros((n_b, n_q, n_p), dtype=probs.dtype, device=probs.device)
    for p in range(n_p):  # sigmoids are >= 0: the max over a span is the max of the masked row
        scores[:, :, p] = torch.where(masks[p][:, None, :], probs, 0.0).amax(dim=-1)
    query_max = probs.amax(dim=-1) if n_t else torch.zeros((n_b, n_q), device=probs.device)
    keep = (scores >= text_threshold) & (query_max >= box_threshold)[:, :, None] & valid[:, None, :]
    return keep, scores


def cxcywh_to_xyxy(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> absolute (x0, y0, x1, y1) pixels of a width x height image."""
    cx, cy, w, h = boxes.float().unbind(-1)
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return out * torch.tensor([width, height, width, height], dtype=out.dtype, device=out.device)


def select_boxes(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, width: int, height: int,
                 nms_iou: float, max_per_label: int, min_side: float = MIN_BOX_SIDE) -> torch.Tensor:
    """Indices of the boxes to keep: clip into the image, drop degenerate (side < ``min_side``) and
    non-finite boxes, per-label NMS (``torchvision.ops.batched_nms``), then the top
    ``max_per_label`` of each label by score. Returned in (label, descending score) order.
    ``boxes`` are modified in place by the clipping (pass a copy to keep the input).
    """
    from torchvision.ops import batched_nms

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    ok = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    ok &= (boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side)
    idx = ok.nonzero().flatten()
    if idx.numel() == 0:
        return idx
    if idx.numel() > PRE_NMS_TOP_K:
        capped = []
        for label in torch.unique(labels[idx]).tolist():
            mine = idx[labels[idx] == label]
            if mine.numel() > PRE_NMS_TOP_K:
                order = torch.argsort(scores[mine], descending=True, stable=True)
                mine = mine[order[:PRE_NMS_TOP_K]].sort().values
            capped.append(mine)
        idx = torch.cat(capped).sort().values
    kept = idx[batched_nms(boxes[idx].float(), scores[idx].float(), labels[idx], nms_iou)]
    out = []
    for label in sorted(set(labels[kept].tolist())):
        mine = kept[labels[kept] == label]
        order = torch.argsort(scores[mine], descending=True, stable=True)
        out.append(mine[order][:max_per_label])
    return torch.cat(out) if out else kept


__all__ = ["Prompt", "normalize_phrase", "build_prompts", "phrase_scores", "batch_phrase_scores",
           "cxcywh_to_xyxy", "select_boxes", "MIN_BOX_SIDE", "PRE_NMS_TOP_K"]
