"""Small GroundingDINO and SAM models TRAINED on the generated shape scenes (``devkit/scenes.py``).

Unlike the random tiny models (``devkit/tiny_models.py``, for wiring tests), these folders hold
weights trained by the seeded recipes below, so that a build on shape scenes gives boxes and
masks that mean something. They know only the generator's world: eleven colours, eight shapes,
size words, plain / gradient / noise / photo backgrounds. They are no detector or segmenter of
anything else.

* :func:`train_sam` trains ``SamModel`` (box prompt -> mask) and :func:`train_grounding_dino`
  trains ``GroundingDinoForObjectDetection`` with transformers' own GroundingDINO loss
  (Hungarian matching, focal + L1 + GIoU, auxiliary and encoder-proposal losses). Both write a
  ``from_pretrained`` folder: config.json, model.safetensors, processor (and tokenizer) files,
  README.md model card (written last).
* The models are trained for exactly how the engine uses them: images go through the engine's
  own :class:`~stages.prep.ImagePrep` with the folder's processor sizes; the detector sees the
  prompts of :func:`~stages.phrase_boxes.build_prompts` (``"a small red circle . two green
  triangles ."``, lower case) and SAM one box per prompt with ``multimask_output=False``.
* :func:`evaluate_sam` (mean mask IoU from the true boxes) and :func:`evaluate_detector`
  (top-1 box per phrase, IoU >= 0.5) score a folder on held-out scenes through the stages'
  own code (``SegmentStage.segment_images``; ``GroundStage._forward`` + ``phrase_scores``).

Training scenes come from the ``train`` split at ``TRAIN_CONFIG`` (the default scene config with
smaller canvases: cheaper to draw, and both are shrunk to the models' input size anyway); the
learning curves use the ``val`` split and the reported figures the ``test`` split, both at the
default :class:`~devkit.scenes.SceneConfig`, the config of the offline sample's scenes.

Command: ``lookandlearn small-models train models`` (README, "Small trained models").
"""
from __future__ import annotations

import json
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from devkit import scenes
from devkit.tiny_models import _build_vocab, write_gdino_processor, write_gdino_tokenizer, write_sam_processor

SAM_DIR = "shapes-sam"
GDINO_DIR = "shapes-grounding-dino"
TRAIN_CONFIG = scenes.SceneConfig(side=(256, 384))
EVAL_CONFIG = scenes.SceneConfig()      # what devkit/sample_data.py draws its scenes with
VAL_SEED = 0                            # learning curves: val split
TEST_SEED = 1                           # reported figures: test split (the sample uses test seed 14)
TARGETS = {"sam_mean_mask_iou": 0.85, "detector_top1_at_iou50": 0.80}

# Input sizes. SAM: 384 px, 16 px patches -> 24x24 image embedding, 96x96 low-resolution masks.
# At 256 px (16x16, 64x64 masks; true masks squeezed through that grid keep a mean IoU of 0.94)
# the shapes under 32 px in the input cost most (0.66 under 16 px, 0.76 at 16-32 px, 0.88 at
# >= 64 px): 384 px makes them 1.5x larger for 2.1x the step time (8 px patches: ~5x).
# GroundingDINO: short side 128.
SAM_IMAGE_SIZE, SAM_PATCH_SIZE = 384, 16
GDINO_SHORTEST_EDGE, GDINO_LONGEST_EDGE = 128, 192
GDINO_MAX_TEXT_LEN = 64       # tokens per prompt; a scene's phrases need ~45 at most


@dataclass
class SamRecipe:
    # a 1,200-step run took off only after ~500 (val IoU 0.16 -> 0.26 at 600); a 2,400-step run
    # ended at val 0.74 / test 0.675 with train IoU 0.70 still rising (underfit, not overfit)
    # 8,000 steps at 256 px: val 0.86 flat over the last 1,600 steps, test 0.806 (small shapes)
    steps: int = 9000
    batch: int = 4             # scenes per step; every instance of a scene is one box prompt
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    box_jitter: float = 0.03   # std of box-side noise as a fraction of the box side (detector boxes are not exact)
    log_every: int = 25
    eval_every: int = 800
    eval_scenes: int = 24
    seed: int = 0
    workers: int = 1           # scene-drawing worker processes (0: in the training process)
    # torch threads. One: with the scene worker on the other core, two cores are busy; two
    # threads on a shared 2-core machine spin-wait on each other (10x slower steps, measured).
    threads: int | None = 1


@dataclass
class DetectorRecipe:
    # 3,200 steps: top-1 55% with val still rising (30/39/53/57% at 500/1k/2k/3.2k); 5,600: 74.9%,
    # val still rising (0.59/0.72/0.67/0.74 at 3.2k/4k/4.8k/5.6k)
    steps: int = 13000
    batch: int = 4             # more updates for the same images: DETR-style training wants steps
    lr: float = 4e-4
    warmup: int = 300
    weight_decay: float = 1e-4
    clip: float = 0.5
    log_every: int = 50
    eval_every: int = 800
    eval_scenes: int = 48
    seed: int = 0
    workers: int = 1
    threads: int | None = 1


# --- model configurations -------------------------------------------------------------------------

