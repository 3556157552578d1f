"""Can the shapes instrument's vision tower tell the shapes apart at all? (issue 11)

The instrument's models never learn shape identity from the language-model loss (shape questions
at ~0.4, chance 0.33, after 1,200-6,000 steps). This probe trains the same CLIP-style tower from
scratch with a direct signal instead: the features LLaVA reads (hidden state -2, no CLS token),
pooled over the named object's mask, into a linear 3-way shape classifier, on fresh 64 px
scenes of the instrument's generator (batch 16, AdamW lr 1e-3, one torch thread). Held-out
accuracy on 600 ``test`` scenes every 200 steps. If the tower learns shape here, perception is
learnable and the language-model path is the bottleneck.

    python bench/shape_probe.py [--vision-hidden 32] [--vision-layers 2] [--steps 1200] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from devkit.experiments import shapes_tasks as T

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-hidden", type=int, default=32)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON result file (default: print only)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    vh = args.vision_hidden
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=vh, intermediate_size=2 * vh,
                                             num_hidden_layers=args.vision_layers, num_attention_heads=4,
                                             image_size=64, patch_size=8))
    head = torch.nn.Linear(vh, len(T.SHAPES))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=1e-3)
    # CLIP's normalisation, as the tiny VLM's image processor applies it
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def batch(split: str, start: int, n: int):
        xs, ys, ms = [], [], []
        for i in range(start, start + n):
            sc = T.scene(args.seed, split, i, 64)
            o = T.objects(sc)[0]            # the scene's first shape (one to three per scene)
            xs.append(torch.tensor(sc.image).permute(2, 0, 1).float() / 255)
            ys.append(T.SHAPES.index(o["shape"]))
            ms.append(o["mask"])
        return (torch.stack(xs) - mean) / std, torch.tensor(ys), torch.tensor(np.stack(ms)).float()

    def features(x, masks):
        h = tower(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        share = torch.nn.functional.avg_pool2d(masks[:, None], 8).flatten(1)     # mask share per 8 px patch
        return (h * (share / share.sum(1, keepdim=True).clamp_min(1e-6))[..., None]).sum(1)

    xt, yt, mt = batch("test", 0, 600)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        x, y, m = batch("train", step * 16, 16)
        loss = torch.nn.functional.cross_entropy(head(features(x, m)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.steps:
            with torch.no_grad():
                acc = float((head(features(xt, mt)).argmax(1) == yt).float().mean())
            curve.append({"step": step, "train_loss": round(float(loss.detach()), 4), "test_acc": round(acc, 4)})
            print(f"step {step}: loss {float(loss.detach()):.3f}, held-out shape accuracy {acc:.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
    result = {"benchmark": "shape_probe", "date": time.strftime("%Y-%m-%d"), "vision_hidden": vh,
              "vision_layers": args.vision_layers, "steps": args.steps, "batch": 16, "lr": 1e-3,
              "test_scenes": 600, "chance": round(1 / len(T.SHAPES), 3), "curve": curve,
              "seconds": round(time.time() - t0, 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
