"""ground: GroundingDINO boxes for every candidate entity (``status is None``) of a sample.

Per sample the distinct (normalised) phrases of the candidate entities form GroundingDINO
prompts ``"a man . a red helmet ."``; a sample whose phrases do not fit in
``detect.max_text_tokens`` (and never more than the model's ``max_text_len``) gets several
prompts, each phrase in exactly one of them. Predictions are tied back to phrases by **token
positions**: the token range of each phrase is known from the tokenizer's offsets for the
prompt built here, a query's score for a phrase is the max sigmoid logit over that range, and a
query becomes a box of the phrase when that score is >= ``text_threshold`` and the query's max
score (over all prompt tokens, as in GroundingDINO) is >= ``box_threshold``. Decoded label
strings are never compared. Boxes are scaled to the stored image (the ``pixels`` array), clipped,
degenerate ones dropped, then per-phrase NMS and the top ``max_boxes_per_phrase`` by score.

Each entity gets the boxes of its phrase text as regions
``{"id", "entity", "box_xyxy", "det_score"}`` where ``det_score`` is the phrase score.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from stages import record as rec
from stages.models import autocast, load_pretrained, model_ref, resolve_device, resolve_dtype
from stages.prep import ImagePrep

MIN_BOX_SIDE = 1.0  # pixels; narrower/shorter boxes (after clipping) are degenerate
# At most this many candidate boxes per phrase enter NMS (best scores first): with a low
# threshold every one of GroundingDINO's 900 queries is a candidate, and NMS is quadratic.
PRE_NMS_TOP_K = 300
# Column that CPU workers fill with the image already resized for GroundingDINO (uint8); see
# stages/prep.py. Without it the stage resizes itself, with the same result.
PREPARED_COLUMN = "det_pixels"

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


def rgb_pixels(pixels: Any) -> np.ndarray:
    """The ``pixels`` cell as an (H, W, 3) uint8 array."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"pixels must be a non-empty HxWx3 array, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _like(column: Any, values: list) -> Any:
    if isinstance(column, np.ndarray):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return values


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class BatchRows:
    """Copy-on-write access to the ``record``/``status``/``reason`` columns of a batch, shared by
    the model stages: rejected rows are skipped, a row whose ``pixels`` cannot be used is rejected
    (``status='rejected'``, ``reason='bad_pixels: ...'``) instead of failing the whole batch."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.n = rec.batch_len(batch)
        self.records = list(batch["record"])
        self.status = list(batch["status"]) if "status" in batch else None
        self.reason = list(batch["reason"]) if "reason" in batch else None
        self._rejected = False

    def ok(self, i: int) -> bool:
        return self.status is None or _text(self.status[i]) != rec.ROW_REJECTED

    def reject(self, i: int, reason: str) -> None:
        if self.status is None:
            raise ValueError(f"row {i}: {reason}")
        self.status[i] = rec.ROW_REJECTED
        if self.reason is not None:
            self.reason[i] = reason
        self.records[i] = self.batch["record"][i]
        self._rejected = True

    def pixels(self, i: int) -> np.ndarray | None:
        try:
            return rgb_pixels(self.batch["pixels"][i])
        except (KeyError, TypeError, ValueError) as exc:
            self.reject(i, f"bad_pixels: {exc}")
            return None

    def result(self) -> dict:
        out = dict(self.batch)
        out["record"] = _like(self.batch["record"], self.records)
        if self._rejected:
            out["status"] = _like(self.batch["status"], self.status)
            if self.reason is not None:
                out["reason"] = _like(self.batch["reason"], self.reason)
        return out


class _Pending:
    """GroundingDINO work issued to the device, not yet waited for (see ``GroundStage.launch``)."""

    def __init__(self, images, jobs_per_chunk, outputs, event):
        self.images = images
        self.chunks = jobs_per_chunk      # [[(image index, Prompt), ...], ...]
        self.outputs = outputs            # [(logits, boxes)] host tensors, filled asynchronously
        self.event = event                # CUDA event recorded after the last copy (None on CPU)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start an asynchronous copy of a device tensor into pinned host memory (no wait)."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class GroundStage:
    """GroundingDINO detection stage (see module docstring). ``setup()`` loads the model once.

    GPU path: the images arrive resized by CPU workers (``det_pixels``, stages/prep.py; resized
    here when absent), are copied through pinned memory without blocking and normalised on the
    device; GroundingDINO runs on batches of ``detect.batch_size`` prompts; all batches of a call
    are issued before the first wait, and their outputs come back in one asynchronous copy each.
    ``detect.batching``: ``bucket`` (default) batches only images of the same input size, so an
    image's boxes never depend on its batch-mates (the Swin backbone does not mask padding);
    ``pad`` batches in input order with zero padding (fewer, fuller batches on mixed sizes).
    """

    provenance_key = "detector"

    def __init__(self, detect, runtime):
        self.detect = detect
        self.runtime = runtime
        self.model = None
        self.processor = None
        self.prep: ImagePrep | None = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.max_tokens: int | None = None
        self.ref = model_ref(detect.model, detect.revision)

    # -- lifecycle ---------------------------------------------------------------------------
    def setup_processor(self) -> None:
        """Load only the processor (CPU workers that prepare images need nothing else)."""
        if self.processor is None:
            from transformers import AutoProcessor

            self.processor = load_pretrained(AutoProcessor, self.detect.model, self.detect.revision,
                                             field="detect.model")
        if self.prep is None:
            self.prep = ImagePrep(self.processor.image_processor, "gdino")

    def setup(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForZeroShotObjectDetection

        self.device = resolve_device(self.runtime.device)
        self.dtype = resolve_dtype(self.runtime.dtype, self.device)
        self.setup_processor()
        model = load_pretrained(AutoModelForZeroShotObjectDetection, self.detect.model, self.detect.revision,
                                field="detect.model")
        self.model = model.to(self.device).eval()
        limit = int(getattr(self.model.config, "max_text_len", 256))
        self.max_tokens = min(int(self.detect.max_text_tokens), limit)
        self.ref = model_ref(self.detect.model, self.detect.revision)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # -- inference ---------------------------------------------------------------------------
    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """CPU half of the image preprocessing: pixels resized to GroundingDINO's input size (uint8)."""
        self.setup_processor()
        return self.prep.resize(pixels)

    def _prepared(self, image: np.ndarray, given: Any) -> np.ndarray:
        want = self.prep.output_size(*image.shape[:2])
        if given is not None:
            arr = np.asarray(given)
            if arr.dtype == np.uint8 and arr.shape == (*want, 3):
                return arr
        return self.prep.resize(image)

    def _forward(self, inputs: list[np.ndarray], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One GroundingDINO pass over prepared (resized, uint8) images; outputs stay on the device."""
        pixel_values, pixel_mask = self.prep.upload(inputs, self.device)
        tok = self.tokenizer(texts, padding="longest", return_tensors="pt")
        pin = self.device.type == "cuda"
        feeds = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            if name in tok:
                t = tok[name].pin_memory() if pin else tok[name]
                feeds[name] = t.to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.model(**feeds)
        return out.logits.float(), out.pred_boxes.float()

    def launch(self, images: list[np.ndarray], keys_per_image: list[list[str]],
               prepared: list | None = None) -> _Pending:
        """Issue GroundingDINO for every prompt of every image; returns without waiting."""
        self.setup()
        cfg = self.detect
        inputs = [self._prepared(img, prepared[i] if prepared is not None else None)
                  for i, img in enumerate(images)]
        jobs: list[tuple[int, Prompt]] = []
        for i, keys in enumerate(keys_per_image):
            for prompt in build_prompts(keys, self.tokenizer, self.max_tokens):
                jobs.append((i, prompt))
        if getattr(cfg, "batching", "bucket") == "pad":
            groups = [jobs]
        else:
            # Batch only images of the same input size. GroundingDINO's Swin backbone sees the
            # zero padding of a mixed-size batch (nothing masks it), so an image's boxes would
            # depend on which other images share its batch: a resumed build could then differ
            # from an uninterrupted one. Same-size buckets need no padding (COCO's 640x480 and
            # 480x640 give two buckets).
            buckets: dict[tuple[int, int], list[tuple[int, Prompt]]] = {}
            for job in jobs:
                buckets.setdefault(tuple(inputs[job[0]].shape[:2]), []).append(job)
            groups = list(buckets.values())
        chunks = [group[s:s + cfg.batch_size] for group in groups for s in range(0, len(group), cfg.batch_size)]
        outputs = []
        for chunk in chunks:
            logits, boxes = self._forward([inputs[i] for i, _ in chunk], [p.text for _, p in chunk])
            keep, scores = batch_phrase_scores(logits, [p.spans for _, p in chunk], cfg.box_threshold,
                                               cfg.text_threshold)
            outputs.append((_to_host(keep), _to_host(scores), _to_host(boxes)))
        event = None
        if self.device.type == "cuda" and chunks:
            event = torch.cuda.Event()
            event.record()
        return _Pending(images, chunks, outputs, event)

    def finish(self, pending: _Pending) -> list[dict[str, list[tuple[list[float], float]]]]:
        """Wait for :meth:`launch`'s work (one wait) and turn it into boxes per phrase, on the host."""
        cfg = self.detect
        images = pending.images
        if pending.event is not None:
            pending.event.synchronize()
        found: list[list[tuple[torch.Tensor, torch.Tensor, str]]] = [[] for _ in images]
        for chunk, (keep_all, scores_all, boxes) in zip(pending.chunks, pending.outputs):
            for j, (i, prompt) in enumerate(chunk):
                keep, scores = keep_all[j], scores_all[j]
                height, width = images[i].shape[:2]
                xyxy = cxcywh_to_xyxy(boxes[j], width, height)
                for p, key in enumerate(prompt.keys):
                    q = keep[:, p].nonzero().flatten()
                    if q.numel():
                        found[i].append((xyxy[q], scores[q, p], key))
        results: list[dict[str, list[tuple[list[float], float]]]] = []
        for i, hits in enumerate(found):
            per_key: dict[str, list[tuple[list[float], float]]] = {}
            if hits:
                keys = sorted({k for _, _, k in hits}, key=[k for _, _, k in hits].index)
                label_of = {k: n for n, k in enumerate(keys)}
                all_boxes = torch.cat([b for b, _, _ in hits]).clone()
                all_scores = torch.cat([s for _, s, _ in hits])
                labels = torch.cat([torch.full((len(s),), label_of[k], dtype=torch.long) for _, s, k in hits])
                height, width = images[i].shape[:2]
                kept = select_boxes(all_boxes, all_scores, labels, width, height, cfg.nms_iou,
                                    cfg.max_boxes_per_phrase)
                for n in kept.tolist():
                    box = [round(float(v), 2) for v in all_boxes[n].tolist()]
                    box = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                           min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
                    per_key.setdefault(keys[int(labels[n])], []).append((box, round(float(all_scores[n]), 5)))
            results.append(per_key)
        return results

    def detect_batch(self, images: list[np.ndarray], keys_per_image: list[list[str]],
                     prepared: list | None = None) -> list[dict[str, list[tuple[list[float], float]]]]:
        """Boxes per distinct phrase for each image: ``[{key: [(box_xyxy, score), ...]}]``
        (after NMS and the per-phrase cap, best first)."""
        return self.finish(self.launch(images, keys_per_image, prepared))

    def begin(self, batch: dict):
        """First half of ``__call__``: read the rows and issue the detector (no wait)."""
        rows = BatchRows(batch)
        prepared_col = batch.get(PREPARED_COLUMN) if hasattr(batch, "get") else None
        todo: list[tuple[int, dict, list[dict], list[str], np.ndarray]] = []
        for i in range(rows.n):
            if not rows.ok(i):
                continue
            record = rec.loads(rows.records[i])
            record.setdefault("provenance", {})[self.provenance_key] = self.ref
            candidates = [e for e in record.get("entities", []) if e.get("status") is None]
            keys = []
            for ent in candidates:
                key = normalize_phrase(ent["phrase"])
                if key and key not in keys:
                    keys.append(key)
            if keys:
                image = rows.pixels(i)
                if image is not None:
                    todo.append((i, record, candidates, keys, image))
            else:
                rows.records[i] = rec.dumps(record)
        pending = None
        if todo:
            prepared = [prepared_col[t[0]] for t in todo] if prepared_col is not None else None
            pending = self.launch([t[4] for t in todo], [t[3] for t in todo], prepared)
        return rows, todo, pending

    def end(self, state) -> dict:
        """Second half of ``__call__``: wait for the detector and write the regions."""
        rows, todo, pending = state
        if todo:
            detections = self.finish(pending)
            for (i, record, candidates, _, _), per_key in zip(todo, detections):
                regions = record.setdefault("regions", [])
                next_id = max((r["id"] for r in regions), default=-1) + 1
                for ent in candidates:
                    for box, score in per_key.get(normalize_phrase(ent["phrase"]), []):
                        regions.append({"id": next_id, "entity": ent["id"], "box_xyxy": box, "det_score": score})
                        next_id += 1
                rows.records[i] = rec.dumps(record)
        return rows.result()

    def __call__(self, batch: dict) -> dict:
        return self.end(self.begin(batch))


__all__ = ["GroundStage", "Prompt", "normalize_phrase", "build_prompts", "phrase_scores", "batch_phrase_scores",
           "cxcywh_to_xyxy",
           "select_boxes", "rgb_pixels", "BatchRows", "MIN_BOX_SIDE", "PRE_NMS_TOP_K", "PREPARED_COLUMN"]