def sam_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    width = 64  # prompt/decoder width == vision output_channels == 2 * num_pos_feats
    vision = SamVisionConfig(
        hidden_size=64, output_channels=width, num_hidden_layers=4, num_attention_heads=4,
        image_size=SAM_IMAGE_SIZE, patch_size=SAM_PATCH_SIZE, mlp_ratio=2.0, window_size=8,
        global_attn_indexes=[1, 3], num_pos_feats=width // 2)
    prompt = SamPromptEncoderConfig(hidden_size=width, image_size=SAM_IMAGE_SIZE, patch_size=SAM_PATCH_SIZE,
                                    mask_input_channels=8)
    decoder = SamMaskDecoderConfig(hidden_size=width, mlp_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                   iou_head_hidden_dim=64)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def shapes_vocab() -> list[str]:
    """The tiny models' BERT-compatible vocabulary plus every word the scene captions use, so
    that "hexagon" is one token and not six character pieces."""
    vocab = _build_vocab()
    seen = set(vocab)
    words = [*scenes.SHAPES, *scenes.PLURALS.values(), *scenes.COLOURS, *(w for w in scenes.SIZE_RANGES if w),
             *scenes.NUMBERS.values(), *(w for name, _ in scenes.TINTS for w in name.split()),
             "a", "an", "the", "picture", "image", "background", "there", "with", "inside", "around", "next"]
    for word in words:
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab


def grounding_dino_config(vocab_size: int):
    from transformers import BertConfig, GroundingDinoConfig, ResNetConfig

    # A small ResNet is the backbone (load_backbone takes any transformers backbone): convolutions
    # are cheap on a CPU and colour/shape are local features. Strides 8/16/32.
    backbone = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 2, 1],
                            layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=GDINO_MAX_TEXT_LEN, type_vocab_size=2,
                      pad_token_id=0)
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_queries=30, d_model=64,
        # decoder_layers=1 trips transformers' bbox_embed weight-tying regex: keep >= 2.
        encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4, num_feature_levels=3,
        encoder_n_points=4, decoder_n_points=4, max_text_len=GDINO_MAX_TEXT_LEN,
        dropout=0.0, fusion_droppath=0.0, disable_custom_kernels=True,
        two_stage=True, auxiliary_loss=True)   # encoder proposals + per-layer losses: DETR converges faster


# --- data ---------------------------------------------------------------------------------------------

class _SceneStream(torch.utils.data.IterableDataset):
    """Scenes ``start, start + 1, ...`` of one split, each turned into a training example by
    ``make`` (runs in the DataLoader worker, so drawing overlaps the training step)."""

    def __init__(self, split: str, seed: int, config: scenes.SceneConfig, make, start: int = 0):
        self.split, self.seed, self.config, self.make, self.start = split, seed, config, make, start

    def __iter__(self) -> Iterator[Any]:
        index = self.start
        while True:
            yield self.make(scenes.generate(self.seed, self.split, index, self.config), index)
            index += 1


def _batches(dataset, batch: int, workers: int):
    # fork, named: the scene stream's ``make`` is a closure (not picklable), and a process started
    # with spawn (a parallel train_both) or Python 3.14's forkserver default would not fork workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=list,
                                         prefetch_factor=4 if workers else None, persistent_workers=bool(workers),
                                         multiprocessing_context="fork" if workers else None)
    return iter(loader)


def _lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _runtime():
    from pipeline.manifest import RuntimeConfig

    return RuntimeConfig(executor="local", device="cpu", dtype="float32")


def _machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or platform.system()}, " \
           f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


@contextmanager
def _threads(n: int | None):
    """torch threads for a block, restored after (see SamRecipe.threads for why one)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cluster_se(values: list[list[float]]) -> float:
    """Standard error of the mean of all values, clustered by scene (values of one scene are not
    independent): sqrt(sum over scenes of (sum of residuals)^2) / n."""
    flat = [v for group in values for v in group]
    n = len(flat)
    if n < 2:
        return float("nan")
    mean = sum(flat) / n
    return math.sqrt(sum(sum(v - mean for v in group) ** 2 for group in values)) / n


def _box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- SAM ------------------------------------------------------------------------------------------------

def _sam_example(prep, jitter: float, seed: int):
    """Scene -> (SAM input pixels uint8, box prompts (N, 4) in input coordinates, soft target
    masks (N, h, w) at the input size, before padding)."""
    from stages.segment import scale_boxes

    def make(scene: scenes.Scene, index: int):
        image = prep.resize(scene.image)
        size, reshaped = scene.image.shape[:2], image.shape[:2]
        boxes = scale_boxes([inst.box for inst in scene.instances], size, reshaped)
        if jitter:
            rng = np.random.default_rng([seed, index])
            side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            boxes = boxes + torch.from_numpy(rng.normal(0, jitter, boxes.shape)).float() * side
        masks = torch.from_numpy(np.stack([inst.mask for inst in scene.instances])).float()[None]
        # area interpolation: a target pixel is the fraction of its true pixels (soft edges)
        target = F.interpolate(masks, size=reshaped, mode="area")[0]
        return image, boxes, target
    return make


def _sam_loss(model, prep, batch) -> tuple[torch.Tensor, dict[str, float]]:
    images, boxes, targets = zip(*batch)
    pixel_values, _ = prep.upload(list(images), torch.device("cpu"))
    n_max = max(len(b) for b in boxes)
    pad = prep.pad_size
    prompts = torch.zeros((len(batch), n_max, 4))
    truth = torch.zeros((len(batch), n_max, *pad))
    valid = torch.zeros((len(batch), n_max), dtype=torch.bool)
    for i, (b, t) in enumerate(zip(boxes, targets)):
        prompts[i, :len(b)], prompts[i, len(b):] = b, b[-1]
        truth[i, :len(b), :t.shape[1], :t.shape[2]] = t
        valid[i, :len(b)] = True
    out = model(pixel_values=pixel_values, input_boxes=prompts, multimask_output=False)
    # the engine upsamples the low-resolution logits to the padded input size (bilinear): so does the loss
    logits = F.interpolate(out.pred_masks[:, :, 0], pad, mode="bilinear", align_corners=False)[valid]
    truth = truth[valid]
    bce = F.binary_cross_entropy_with_logits(logits, truth)
    prob = logits.sigmoid()
    dice = 1 - ((2 * (prob * truth).sum((1, 2)) + 1) / (prob.sum((1, 2)) + truth.sum((1, 2)) + 1)).mean()
    with torch.no_grad():
        hard, sure = logits > 0, truth > 0.5
        iou = (hard & sure).sum((1, 2)) / (hard | sure).sum((1, 2)).clamp(min=1)
    iou_loss = F.mse_loss(out.iou_scores[:, :, 0][valid], iou)   # the mask_score the judge reads
    loss = bce + dice + iou_loss
    return loss, {"loss": loss.item(), "bce": bce.item(), "dice": dice.item(), "iou_head": iou_loss.item(),
                  "train_iou": iou.mean().item()}


def _segment_stage(folder: str | Path | None = None, model=None, processor=None):
    """The engine's SegmentStage on the CPU, from a folder or an in-memory model and processor."""
    from stages.segment import SegmentConfig, SegmentStage

    stage = SegmentStage(SegmentConfig(model=str(folder or "in-memory")), _runtime())
    return _with_model(stage, model, processor, "sam")


