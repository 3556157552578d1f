"""``lookandlearn evaluate grounding``: the model's attention read-out as masks.

``--shards DIR``: every grounded entity of the split (teacher-forced caption), heatmap of its
phrase tokens over the image tokens (capture layers, heads averaged), mapped through the inverse
geometry to pixels, thresholded (relative / otsu / topk); mask IoU, cIoU / gIoU, pointing game.
``--image FILE --phrase P``: heatmaps for the phrases inside ``--caption`` (default: the phrases
joined), written as overlays.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _setup(args):
    from pipeline.train import ModelSection, load_model_and_processor
    from stages.train.attention import AttentionCapture
    from stages.train.data import Collator

    model, processor, family = load_model_and_processor(ModelSection(path=args.model))
    model.eval()
    capture = AttentionCapture.attach(model, layers=args.layers)
    return model, processor, family, capture, Collator(processor.tokenizer.pad_token_id, family)


def _save_overlay(path: Path, image, heat_pixels, geometry, phrase: str, pred, truth=None):
    """The phrase's overlay PNG (``stages/train/overlay.py``): heat map, read-out and true mask outlines,
    the pixels the model's processor cropped away in grey, the phrase and the legend below."""
    from PIL import Image

    from stages.train.overlay import render_overlay
    from stages.train.readout import iou

    seen = geometry.grid_to_image(np.ones((geometry.grid_h, geometry.grid_w), np.float32)) > 0.5
    scores = None
    if truth is not None:
        inter, union = iou(pred.astype(bool), truth.astype(bool))
        scores = {"IoU": inter / max(union, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_overlay(image, heat_pixels, phrase, pred=pred, truth=truth, seen=seen,
                                   scores=scores)).save(path)


def main(args) -> int:
    from stages.extras import require

    require("lookandlearn evaluate grounding", "skimage")  # the read-out's threshold and outlines
    from stages.record.shards import shard_paths
    from stages.train.data import DataConfig, build_example, decode_image, entity_mask, iter_shard_samples
    from stages.train.readout import entity_heatmaps, score_split, threshold

    if not args.shards and not (args.image and args.phrase):
        print("error: give --shards DIR, or --image FILE with --phrase", flush=True)
        return EXIT_BAD_INPUT
    model, processor, family, capture, collator = _setup(args)
    cfg = DataConfig(family)
    if args.shards:
        examples, masks, images = [], [], []
        for sample in iter_shard_samples(shard_paths(args.shards)):
            if args.limit and len(examples) >= args.limit:
                break
            image = decode_image(sample["image"])
            ex = build_example(sample, processor, cfg, image=image)
            if ex is None or not ex["entities"]:
                continue
            rec = sample["record"]
            ents = [e for e in rec["entities"] if e.get("status") == "grounded" and entity_mask(rec, e) is not None]
            ents = [e for e in ents if entity_mask(rec, e).any()]
            examples.append(ex)
            masks.append([entity_mask(rec, e) for e in ents][: len(ex["entities"])])
            images.append(image)
        result = score_split(model, capture, examples, masks, collator, args.threshold, args.value)
        if args.overlays:
            for i, ex in enumerate(examples[:50]):
                for j, grid in enumerate(entity_heatmaps(model, capture, [ex], collator)[0]):
                    pix = ex["geometry"].grid_to_image(grid)
                    _save_overlay(Path(args.overlays) / f"{ex['key']}-{j}.png", images[i], pix, ex["geometry"],
                                  ex["entities"][j]["phrase"], threshold(pix, args.threshold, args.value),
                                  truth=masks[i][j] if j < len(masks[i]) else None)
    else:
        from PIL import Image

        image = np.asarray(Image.open(args.image).convert("RGB"))
        caption = args.caption or " and ".join(args.phrase) + "."
        ents = []
        for k, p in enumerate(args.phrase):
            s = caption.find(p)
            if s < 0:
                print(f"error: phrase {p!r} not in caption {caption!r}")
                return EXIT_BAD_INPUT
            ents.append({"id": k, "phrase": p, "start": s, "end": s + len(p), "turn": -1, "status": "grounded",
                         "regions": [k]})
        h, w = image.shape[:2]
        from stages.record import rle

        (full,) = rle.encode(np.ones((1, h, w), bool))
        rec = {"key": Path(args.image).stem, "image": {"height": h, "width": w}, "text": {"caption": caption},
               "entities": ents, "regions": [{"id": k, "mask_rle": full, "verdict": {"accept": True}}
                                             for k in range(len(ents))]}
        ex = build_example({"record": rec, "image": b""}, processor, cfg, image=image)
        heats = entity_heatmaps(model, capture, [ex], collator)[0]
        result = {"caption": caption, "phrases": []}
        for p, grid in zip(args.phrase, heats):
            pix = ex["geometry"].grid_to_image(grid)
            pred = threshold(pix, args.threshold, args.value)
            result["phrases"].append({"phrase": p, "mask_fraction": float(pred.mean())})
            if args.overlays:
                _save_overlay(Path(args.overlays) / f"{rec['key']}-{p.replace(' ', '_')}.png", image, pix,
                              ex["geometry"], p, pred)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return EXIT_OK
