"""``lookandlearn experiment shapes``: the controlled experiment.

Generated scenes of two coloured shapes with exact masks; captions naming them ("a small red
circle above a large blue square") with entity spans and masks, and questions ("what colour is
the square?"). The same tiny LLaVA-architecture model (CLIP-style vision tower + Llama, random
init from the seed) is trained from scratch twice per seed, with λ = 0 and λ > 0, on the same
data, seed and number of steps. Reported on held-out scenes: grounding (attention-mask gIoU and
pointing accuracy of the entity phrases' attention read-out) and understanding (question
accuracy: the first answer token's argmax under teacher forcing is the right colour word).
Also reported, so that a shape-saliency map is not mistaken for grounding: whether each entity's
attention puts more mass on its own shape than on the scene's other shape, and the best single
layer's gIoU (the λ = 0 model's fairest read-out). Runs use one torch thread by default.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class ShapesSetting:
    train_scenes: int = 400
    test_scenes: int = 60
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 2e-3
    lam: float = 1.0
    variant: str = "kl"
    query: str = "phrase"
    layers: tuple[int, ...] | None = None  # None: middle third
    image_size: int = 112
    patch_size: int = 8
    hidden: int = 64
    num_layers: int = 4


# Steps matter most (bench/results/experiment-shapes.md): at 200 steps the λ > 0 read-out is a
# shape-saliency map that barely tells the two shapes apart, and λ = 0 happens to sit at the
# peak of its own transient attention-to-shapes phase; entity-specific attention (pointing,
# own-vs-other mass) emerges between ~400 and 1000 steps.
FULL = ShapesSetting()
QUICK = ShapesSetting(train_scenes=160, test_scenes=30, steps=400)


def model_folder(work: Path, seed: int, st: ShapesSetting) -> Path:
    """The tiny model's folder, named by its architecture: ``write_tiny_vlm`` reuses a complete
    folder as is, so a folder named only by seed would silently keep an earlier grid size."""
    return work / f"model-seed{seed}-{st.image_size}px-p{st.patch_size}-h{st.hidden}-l{st.num_layers}"


def _examples(work: Path, processor, seed: int, n: int, tag: str, with_questions: bool, query: str = "phrase"):
    from devkit.experiments.shapes_scenes import scene_record, scenes, write_shard
    from stages.train.data import DataConfig, build_example, iter_shard_samples

    rng = np.random.default_rng(seed + 1000)
    items, masks = [], []
    for i, sc in enumerate(scenes(n, seed=seed, split="train" if tag == "train" else "test")):
        items.append(scene_record(f"{tag}{i:05d}", sc))
        masks.append([o["mask"] for o in sc["objects"]])
        if with_questions:
            q = int(rng.integers(2))
            items.append(scene_record(f"{tag}{i:05d}q", sc, question=q))
    shard = write_shard(work / f"{tag}-seed{seed}" / "shards" / "shapes-000000.tar", items)
    cfg = DataConfig("llava", query=query)
    caps, qs = [], []
    for sample in iter_shard_samples([shard]):
        ex = build_example(sample, processor, cfg)
        (qs if "question" in sample["record"] else caps).append((ex, sample["record"]))
    return caps, qs, masks


def _question_accuracy(model, processor, qs, collator, batch_size=16) -> float:
    import torch

    from stages.train.data import WTL_KEYS

    right = total = 0
    tok = processor.tokenizer
    with torch.no_grad():
        for s in range(0, len(qs), batch_size):
            chunk = qs[s: s + batch_size]
            batch = collator([ex for ex, _ in chunk])
            for k in WTL_KEYS:
                batch.pop(k)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            for b, (ex, rec) in enumerate(chunk):
                pos = (labels[b] >= 0).nonzero().flatten()[0]  # first answer token
                pred = logits[b, pos - 1].argmax().item()
                right += int(pred == tok.convert_tokens_to_ids(rec["question"]["answer"]))
                total += 1
    return right / max(total, 1)


def _specificity(model, capture, examples, collator, batch_size: int = 8) -> dict:
    """Is the read-out about *this* entity or just about shapes? For scenes with two entities:
    mean attention mass (token grid) on the entity's own mask and on the other shape's mask, and
    the share of entities with more mass on their own shape than on the other one (0.5 = a
    saliency map that does not tell the two shapes apart)."""
    from stages.train.readout import entity_heatmaps

    own, other = [], []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s: s + batch_size]
        for ex, heats in zip(chunk, entity_heatmaps(model, capture, chunk, collator)):
            if len(heats) != 2:
                continue
            for j, grid in enumerate(heats):
                g = grid.reshape(-1) / max(float(grid.sum()), 1e-12)
                own.append(float((g * ex["entities"][j]["target"].numpy()).sum()))
                other.append(float((g * ex["entities"][1 - j]["target"].numpy()).sum()))
    own_a, other_a = np.array(own), np.array(other)
    return {"mass_own": float(own_a.mean()) if own else float("nan"),
            "mass_other": float(other_a.mean()) if own else float("nan"),
            "own_gt_other": float((own_a > other_a).mean()) if own else float("nan")}


def run_one(work: Path, seed: int, lam: float, st: ShapesSetting, data=None) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

    from devkit.tiny_vlms import write_tiny_vlm
    from stages.train.attention import AttentionCapture
    from stages.train.data import Collator
    from stages.train.readout import score_split
    from stages.train.trainer import WTLTrainer

    folder = write_tiny_vlm(model_folder(work, seed, st), "llava", image_size=st.image_size,
                            patch_size=st.patch_size, hidden_size=st.hidden, num_layers=st.num_layers, seed=seed)
    processor = AutoProcessor.from_pretrained(str(folder))
    if data is None:
        data = load_data(work, processor, seed, st)
    train_caps, train_qs, test_caps, test_qs, test_masks = data
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    capture = AttentionCapture.attach(model, layers=st.layers)
    collator = Collator(processor.tokenizer.pad_token_id, "llava")
    train = [ex for ex, _ in train_caps] + [ex for ex, _ in train_qs]
    train_set = [{k: v for k, v in ex.items() if k != "geometry"} for ex in train]
    args = TrainingArguments(output_dir=str(work / f"run-seed{seed}-lam{lam}"), max_steps=st.steps,
                             per_device_train_batch_size=st.batch_size, learning_rate=st.learning_rate,
                             warmup_steps=min(20, st.steps // 10), lr_scheduler_type="cosine",
                             logging_steps=max(1, st.steps // 10),
                             save_strategy="no", seed=seed, data_seed=seed, report_to="none",
                             remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = WTLTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator, capture=capture,
                         wtl_lambda=lam, wtl_variant=st.variant)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    model.eval()
    test_ex = [ex for ex, _ in test_caps]
    grounding = score_split(model, capture, test_ex, test_masks, collator)
    specific = _specificity(model, capture, test_ex, collator)
    # the same read-out from each single layer: the λ = 0 model's best layer is the fairest
    # baseline (its grounding, if any, need not sit in the layers the loss supervises)
    trained_layers = list(capture.layers)
    per_layer = {}
    for layer in range(st.num_layers):
        capture.layers = [layer]
        per_layer[layer] = score_split(model, capture, test_ex, test_masks, collator)["giou"]
    capture.layers = trained_layers
    accuracy = _question_accuracy(model, processor, test_qs, collator)
    logs = [h for h in trainer.state.log_history if "lm_loss" in h]
    return {"seed": seed, "lambda": lam, "giou": grounding["giou"], "ciou": grounding["ciou"],
            "pointing": grounding["pointing"], "question_acc": accuracy, **specific,
            "giou_per_layer": per_layer, "best_layer_giou": max(per_layer.values()),
            "entities": grounding["entities"],
            "questions": len(test_qs), "final_lm_loss": logs[-1]["lm_loss"] if logs else None,
            "final_wtl_loss": logs[-1]["wtl_loss"] if logs else None,
            "final_train_iou": logs[-1].get("wtl_iou") if logs else None,
            "torch_threads": torch.get_num_threads(), "train_seconds": round(seconds, 1),
            "layers": capture.layers,
            "history": [{k: h.get(k) for k in ("step", "lm_loss", "wtl_loss", "wtl_iou")} for h in logs]}


def load_data(work: Path, processor, seed: int, st: ShapesSetting):
    train_caps, train_qs, _ = _examples(work, processor, seed, st.train_scenes, "train", True, st.query)
    test_caps, test_qs, test_masks = _examples(work, processor, seed, st.test_scenes, "test", True, st.query)
    return train_caps, train_qs, test_caps, test_qs, test_masks


def run_shapes(work: str | Path, seeds=(0, 1, 2), st: ShapesSetting = FULL, threads: int | None = 1) -> list[dict]:
    """λ = 0 and λ = st.lam per seed. ``threads``: torch intra-op threads during the runs (1 by
    default: these models are far too small to gain from more, and on a shared 2-core machine two
    OpenMP threads contending with other processes made the same run 4-7x slower: 31 s -> ~140 s
    per 400-step run, measured; None leaves torch's setting)."""
    import torch

    work = Path(work)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_shapes(work, seeds, st)
    finally:
        torch.set_num_threads(before)


def _run_shapes(work: Path, seeds, st: ShapesSetting) -> list[dict]:
    rows = []
    for seed in seeds:
        data = None
        for lam in (0.0, st.lam):
            if data is None:
                from transformers import AutoProcessor

                from devkit.tiny_vlms import write_tiny_vlm

                folder = write_tiny_vlm(model_folder(work, seed, st), "llava", image_size=st.image_size,
                                        patch_size=st.patch_size, hidden_size=st.hidden, num_layers=st.num_layers,
                                        seed=seed)
                data = load_data(work, AutoProcessor.from_pretrained(str(folder)), seed, st)
            rows.append(run_one(work, seed, lam, st, data))
    return rows


def machine(threads: int | None = None) -> str:
    """CPU model, cores, torch threads (``threads``: the runs' setting) and versions."""
    import os

    import torch

    from pipeline.machine import cpu_name

    return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores (shared with other work), torch "
            f"{torch.__version__} with {threads or torch.get_num_threads()} intra-op thread(s), "
            f"{platform.python_implementation()} {platform.python_version()}, {platform.system()}")