def _with_model(stage, model, processor, kind: str):
    """``stage`` set up from its folder, or given an in-memory model and processor (on the CPU)."""
    from stages.prep import ImagePrep

    if model is None:
        stage.setup()
    else:
        stage.model, stage.processor = model.eval(), processor
        stage.prep = ImagePrep(processor.image_processor, kind)
        stage.device, stage.dtype = torch.device("cpu"), torch.float32
    return stage


def _sam_scores(stage, n_scenes: int, seed: int, split: str, progress: bool = False) -> list[list[float]]:
    """Mask IoU per instance (grouped by scene) of the mask the engine takes for the true box."""
    out = []
    for index in tqdm(range(n_scenes), desc=f"SAM {split}", disable=not progress, leave=False):
        scene = scenes.generate(seed, split, index, EVAL_CONFIG)
        masks, _ = stage.segment_images([scene.image], [[list(i.box) for i in scene.instances]])[0]
        ious = []
        for inst, mask in zip(scene.instances, masks):
            union = np.logical_or(mask, inst.mask).sum()
            ious.append(float(np.logical_and(mask, inst.mask).sum() / union) if union else 0.0)
        out.append(ious)
    return out


def evaluate_sam(folder: str | Path, n_scenes: int = 100, seed: int = TEST_SEED, split: str = "test",
                 progress: bool = False, stage=None, threads: int | None = 1) -> dict:
    """Mean mask IoU from the true instance boxes on held-out scenes (default scene config):
    the mask SegmentStage gives for ``instance.box`` against the instance's visible mask."""
    with torch.inference_mode(), _threads(threads):
        values = _sam_scores(stage or _segment_stage(folder), n_scenes, seed, split, progress)
    flat = [v for g in values for v in g]
    return {"metric": "mean mask IoU from the true boxes", "split": split, "seed": seed, "scene_config": "default",
            "n_scenes": n_scenes, "n": len(flat), "mean_mask_iou": round(float(np.mean(flat)), 4),
            "se": round(_cluster_se(values), 4), "share_iou_at_least_0.85": round(float(np.mean(np.array(flat) >= 0.85)), 4),
            "target": TARGETS["sam_mean_mask_iou"], "met": bool(np.mean(flat) >= TARGETS["sam_mean_mask_iou"])}


def train_sam(out_dir: str | Path, steps: int | None = None, seed: int = 0, recipe: SamRecipe | None = None,
              progress: bool = True, evaluate_scenes: int = 100, command: str | None = None) -> dict:
    """Train SAM from scratch by ``recipe`` and write the folder ``out_dir``; returns the run's
    record (recipe, wall time, learning curve, held-out figures)."""

    return _run_recipe(_train_sam, recipe or SamRecipe(), out_dir, steps, seed, progress, evaluate_scenes, command)


def _run_recipe(train, recipe, out_dir, steps: int | None, seed: int, *args) -> dict:
    """``train(recipe, out, *args)`` with the steps and seed asked for, at the recipe's torch threads."""
    recipe = replace(recipe, seed=seed, **({} if steps is None else {"steps": steps}))
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        return train(recipe, Path(out_dir), *args)
    finally:
        torch.set_num_threads(threads)


def _train_sam(recipe, out: Path, progress: bool, evaluate_scenes: int, command: str | None) -> dict:
    from transformers import SamModel

    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").unlink(missing_ok=True)     # written last: its absence marks an unfinished folder
    seed = recipe.seed
    torch.manual_seed(seed)
    processor = write_sam_processor(out, SAM_IMAGE_SIZE, SAM_PATCH_SIZE)
    model = SamModel(sam_config())
    _smooth_positions(model)
    from stages.prep import ImagePrep

    prep = ImagePrep(processor.image_processor, "sam")
    stage = _segment_stage(model=model, processor=processor)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    data = _batches(_SceneStream("train", seed, TRAIN_CONFIG, _sam_example(prep, recipe.box_jitter, seed)),
                    recipe.batch, recipe.workers)
    curve, evals, running = [], [], []
    started = time.time()
    bar = tqdm(range(recipe.steps), desc="train SAM", disable=not progress)
    for step in bar:
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, recipe.lr, recipe.warmup, recipe.steps)
        loss, parts = _sam_loss(model, prep, next(data))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        optimiser.step()
        running.append(parts)
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            avg = {k: round(float(np.mean([r[k] for r in running])), 4) for k in running[0]}
            curve.append({"step": step + 1, "seconds": round(time.time() - started, 1), **avg})
            bar.set_postfix(loss=avg["loss"], iou=avg["train_iou"])
            running = []
        if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps):
            with torch.inference_mode():
                values = _sam_scores(stage, recipe.eval_scenes, VAL_SEED, "val")
            flat = [v for g in values for v in g]
            evals.append({"step": step + 1, "val_mean_mask_iou": round(float(np.mean(flat)), 4), "n": len(flat)})
            bar.write(f"step {step + 1}: val mean mask IoU {evals[-1]['val_mean_mask_iou']:.3f} (n={len(flat)})")
    wall = time.time() - started
    model.eval().save_pretrained(str(out))
    run = {"model": "SamModel", "folder": str(out), "recipe": asdict(recipe), "train_scene_config": "side=(256, 384)",
           "parameters": sum(p.numel() for p in model.parameters()), "config": _sam_config_summary(model.config),
           "wall_seconds": round(wall, 1), "machine": _machine(), "load_average_after": _load_average(),
           "command": command, "loss_curve": curve, "val_curve": evals}
    if evaluate_scenes:
        run["test"] = evaluate_sam(out, evaluate_scenes, progress=progress)
    _write_card(out, "sam", run)
    return run


