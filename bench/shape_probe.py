"""Can the shapes instrument's vision tower tell the shapes apart at all? (issue 11)

The instrument's models never learn shape identity from the language-model loss (shape questions
at ~0.4, chance 0.33, after 1,200-6,000 steps). This probe trains the same CLIP-style tower
(the tiny VLM's vision config) from scratch with a direct signal instead:
:func:`devkit.experiments.shapes_tower.pretrain_tower`, i.e. the features LLaVA reads (hidden
state -2, no CLS token) pooled over the named object's mask into linear shape and colour
classifiers, on fresh 64 px scenes of the instrument's generator (batch 16, AdamW lr 1e-3, one
torch thread). Held-out accuracy on 600 ``test`` scenes every 200 steps. If the tower learns
shape here, perception is learnable and the language-model path is the bottleneck
(``lookandlearn experiment shapes --tower shapes`` starts both arms from such a tower).

    python bench/shape_probe.py [--vision-hidden 32] [--vision-layers 2] [--steps 2000] [--out FILE]
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
    import torch
    from transformers import CLIPVisionModel

    from devkit.experiments.shapes_tower import pretrain_tower
    from devkit.tiny_vlms import clip_vision_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-hidden", type=int, default=32)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON result file (default: print only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    vh = args.vision_hidden
    tower = CLIPVisionModel(clip_vision_config(64, 8, vh, args.vision_layers))   # the instrument's 64 px, 8 px patches
    t0 = time.time()
    curve = pretrain_tower(tower, args.seed, steps=args.steps)
    result = {"benchmark": "shape_probe", "date": time.strftime("%Y-%m-%d"), "vision_hidden": vh,
              "vision_layers": args.vision_layers, "steps": args.steps, "batch": 16, "lr": 1e-3,
              "test_scenes": 600, "chance": {"shape": 0.333, "colour": 0.25}, "curve": curve,
              "seconds": round(time.time() - t0, 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
