"""A vision tower that can tell the shapes (and colours) apart before the instrument's training starts.

Through next-token prediction alone the instrument's tower never learns shape identity (shape
questions near chance after 1,200-6,000 steps, at any tower size tried), while the same tower
trained on shape labels directly learns it in about a thousand steps (``bench/shape_probe.py``).
Real VLMs start from a pretrained vision encoder; this gives the tiny one the same start:
:func:`pretrain_tower` trains the VLM's own CLIP-style tower in place, from its seeded random
init, on the features LLaVA reads (hidden state ``vision_feature_layer`` = -2, no CLS token)
pooled over one object's mask into linear shape (3-way) and colour (4-way) classifiers (thrown
away afterwards: a tower taught shape alone forgets colour, and the instrument asks both), on
fresh scenes of the instrument's generator (``train`` stream, indices from 1,000,000 on, apart
from the language-model training scenes). Both arms of a seed then start from the same tower,
frozen, as LLaVA-1.5 freezes CLIP.
"""
from __future__ import annotations

import numpy as np

PRETRAIN_OFFSET = 1_000_000      # scene indices of the tower's pretraining (the LM's start at 0)


def tower_of(model):
    """The CLIP-style vision tower of a LLaVA model (transformers keeps it under ``model.model``)."""
    inner = getattr(model, "model", None)
    return inner.vision_tower if inner is not None and hasattr(inner, "vision_tower") else model.vision_tower


def _batch(seed: int, split: str, start: int, n: int, size: int):
    import torch
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD   # the tiny VLM's processor normalises so

    from devkit.experiments import shapes_tasks as T

    xs, ys, ms = [], [], []
    for i in range(start, start + n):
        sc = T.scene(seed, split, i, size)
        o = T.objects(sc)[0]            # the scene's first shape (one to three per scene)
        xs.append(torch.tensor(sc.image).permute(2, 0, 1).float() / 255)
        ys.append((T.SHAPES.index(o["shape"]), T.COLOURS.index(o["colour"])))
        ms.append(o["mask"])
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (torch.stack(xs) - mean) / std, torch.tensor(ys), torch.tensor(np.stack(ms)).float()   # ys: (n, 2)


def pretrain_tower(tower, seed: int, steps: int = 2000, batch: int = 16, lr: float = 1e-3, size: int = 64,
                   patch: int = 8, test_scenes: int = 600, every: int = 200, log=print) -> list[dict]:
    """Train ``tower`` (a ``CLIPVisionModel``) in place on shape and colour labels; return the curve
    (``step``, ``train_loss``, held-out ``test_acc`` (shape) and ``colour_acc`` on ``test_scenes``
    scenes of the ``test`` stream)."""
    import torch

    from devkit.experiments import shapes_tasks as T

    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.config.hidden_size, len(T.SHAPES) + len(T.COLOURS))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr)
    n_shapes = len(T.SHAPES)

    def losses(logits, y):
        ce = torch.nn.functional.cross_entropy
        return ce(logits[:, :n_shapes], y[:, 0]) + ce(logits[:, n_shapes:], y[:, 1])

    def features(x, masks):
        h = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        share = torch.nn.functional.avg_pool2d(masks[:, None], patch).flatten(1)     # mask share per patch
        return (h * (share / share.sum(1, keepdim=True).clamp_min(1e-6))[..., None]).sum(1)

    xt, yt, mt = _batch(seed, "test", 0, test_scenes, size)
    curve = []
    tower.train()
    for step in range(1, steps + 1):
        x, y, m = _batch(seed, "train", PRETRAIN_OFFSET + step * batch, batch, size)
        loss = losses(head(features(x, m)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                logits = head(features(xt, mt))
            acc = float((logits[:, :n_shapes].argmax(1) == yt[:, 0]).float().mean())
            colour = float((logits[:, n_shapes:].argmax(1) == yt[:, 1]).float().mean())
            curve.append({"step": step, "train_loss": round(float(loss.detach()), 4), "test_acc": round(acc, 4),
                          "colour_acc": round(colour, 4)})
            if log:
                log(f"tower pretraining step {step}: loss {float(loss.detach()):.3f}, held-out shape accuracy "
                    f"{acc:.3f}, colour {colour:.3f}")
    tower.eval()
    return curve