def _smooth_positions(model, scale: float = 1.0) -> None:
    """Position codes a model trained from scratch can use. Redraws SAM's random Fourier position
    features (image grid and box corners) with the original SAM's scale 1. transformers draws them with std ``hidden_size // 2`` (32 here): at
    that scale neighbouring embedding cells get unrelated codes, a box corner's code says nothing
    about where it is, and a run from scratch stalled at a mean mask IoU of 0.16 (pretrained
    checkpoints load their own values, so only training from scratch meets this)."""
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.normal_(0.0, scale)
        # The image embedding starts with the same Fourier code of each cell's position (the
        # encoder's absolute position embedding starts at zero): the mask head is a per-pixel
        # dot product, and with position in the pixel features "inside this box" is linear from
        # the first step instead of something the encoder must discover.
        grid = model.get_image_wide_positional_embeddings()[0].permute(1, 2, 0)   # (h, w, 2 * num_pos_feats)
        pos = model.vision_encoder.pos_embed
        pos.copy_(grid[None, ..., : pos.shape[-1]] if grid.shape[-1] >= pos.shape[-1] else
                  F.pad(grid, (0, pos.shape[-1] - grid.shape[-1]))[None])


def _sam_config_summary(config) -> dict:
    v, d = config.vision_config, config.mask_decoder_config
    return {"image_size": v.image_size, "patch_size": v.patch_size, "vision_hidden": v.hidden_size,
            "vision_layers": v.num_hidden_layers, "window_size": v.window_size, "global_attn": v.global_attn_indexes,
            "decoder_hidden": d.hidden_size, "decoder_layers": d.num_hidden_layers}


# --- GroundingDINO -----------------------------------------------------------------------------------------

def _phrases(scene: scenes.Scene) -> dict[str, list[int]]:
    """The scene's distinct prompt keys (as the engine normalises them) -> instance ids they name:
    the caption's phrases and the answer's ("the green triangles"), hallucinated ones naming none."""
    from stages.phrase_boxes import normalize_phrase

    keys: dict[str, list[int]] = {}
    for p in [*scene.phrases, *scene.conversation_phrases]:
        key = normalize_phrase(p.text)
        if key and key not in keys:
            keys[key] = list(p.instances)
    return keys


def _detector_example(prep):
    def make(scene: scenes.Scene, index: int):
        h, w = scene.image.shape[:2]
        boxes = {i.id: [(i.box[0] + i.box[2]) / 2 / w, (i.box[1] + i.box[3]) / 2 / h,
                        (i.box[2] - i.box[0]) / w, (i.box[3] - i.box[1]) / h] for i in scene.instances}
        return prep.resize(scene.image), _phrases(scene), boxes
    return make


def _detector_loss(model, prep, tokenizer, batch):
    """One batch's loss; ``model.loss_function`` must be :func:`grounding_dino_loss`."""
    from stages.phrase_boxes import build_prompts

    images, texts, labels = [], [], []
    for image, keys, boxes in batch:
        prompt = build_prompts(list(keys), tokenizer, GDINO_MAX_TEXT_LEN)[0]   # all fit: ~45 tokens at most
        classes, targets = [], []
        for label, key in enumerate(prompt.keys):     # label k = the k-th "."-separated phrase (build_label_maps)
            for i in keys[key]:
                classes.append(label)
                targets.append(boxes[i])
        images.append(image)
        texts.append(prompt.text)
        labels.append({"class_labels": torch.tensor(classes, dtype=torch.long),
                       "boxes": torch.tensor(targets, dtype=torch.float32).reshape(-1, 4)})
    pixel_values, pixel_mask = prep.upload(images, torch.device("cpu"))
    tok = tokenizer(texts, padding="longest", return_tensors="pt")
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=tok["input_ids"],
                attention_mask=tok["attention_mask"], token_type_ids=tok["token_type_ids"], labels=labels)
    proposals, proposal_parts = _proposal_loss(model.config, out, labels, tok)
    loss = out.loss + proposals
    parts = {k: v.item() for k, v in out.loss_dict.items() if k in ("loss_ce", "loss_bbox", "loss_giou")}
    return loss, {"loss": loss.item(), **parts, **proposal_parts}


def _criterion(config):
    """transformers' GroundingDINO criterion (Hungarian matcher; focal, L1 and GIoU losses) with
    one fix: ``_get_target_classes_one_hot`` offsets image i's phrase labels by the phrase count
    of image i itself instead of the phrases of images 0..i-1, so every batch of more than two
    images, or of prompts with different phrase counts, got wrong class targets (or an
    IndexError). Here the offsets are the running sum."""
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss

    class FixedOffsets(GroundingDinoImageLoss):
        def _get_target_classes_one_hot(self, outputs, targets, indices):
            logits, maps = outputs["logits"], outputs["label_maps"]
            offsets = np.cumsum([0] + [len(m) for m in maps[:-1]])
            class_labels = torch.cat([t["class_labels"][j] + int(off) for t, (_, j), off in zip(targets, indices, offsets)])
            onehot = torch.zeros_like(logits, dtype=torch.long)
            onehot[self._get_source_permutation_idx(indices)] = torch.cat(maps, dim=0)[class_labels].to(torch.long)
            return onehot

    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost,
                                            giou_cost=config.giou_cost)
    return FixedOffsets(matcher=matcher, focal_alpha=config.focal_alpha, losses=["labels", "boxes", "cardinality"])


def _weighted(config, parts: dict) -> torch.Tensor:
    """transformers' weights: 2 x focal, ``bbox_loss_coefficient`` x L1, ``giou_loss_coefficient``
    x GIoU, the same for each auxiliary (``_0``, ``_1``, ...) layer."""
    weight = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    total = 0.0
    for key, value in parts.items():
        base = key.rsplit("_", 1)[0] if key[-1].isdigit() else key
        if base in weight:
            total = total + weight[base] * value
    return total


