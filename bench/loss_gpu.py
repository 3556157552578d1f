"""GPU version of bench/loss.py: LLaVA-1.5-7B widths (CLIP ViT-L/14-336 + Llama-2-7B, RANDOM
weights: timing and memory only), bf16, gradient checkpointing, the language model's attention
projections trainable (LoRA-like memory), 576 image + 100 text tokens, on one H100:

    .venv/bin/python bench/loss_gpu.py            # writes bench/results/loss-gpu.md

Not run in this repository's CPU-only CI; numbers are to be committed when run on a borrowed GPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--preset", "7b", "--device", "cuda", "--steps", "5", "--warmup", "2", "--rounds", "2",
                   "--out", "bench/results/loss-gpu.md"] + sys.argv[1:]))
