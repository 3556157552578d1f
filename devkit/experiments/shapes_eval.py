"""Held-out measurement of one trained model of the shapes instrument.

* Grounding: the attention read-out of each caption entity (its query tokens' attention over the
  image-token grid, heads and layers averaged, mapped to pixels, thresholded at 0.5 x max) scored
  against the exact mask: gIoU (mean per-entity IoU) and pointing (the max-attention cell's
  centre lies in the mask). The same read-out from each single layer, so that a layer can be
  chosen on the ``val`` split and reported on ``test``. Two reference read-outs bound the scale:
  the *oracle* (the read-out applied to the true mask's own token-grid map: the best a grid map
  can score) and *uniform* (a flat map: what a model that looks nowhere in particular scores).
* Understanding: question accuracy (the teacher-forced answer token's argmax over the whole
  vocabulary is the answer word: the reply's first token, or with sentence replies the word
  after "the circle is"), per question type, and the same model's accuracy with
  the images rolled by one within each batch (each question sees another scene's image).
* Held-out caption NLL: mean negative log-likelihood per caption token (answer tokens).

All forward passes run without gradients, in batches, with one forward per caption batch
capturing every language-model layer (per-layer and configured read-outs come from the same
rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.train.data import WTL_KEYS
from stages.train.loss import entity_maps
from stages.train.readout import iou, threshold


@dataclass
class EvalSet:
    """Examples (``build_example`` output, geometry kept) of one held-out split."""
    captions: list[dict]          # caption examples, entities with phrase-token queries
    masks: list[list[np.ndarray]]  # masks[i][j]: pixel mask of caption i's entity j
    questions: list[dict]         # question examples
    records: list[dict]           # question records (``record["question"]``: type, text, answer)


def with_queries(examples: list[dict], query: str) -> list[dict]:
    """The examples with each entity's queries at ``query`` positions: ``phrase`` (the phrase's
    own tokens, as built) or ``predicting`` (the positions that predict them, one to the left)."""
    if query == "phrase":
        return examples
    out = []
    for ex in examples:
        ents = [{**e, "queries": [q - 1 for q in e["queries"]]} for e in ex["entities"]]
        out.append({**ex, "entities": ents})
    return out


def _model_batch(collator, examples: list[dict]) -> tuple[dict, dict, torch.Tensor]:
    batch = collator(examples)   # the collator reads only the tensors and entities
    wtl = {k: batch.pop(k) for k in WTL_KEYS}
    labels = batch.pop("labels")
    return batch, wtl, labels


def _score(grid: np.ndarray, geo, gt: np.ndarray) -> tuple[float, int]:
    """IoU of the thresholded pixel read-out of a grid map with ``gt``, and the pointing hit."""
    pix = geo.grid_to_image(grid)
    i, u = iou(threshold(pix, "relative"), gt)
    r, c = np.unravel_index(np.argmax(grid), grid.shape)
    y0, x0, y1, x1 = geo.cell_rect(int(r), int(c))
    y = int(np.clip((y0 + y1) / 2, 0, gt.shape[0] - 1))
    x = int(np.clip((x0 + x1) / 2, 0, gt.shape[1] - 1))
    return i / max(u, 1), int(gt[y, x])


@torch.no_grad()
def grounding(model, capture, examples: list[dict], masks, collator, num_layers: int, batch_size: int = 16,
              references: bool = False) -> dict:
    """Read-out scores of the configured layers (``capture.layers``) and of each single layer,
    the caption NLL (per answer token), and with ``references`` the oracle and uniform read-outs."""
    configured = list(capture.layers)
    capture.layers = list(range(num_layers))
    res = {"iou": [], "hit": [], "layer_iou": {k: [] for k in range(num_layers)}, "oracle": [], "uniform": []}
    nll_sum, nll_n = 0.0, 0
    try:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s: s + batch_size]
            batch, wtl, labels = _model_batch(collator, chunk)
            capture.activate()
            capture.set_queries(wtl["wtl_q_index"])
            logits = model(**batch).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            tgt = labels[:, 1:]
            keep = tgt >= 0
            nll_sum -= float(lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep].sum())
            nll_n += int(keep.sum())
            args = (wtl["wtl_q_index"], wtl["wtl_v_index"], wtl["wtl_ent_sample"], wtl["wtl_ent_qmask"])
            rows = capture.rows
            per = {k: entity_maps({k: rows[k]}, *args)[0].mean(1).cpu().numpy() for k in range(num_layers)}
            conf = entity_maps({k: rows[k] for k in configured}, *args)[0].mean(1).cpu().numpy()
            e = 0
            for b, ex in enumerate(chunk):
                geo = ex["geometry"]
                for j, ent in enumerate(ex["entities"]):
                    gt = masks[s + b][j].astype(bool)
                    shape = (geo.grid_h, geo.grid_w)
                    v, hit = _score(conf[e, : geo.n_tokens].reshape(shape), geo, gt)
                    res["iou"].append(v)
                    res["hit"].append(hit)
                    for k in range(num_layers):
                        res["layer_iou"][k].append(_score(per[k][e, : geo.n_tokens].reshape(shape), geo, gt)[0])
                    if references:
                        res["oracle"].append(_score(ent["target"].numpy().reshape(shape), geo, gt)[0])
                        res["uniform"].append(_score(np.ones(shape, np.float32), geo, gt)[0])
                    e += 1
    finally:
        capture.layers = configured
        capture.set_queries(None)
    out = {"giou": float(np.mean(res["iou"])), "pointing": float(np.mean(res["hit"])),
           "giou_per_layer": {k: float(np.mean(v)) for k, v in res["layer_iou"].items()},
           "caption_nll": nll_sum / max(nll_n, 1), "entities": len(res["iou"])}
    if references:
        out["oracle_giou"] = float(np.mean(res["oracle"]))
        out["uniform_giou"] = float(np.mean(res["uniform"]))
    return out


@torch.no_grad()
def answers(model, tokenizer, examples: list[dict], records: list[dict], collator, swap: bool = False,
            batch_size: int = 32) -> np.ndarray:
    """1 where the teacher-forced answer token (the reply's first, or the word at ``answer_start``)
    is the answer word, else 0, per question; ``swap``: each question sees the image of the next
    question in its batch (rolled by one)."""
    right = []
    for s in range(0, len(examples), batch_size):
        chunk, recs = examples[s: s + batch_size], records[s: s + batch_size]
        batch, _, labels = _model_batch(collator, chunk)
        if swap and len(chunk) > 1:
            batch["pixel_values"] = batch["pixel_values"].roll(1, 0)
        logits = model(**batch).logits
        for b, rec in enumerate(recs):
            # the answer word's label position: after the reply's tokens before it (none for a
            # one-word reply; "the circle is" for a sentence)
            q = rec["question"]
            reply = rec["text"]["conversations"][1]["value"]
            before = len(tokenizer(reply[: q.get("answer_start", 0)], add_special_tokens=False)["input_ids"])
            pos = int((labels[b] >= 0).nonzero().flatten()[before])
            want = tokenizer.convert_tokens_to_ids(q["answer"])
            if int(labels[b, pos]) != want:
                raise ValueError(f"{rec['key']}: the answer {q['answer']!r} is not the reply's token {before}")
            right.append(int(int(logits[b, pos - 1].argmax()) == want))
    return np.asarray(right, dtype=np.int8)


def by_type(right: np.ndarray, records: list[dict]) -> dict:
    """Accuracy per question type."""
    types = np.array([r["question"]["type"] for r in records])
    return {t: float(right[types == t].mean()) for t in sorted(set(types.tolist()))}


def constant_baselines(train_counts: dict, records: list[dict]) -> dict:
    """Accuracy on ``records`` of two answers that never look at the image, taken from the
    training questions seen (``train_counts[(type, text)][answer]``): the most frequent answer
    of each question type (``constant``), and of each question text (``text_prior``)."""
    from collections import Counter

    per_type: dict[str, Counter] = {}
    for (qtype, _), counts in train_counts.items():
        per_type.setdefault(qtype, Counter()).update(counts)
    best_type = {t: c.most_common(1)[0][0] for t, c in per_type.items()}
    best_text = {key: c.most_common(1)[0][0] for key, c in train_counts.items()}
    const, prior = [], []
    for r in records:
        q = r["question"]
        const.append(q["answer"] == best_type.get(q["type"]))
        prior.append(q["answer"] == best_text.get((q["type"], q["text"]), best_type.get(q["type"])))
    return {"qa_constant": float(np.mean(const)), "qa_text_prior": float(np.mean(prior)),
            "constant_answers": best_type, "qa_constant_by_type": by_type(np.asarray(const, np.int8), records)}


def swap_gap(right: np.ndarray, swapped: np.ndarray) -> tuple[float, float]:
    """Accuracy drop when images are swapped and its standard error (paired, per question)."""
    d = right.astype(float) - swapped.astype(float)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se