def grounding_dino_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask, outputs_class=None,
                        outputs_coord=None, encoder_logits=None, encoder_pred_boxes=None):
    """Stands in for transformers' ``GroundingDinoForObjectDetectionLoss`` (same signature, set as
    ``model.loss_function``): the same criterion and weights on the decoder's last and auxiliary
    layers, with the label offsets fixed (:func:`_criterion`). Its encoder ("_enc") term is left
    out: it scores the learned query embeddings (``embedding_init_target``) with detached boxes as
    if they were proposals, and teaches nothing; :func:`_proposal_loss` scores the real ones."""
    from transformers.loss.loss_for_object_detection import _set_aux_loss

    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps, "text_mask": text_mask}
    auxiliary = None
    if config.auxiliary_loss:
        auxiliary = _set_aux_loss(outputs_class, outputs_coord)
        for aux in auxiliary:
            aux["label_maps"], aux["text_mask"] = label_maps, text_mask
        outputs["auxiliary_outputs"] = auxiliary
    parts = _criterion(config).to(device)(outputs, labels)
    return _weighted(config, parts), parts, auxiliary


def _proposal_loss(config, out, labels, tok) -> tuple[torch.Tensor, dict[str, float]]:
    """The same criterion on the encoder's dense proposals (every image token's box and phrase
    logits), as the original DINO trains them: the proposal head picks the decoder's starting
    boxes (two-stage) and transformers' loss never trains it."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    logits = out.enc_outputs_class
    # padding tokens carry inf coordinates: keep them finite for the matcher and the box losses
    boxes = out.enc_outputs_coord_logits.clamp(-20, 20).sigmoid()
    parts = _criterion(config)({"logits": logits, "pred_boxes": boxes,
                                    "label_maps": build_label_maps(logits, tok["input_ids"]),
                                    "text_mask": build_text_mask(logits, tok["attention_mask"])}, labels)
    return _weighted(config, parts), {"loss_ce_proposals": parts["loss_ce"].item(),
                                      "loss_giou_proposals": parts["loss_giou"].item()}


def _ground_stage(folder: str | Path | None = None, model=None, processor=None):
    """The engine's GroundStage on the CPU, from a folder or an in-memory model and processor."""
    from stages.ground import DetectConfig, GroundStage

    stage = _with_model(GroundStage(DetectConfig(model=str(folder or "in-memory")), _runtime()), model, processor,
                        "gdino")
    if model is not None:
        stage.max_tokens = min(stage.detect.max_text_tokens, int(model.config.max_text_len))
    return stage


def _detector_scores(stage, n_scenes: int, seed: int, split: str, progress: bool = False) -> list[dict]:
    """Per phrase of each scene: the top-scoring box's IoU with the named instances (best single
    instance, and the union box), its score, and whether the phrase names anything."""
    from stages.phrase_boxes import build_prompts, cxcywh_to_xyxy, phrase_scores

    rows = []
    for index in tqdm(range(n_scenes), desc=f"detector {split}", disable=not progress, leave=False):
        scene = scenes.generate(seed, split, index, EVAL_CONFIG)
        keys = _phrases(scene)
        h, w = scene.image.shape[:2]
        image = stage._prepared(scene.image, None)
        for prompt in build_prompts(list(keys), stage.tokenizer, stage.max_tokens):
            logits, boxes = stage._forward([image], [prompt.text])
            # the engine's phrase score: max sigmoid over the phrase's tokens (thresholds 0: top-1 only)
            _, scores = phrase_scores(logits[0], prompt.spans, 0.0, 0.0)
            xyxy = cxcywh_to_xyxy(boxes[0], w, h)
            for p, key in enumerate(prompt.keys):
                q = int(scores[:, p].argmax())
                box = [min(max(float(v), 0.0), lim) for v, lim in zip(xyxy[q].tolist(), (w, h, w, h))]
                named = [scene.instances[i].box for i in keys[key]]
                row = {"scene": index, "phrase": key, "names": len(named), "score": float(scores[q, p])}
                if named:
                    union = (min(b[0] for b in named), min(b[1] for b in named),
                             max(b[2] for b in named), max(b[3] for b in named))
                    row["iou"] = max(_box_iou(box, b) for b in named)
                    row["union_iou"] = _box_iou(box, union)
                rows.append(row)
    return rows


def _detector_summary(rows: list[dict], n_scenes: int) -> dict:
    named = [r for r in rows if r["names"]]
    by_scene: dict[int, list[float]] = {}
    for r in named:
        by_scene.setdefault(r["scene"], []).append(float(r["iou"] >= 0.5))
    top1 = float(np.mean([r["iou"] >= 0.5 for r in named])) if named else float("nan")
    plural = [r for r in named if r["names"] > 1]
    nothing = [r for r in rows if not r["names"]]
    out = {"n_scenes": n_scenes, "n": len(named), "top1_at_iou50": round(top1, 4),
           "se": round(_cluster_se(list(by_scene.values())), 4),
           "mean_top1_iou": round(float(np.mean([r["iou"] for r in named])), 4) if named else None,
           "singular": {"n": len(named) - len(plural),
                        "top1_at_iou50": round(float(np.mean([r["iou"] >= 0.5 for r in named if r["names"] == 1])), 4)
                        if len(named) > len(plural) else None},
           "plural": {"n": len(plural),
                      "top1_at_iou50_one_instance": round(float(np.mean([r["iou"] >= 0.5 for r in plural])), 4)
                      if plural else None,
                      "top1_at_iou50_union_box": round(float(np.mean([r["union_iou"] >= 0.5 for r in plural])), 4)
                      if plural else None},
           "score_named_median": round(float(np.median([r["score"] for r in named])), 4) if named else None,
           "score_nothing_median": round(float(np.median([r["score"] for r in nothing])), 4) if nothing else None,
           "n_naming_nothing": len(nothing)}
    # the false-grounding picture at a few thresholds: phrases naming nothing whose top box passes
    # (they would be grounded on something), and named phrases whose correct top box passes
    out["at_threshold"] = {str(t): {"nothing_passes": round(float(np.mean([r["score"] >= t for r in nothing])), 4)
                                    if nothing else None,
                                    "named_correct_and_passes": round(float(np.mean(
                                        [r["iou"] >= 0.5 and r["score"] >= t for r in named])), 4) if named else None}
                           for t in (0.2, 0.3, 0.4, 0.5)}
    return out