def format_results(rows: list[dict], st: ShapesSetting) -> str:
    def cell(v, fmt=".3f"):
        return "–" if v is None else format(v, fmt)

    lines = ["# Shapes experiment: where-to-look loss λ = 0 vs λ > 0", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `lookandlearn experiment shapes`.", "",
             f"Machine: {machine(rows[0].get('torch_threads') if rows else None)}.", "",
             f"Setting: `{json.dumps(asdict(st))}` (layers null = the middle third of the language model).", "",
             "Tiny LLaVA-architecture model (CLIP-style ViT + Llama, RANDOM init per seed, trained from scratch on "
             "generated scenes; not a result about real VLMs). Both runs of a seed share data, initial weights, "
             "data order and steps; only λ differs. All metrics on held-out scenes except train IoU.", "",
             "- gIoU / cIoU: attention read-out of the entity phrase tokens (capture layers, heads averaged) mapped "
             "to pixels through the inverse image geometry, thresholded at 0.5 × max, vs the exact shape mask.",
             "- best-layer gIoU: the same read-out from the single best language-model layer (gives the λ = 0 "
             "model its best chance: its attention need not sit in the supervised layers).",
             "- pointing: the centre of the max-attention token cell lies inside the entity's mask.",
             "- own > other: share of entities whose attention mass on their own shape exceeds the mass on the "
             "scene's other shape (0.5 = a shape-saliency map that does not tell the two apart).",
             "- question acc: teacher-forced first answer token of \"what colour is the SHAPE?\" is the right "
             "colour word (4 colours; 0.5 = guessing between the scene's two colours).",
             "- train IoU: token-grid IoU of the read-out on the training batches (mean over the last logging "
             "window).", "",
             "| seed | λ | gIoU | cIoU | best-layer gIoU | pointing | own > other | question acc | train IoU | "
             "final LM loss | final WTL loss | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['lambda']} | {r['giou']:.3f} | {r['ciou']:.3f} | "
                     f"{r['best_layer_giou']:.3f} | {r['pointing']:.3f} | {r['own_gt_other']:.3f} | "
                     f"{r['question_acc']:.3f} | {cell(r.get('final_train_iou'))} | {cell(r['final_lm_loss'])} | "
                     f"{cell(r['final_wtl_loss'])} | {r['train_seconds']} |")
    keys = ("giou", "best_layer_giou", "pointing", "own_gt_other", "question_acc")
    lines += ["", f"Mean ± sd over {len({r['seed'] for r in rows})} seed(s):", "",
              "| λ | gIoU | best-layer gIoU | pointing | own > other | question acc |", "|---|---|---|---|---|---|"]
    for lam in sorted({r["lambda"] for r in rows}):
        sel = [r for r in rows if r["lambda"] == lam]
        lines.append(f"| {lam} | " + " | ".join(
            f"{np.mean([r[k] for r in sel]):.3f} ± {np.std([r[k] for r in sel]):.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def run_shapes_cli(args) -> int:
    from stages.extras import require

    require("lookandlearn experiment shapes", "accelerate", "skimage")  # the HF Trainer, the read-out
    st = QUICK if args.quick else FULL
    if args.steps:
        st = ShapesSetting(**{**asdict(st), "steps": args.steps})
    if args.lam is not None:
        st = ShapesSetting(**{**asdict(st), "lam": args.lam})
    t0 = time.time()
    rows = run_shapes(args.work, args.seeds, st)
    text = format_results(rows, st) + f"\nTotal wall time (data, {2 * len(args.seeds)} runs, evaluation): " \
        f"{(time.time() - t0) / 60:.1f} min.\n"
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"setting": asdict(st), "rows": rows}, indent=2))
    print(text)
    return 0