def evaluate_detector(folder: str | Path, n_scenes: int = 200, seed: int = TEST_SEED, split: str = "test",
                      progress: bool = False, stage=None, threads: int | None = 1) -> dict:
    """Share of phrases naming >= 1 object whose top-scoring box (the engine's phrase score) has
    IoU >= 0.5 with one of the instances they name, on held-out scenes (default scene config);
    plus the union-box IoU for plural phrases and the scores of phrases that name nothing."""
    with torch.inference_mode(), _threads(threads):
        rows = _detector_scores(stage or _ground_stage(folder), n_scenes, seed, split, progress)
    summary = _detector_summary(rows, n_scenes)
    return {"metric": "top-1 box per phrase naming >= 1 object, IoU >= 0.5 with a named instance", "split": split,
            "seed": seed, "scene_config": "default", **summary, "target": TARGETS["detector_top1_at_iou50"],
            "met": bool(summary["top1_at_iou50"] >= TARGETS["detector_top1_at_iou50"])}


def _prior_logits(model, prior: float = 0.01) -> None:
    """Start every box-phrase probability near ``prior``, as DETR-style detectors do.

    GroundingDINO's logits are bias-free dot products of a layer-normed query and a layer-normed
    text token: at random init |logit| ~ 8, sigmoids saturate (most near 1 here) and the focal
    loss starts in the hundreds (an earlier try at lr 1e-3 collapsed). Shrinking the query norms'
    scale and giving the query and text norms opposite biases along one axis makes the expected
    logit log(prior / (1 - prior)) (-4.6) while every weight stays trainable."""
    a = math.sqrt(math.log((1 - prior) / prior))
    text_norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after   # the text features' last op
    with torch.no_grad():
        for norm in (model.model.decoder.layer_norm, model.model.enc_output_norm):
            norm.weight.mul_(0.2)
            norm.bias.zero_()
            norm.bias[0] = a
        text_norm.weight.mul_(0.5)
        text_norm.bias.zero_()
        text_norm.bias[0] = -a


def train_grounding_dino(out_dir: str | Path, steps: int | None = None, seed: int = 0,
                         recipe: DetectorRecipe | None = None, progress: bool = True, evaluate_scenes: int = 200,
                         command: str | None = None) -> dict:
    """Train GroundingDINO from scratch by ``recipe`` with transformers' GroundingDINO loss and
    write the folder ``out_dir``; returns the run's record."""
    return _run_recipe(_train_grounding_dino, recipe or DetectorRecipe(), out_dir, steps, seed, progress,
                       evaluate_scenes, command)


def _train_grounding_dino(recipe, out: Path, progress: bool, evaluate_scenes: int, command: str | None) -> dict:
    from transformers import GroundingDinoForObjectDetection

    from stages.prep import ImagePrep

    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").unlink(missing_ok=True)
    vocab = shapes_vocab()
    tokenizer = write_gdino_tokenizer(out, vocab, model_max_length=GDINO_MAX_TEXT_LEN)
    processor = write_gdino_processor(out, tokenizer, GDINO_SHORTEST_EDGE, GDINO_LONGEST_EDGE)
    seed = recipe.seed
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(grounding_dino_config(len(vocab)))
    _prior_logits(model)
    model.loss_function = grounding_dino_loss
    # GroundingDINO freezes a ResNet's stem and first stage (meant for pretrained weights); from
    # scratch every layer must learn.
    for p in model.parameters():
        p.requires_grad_(True)
    prep = ImagePrep(processor.image_processor, "gdino")
    stage = _ground_stage(model=model, processor=processor)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    data = _batches(_SceneStream("train", seed, TRAIN_CONFIG, _detector_example(prep)), recipe.batch, recipe.workers)
    curve, evals, running = [], [], []
    started = time.time()
    bar = tqdm(range(recipe.steps), desc="train GroundingDINO", disable=not progress)
    for step in bar:
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, recipe.lr, recipe.warmup, recipe.steps)
        loss, parts = _detector_loss(model, prep, tokenizer, next(data))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        optimiser.step()
        running.append(parts)
        if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
            avg = {k: round(float(np.mean([r[k] for r in running if k in r])), 4) for k in running[0]}
            curve.append({"step": step + 1, "seconds": round(time.time() - started, 1), **avg})
            bar.set_postfix(loss=avg["loss"])
            running = []
        if recipe.eval_every and ((step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps):
            with torch.inference_mode():
                summary = _detector_summary(_detector_scores(stage, recipe.eval_scenes, VAL_SEED, "val"),
                                            recipe.eval_scenes)
            evals.append({"step": step + 1, "val_top1_at_iou50": summary["top1_at_iou50"], "n": summary["n"],
                          "val_mean_top1_iou": summary["mean_top1_iou"]})
            bar.write(f"step {step + 1}: val top-1 {summary['top1_at_iou50']:.3f} (n={summary['n']}), "
                      f"mean IoU {summary['mean_top1_iou']:.3f}")
    wall = time.time() - started
    model.eval().save_pretrained(str(out))
    run = {"model": "GroundingDinoForObjectDetection", "folder": str(out), "recipe": asdict(recipe),
           "train_scene_config": "side=(256, 384)", "parameters": sum(p.numel() for p in model.parameters()),
           "config": _gdino_config_summary(model.config), "wall_seconds": round(wall, 1), "machine": _machine(),
           "load_average_after": _load_average(), "command": command, "loss_curve": curve, "val_curve": evals}
    if evaluate_scenes:
        run["test"] = evaluate_detector(out, evaluate_scenes, progress=progress)
    _write_card(out, "detector", run)
    return run


def _gdino_config_summary(config) -> dict:
    b = config.backbone_config
    return {"backbone": f"ResNet basic {b.hidden_sizes} depths {b.depths}", "d_model": config.d_model,
            "encoder_layers": config.encoder_layers, "decoder_layers": config.decoder_layers,
            "num_queries": config.num_queries, "num_feature_levels": config.num_feature_levels,
            "two_stage": config.two_stage, "auxiliary_loss": config.auxiliary_loss,
            "text": f"BERT {config.text_config.num_hidden_layers} layer, hidden {config.text_config.hidden_size}",
            "max_text_len": config.max_text_len,
            "input": f"shortest edge {GDINO_SHORTEST_EDGE}, longest {GDINO_LONGEST_EDGE}"}


# --- model cards and the results file -----------------------------------------------------------------------

def _write_card(folder: Path, kind: str, run: dict) -> None:
    """README.md, written last: what the weights are, how they were made, what they score."""
    r = run["recipe"]
    test = run.get("test") or {}
    if kind == "sam":
        title, loads = "shapes-sam", ("from transformers import SamModel, SamProcessor\n"
                                      f"processor = SamProcessor.from_pretrained('{folder}')\n"
                                      f"model = SamModel.from_pretrained('{folder}')")
        figure = (f"mean mask IoU from the true boxes {test['mean_mask_iou']:.3f} +- {test['se']:.3f} (SE, "
                  f"{test['n']} instances of {test['n_scenes']} test scenes; target >= {test['target']}: "
                  f"{'met' if test['met'] else 'NOT met'})" if test else "not evaluated")
    else:
        title, loads = "shapes-grounding-dino", (
            "from transformers import AutoProcessor, AutoModelForZeroShotObjectDetection\n"
            f"processor = AutoProcessor.from_pretrained('{folder}')\n"
            f"model = AutoModelForZeroShotObjectDetection.from_pretrained('{folder}')")
        figure = (f"top-1 box IoU >= 0.5 for {test['top1_at_iou50']:.1%} +- {test['se']:.1%} (SE) of {test['n']} "
                  f"phrases naming an object in {test['n_scenes']} test scenes (target >= "
                  f"{test['target']:.0%}: {'met' if test['met'] else 'NOT met'})" if test else "not evaluated")
    folder.joinpath("README.md").write_text(f"""# {title}: knows ONLY generated shape scenes

Trained from scratch by Look&Learn's seeded recipe (`devkit/small_models.py`) on the coloured-shape
scenes of `devkit/scenes.py` and nothing else. It knows eleven colours (red, orange, yellow, green,
blue, purple, pink, brown, black, white, gray), eight shapes (circle, square, rectangle, triangle,
star, diamond, hexagon, ellipse) and the size words of those scenes, on plain, gradient, noise and
photo backgrounds. On natural images or other words its outputs are meaningless: it is a stand-in
that makes the offline sample's boxes and masks mean something, not a general model.

- model: `{run['model']}`, {run['parameters']:,} parameters; {json.dumps(run['config'])}
- command: `{run.get('command') or 'devkit.small_models'}`
- recipe: {r['steps']} steps, batch {r['batch']} scenes, AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine to
  a tenth), weight decay {r['weight_decay']}, gradient clip {r['clip']}, seed {r['seed']}; training scenes: split
  `train`, seed {r['seed']}, scene config {run['train_scene_config']}
- training time: {run['wall_seconds'] / 60:.1f} min on {run['machine']} (load average after: {run['load_average_after']})
- held-out figure (split `test`, seed {test.get('seed')}, default scene config): {figure}

Learning curves and the full figures: `bench/results/small-models.json` / `.md` in the repository.

Load it with:

```python
{loads}
```
""")


def write_results(runs: dict[str, dict], json_path: str | Path, md_path: str | Path) -> None:
    """Merge ``{"sam": run, "detector": run}`` into the results JSON (a model not retrained keeps
    its earlier entry) and rewrite the Markdown tables from it."""
    json_path, md_path = Path(json_path), Path(md_path)
    data = json.loads(json_path.read_text()) if json_path.is_file() else {}
    data.setdefault("targets", TARGETS)
    data.update(runs)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(results_markdown(data))


def results_markdown(data: dict) -> str:
    lines = ["# Small trained models (shape scenes only)", "",
             "Written by `lookandlearn small-models train` (`devkit/small_models.py`). Figures: held-out `test` split "
             "scenes at the default scene config (the offline sample's); curves: `val` split. SE: standard error "
             "clustered by scene.", ""]
    lines += ["| model | steps | batch | lr | clip | seed | wall min | figure | value | SE | n | target | met |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, key in (("sam", "mean_mask_iou"), ("detector", "top1_at_iou50")):
        run = data.get(kind)
        if not run:
            continue
        r, t = run["recipe"], run.get("test") or {}
        lines.append(f"| {run['model']} | {r['steps']} | {r['batch']} | {r['lr']} | {r['clip']} | {r['seed']} | "
                     f"{run['wall_seconds'] / 60:.1f} | {key} | {t.get(key)} | {t.get('se')} | {t.get('n')} | "
                     f">= {t.get('target')} | {'yes' if t.get('met') else 'NO'} |")
    for kind, key in (("sam", "val_mean_mask_iou"), ("detector", "val_top1_at_iou50")):
        run = data.get(kind)
        if not run:
            continue
        lines += ["", f"## {run['model']}", "", f"Machine: {run['machine']}; load average after training: "
                  f"{run['load_average_after']}; command: `{run.get('command')}`", "",
                  "| step | minutes | train loss | " + key + " |", "|---|---|---|---|"]
        vals = {e["step"]: e[key] for e in run["val_curve"]}
        for point in run["loss_curve"]:
            if point["step"] in vals:
                lines.append(f"| {point['step']} | {point['seconds'] / 60:.1f} | {point['loss']} | {vals[point['step']]} |")
        if kind == "detector" and run.get("test"):
            t = run["test"]
            lines += ["", f"Singular phrases: {t['singular']}; plural phrases: {t['plural']}; phrases naming "
                      f"nothing: {t['n_naming_nothing']}, median top score {t['score_nothing_median']} (named: "
                      f"{t['score_named_median']}).", "", "| threshold | naming-nothing phrases passing | named "
                      "phrases correct and passing |", "|---|---|---|"]
            lines += [f"| {th} | {v['nothing_passes']} | {v['named_correct_and_passes']} |"
                      for th, v in t["at_threshold"].items()]
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in data["notes"]]
    return "\n".join(lines) + "\n"


@dataclass
class TrainRequest:
    out: Path
    only: str | None = None
    steps: int | None = None
    seed: int = 0
    results: Path | None = None
    evaluate_scenes: dict = field(default_factory=lambda: {"sam": 100, "detector": 200})
    # both at once, SAM in a second process: each recipe uses one torch thread and one
    # scene-drawing worker, so on two cores the two runs take the wall time of the longer one
    parallel: bool = True
    sam_recipe: SamRecipe | None = None          # None: the recipe's defaults (what models/ was trained with)
    detector_recipe: DetectorRecipe | None = None


def _child(queue, kind: str, out: Path, steps: int | None, seed: int, recipe, evaluate_scenes: int,
           command: str | None) -> None:
    """One model's run in its own process (a parallel ``train_both``): ``(kind, "ok", record)`` or
    ``(kind, "error", traceback)`` goes back through ``queue``. Only the detector shows a progress
    bar (two bars would overwrite each other); SAM's val lines still print."""
    try:
        if kind == "sam":
            run = train_sam(out, steps, seed, recipe, evaluate_scenes=evaluate_scenes, command=command, progress=False)
        else:
            run = train_grounding_dino(out, steps, seed, recipe, evaluate_scenes=evaluate_scenes, command=command)
        queue.put((kind, "ok", run))
    except BaseException as exc:   # noqa: BLE001 - reported by the parent, which raises
        import traceback

        queue.put((kind, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _run_children(jobs: dict[str, tuple]) -> dict[str, dict]:
    """Run each ``kind: args`` job of :func:`_child` in a spawned process, at once; the first failure
    (an error, or a process gone without a record: killed, out of memory) stops the others and is
    raised."""
    import multiprocessing
    import queue as queues

    ctx = multiprocessing.get_context("spawn")   # not fork: this process has torch's threads running
    queue = ctx.Queue()
    children = {kind: ctx.Process(target=_child, name=f"train-{kind}", args=(queue, kind, *args))
                for kind, args in jobs.items()}
    for child in children.values():
        child.start()
    runs: dict[str, dict] = {}
    try:
        while len(runs) < len(children):
            try:
                kind, status, value = queue.get(timeout=5)   # drained before join: records are large
            except queues.Empty:
                gone = [k for k, c in children.items() if k not in runs and not c.is_alive()]
                if gone:
                    try:
                        kind, status, value = queue.get(timeout=2)
                    except queues.Empty:
                        kind, status, value = gone[0], "error", (
                            f"the process exited with code {children[gone[0]].exitcode} and no result")
                else:
                    continue
            if status != "ok":
                raise RuntimeError(f"{kind} training (its own process) failed: {value}")
            runs[kind] = value
    finally:
        for child in children.values():
            if child.is_alive() and len(runs) < len(children):
                child.terminate()
            child.join()
    return runs


def train_both(req: TrainRequest, command: str | None = None) -> dict:
    """What ``lookandlearn small-models train`` runs: SAM and GroundingDINO (or one of them), at once
    in two processes when ``req.parallel`` and both are asked for, then the results file."""
    import os

    jobs = {}
    if req.only in (None, "sam"):
        jobs["sam"] = (req.out / SAM_DIR, req.steps, req.seed, req.sam_recipe, req.evaluate_scenes["sam"], command)
    if req.only in (None, "detector"):
        jobs["detector"] = (req.out / GDINO_DIR, req.steps, req.seed, req.detector_recipe,
                            req.evaluate_scenes["detector"], command)
    if len(jobs) == 2 and req.parallel and (os.cpu_count() or 1) >= 2:
        runs = _run_children(jobs)
        runs = {kind: runs[kind] for kind in jobs}
    else:
        runs = {}
        for kind, (out, steps, seed, recipe, scenes_n, cmd) in jobs.items():
            train = train_sam if kind == "sam" else train_grounding_dino
            runs[kind] = train(out, steps, seed, recipe, evaluate_scenes=scenes_n, command=cmd)
    if req.results:
        write_results(runs, req.results, req.results.with_suffix(".md"))
    return runs


def train_small_models_cli(args) -> int:
    """``lookandlearn small-models train OUT [--only sam|detector] [--steps N] [--seed S]``."""
    command = "lookandlearn small-models train " + " ".join(
        [str(args.out)] + ([f"--only {args.only}"] if args.only else []) + ([f"--steps {args.steps}"] if args.steps else [])
        + ([f"--seed {args.seed}"] if args.seed else []) + (["--sequential"] if getattr(args, "sequential", False) else []))
    runs = train_both(TrainRequest(Path(args.out), args.only, args.steps, args.seed,
                                   Path(args.results) if args.results else None,
                                   parallel=not getattr(args, "sequential", False)), command=command)
    for kind, run in runs.items():
        print(f"{kind}: {run['folder']} ({run['wall_seconds'] / 60:.1f} min): {_figure_line(run.get('test'))}")
    return 0


def evaluate_small_models_cli(args) -> int:
    """``lookandlearn small-models evaluate FOLDER...``: the figure of each folder, as JSON lines."""
    for folder in args.folders:
        config = json.loads((Path(folder) / "config.json").read_text())
        if config.get("model_type") == "sam":
            result = evaluate_sam(folder, args.scenes or 100, args.seed, progress=True)
        elif config.get("model_type") == "grounding-dino":
            result = evaluate_detector(folder, args.scenes or 200, args.seed, progress=True)
        else:
            raise ValueError(f"{folder}: not a SAM or GroundingDINO folder (model_type {config.get('model_type')!r})")
        print(json.dumps({"folder": str(folder), **result}))
    return 0


def _figure_line(test: dict | None) -> str:
    if not test:
        return "not evaluated"
    key = "mean_mask_iou" if "mean_mask_iou" in test else "top1_at_iou50"
    return (f"{key} {test[key]} +- {test['se']} (n={test['n']}), target >= {test['target']}: "
            f"{'met' if test['met'] else 'NOT met'}")


__all__ = ["train_sam", "train_grounding_dino", "evaluate_sam", "evaluate_detector", "write_results", "train_both",
           "SamRecipe", "DetectorRecipe", "SAM_DIR", "GDINO_DIR", "TARGETS"]
