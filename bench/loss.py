"""Training-step time and peak memory at LLaVA-1.5 sequence shapes (576 image tokens + ~100
text tokens) for three settings: no attention loss, the where-to-look capture loss, and the
common ``output_attentions=True`` eager approach.

RANDOM weights (timing only). ``--preset cpu``: scaled-down widths so that it runs on a laptop
CPU; ``--preset 7b``: LLaVA-1.5-7B widths (CLIP ViT-L/14-336 + Llama-2-7B: 4096 wide, 32 layers,
32 heads), for a GPU (see bench/loss_gpu.py). Each setting runs in its own subprocess (clean
peak memory: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU); rounds alternate the
settings to spread machine noise; the median step time is reported.

    .venv/bin/python bench/loss.py [--preset cpu|7b] [--device cpu|cuda] [--out bench/results/loss-cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "cpu": dict(hidden=256, layers=6, heads=8, kv_heads=8, inter=512, v_hidden=64, v_layers=1, v_heads=2,
                batch=1, text=100, entity_tokens=24),
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008, v_hidden=1024, v_layers=24, v_heads=16,
               batch=1, text=100, entity_tokens=24),
}
SETTINGS = ("none", "capture", "eager_output_attentions")


def _model(p, attn, device, dtype):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=p["v_hidden"], intermediate_size=4 * p["v_hidden"],
                              num_hidden_layers=p["v_layers"], num_attention_heads=p["v_heads"], image_size=336,
                              patch_size=14, projection_dim=p["v_hidden"])
    text = LlamaConfig(vocab_size=32064, hidden_size=p["hidden"], intermediate_size=p["inter"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["kv_heads"], max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    cfg._attn_implementation = attn
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    return model


def worker(setting: str, preset: str, device: str, steps: int, warmup: int) -> dict:
    import torch

    from stages.train.attention import AttentionCapture, language_layers, middle_third
    from stages.train.loss import wtl_loss

    torch.manual_seed(0)
    p = PRESETS[preset]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = _model(p, "eager" if setting == "eager_output_attentions" else "sdpa", device, dtype)
    model.train()
    big = preset == "7b"
    if big:  # 7B: train the language model's attention projections only (LoRA-like memory), checkpointing
        for n, prm in model.named_parameters():
            prm.requires_grad = any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj")) and "language" in n
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_layers = len(language_layers(model))
    layers = middle_third(n_layers)
    cap = AttentionCapture.attach(model, layers=layers) if setting == "capture" else None
    B, T, E = p["batch"], p["text"], p["entity_tokens"]
    n_img = 576
    L = n_img + T
    ids = torch.randint(0, 32000, (B, L), device=device)
    ids[:, 5: 5 + n_img] = 32000
    pix = torch.randn(B, 3, 336, 336, device=device, dtype=dtype)
    labels = ids.clone()
    labels[:, : 5 + n_img] = -100
    q_index = torch.arange(L - E, L, device=device)[None].expand(B, E).contiguous()
    v_index = torch.arange(5, 5 + n_img, device=device)[None].expand(B, n_img).contiguous()
    n_ent = 4
    qmask = torch.zeros(B * n_ent, E, device=device)
    for e in range(n_ent):
        qmask[e::n_ent, e * (E // n_ent): (e + 1) * (E // n_ent)] = 1.0 / (E // n_ent)
    wtl = {"wtl_q_index": q_index, "wtl_v_index": v_index,
           "wtl_ent_sample": torch.arange(B, device=device).repeat_interleave(n_ent), "wtl_ent_qmask": qmask,
           "wtl_target": torch.rand(B * n_ent, n_img, device=device)}
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6) if not big else None

    def step():
        if setting == "capture":
            cap.set_queries(q_index)
            out = model(input_ids=ids, pixel_values=pix, labels=labels)
            loss = out.loss + wtl_loss(cap.rows, wtl)
        elif setting == "eager_output_attentions":
            out = model(input_ids=ids, pixel_values=pix, labels=labels, output_attentions=True)
            att = out.attentions  # language-model layers (B, H, L, L)
            rows = {i: att[i][:, :, q_index[0]] for i in layers}
            loss = out.loss + wtl_loss(rows, wtl)
        else:
            out = model(input_ids=ids, pixel_values=pix, labels=labels)
            loss = out.loss
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return {"setting": setting, "times": times, "peak_mib": peak, "seq_len": L, "layers": layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", choices=SETTINGS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.device, args.steps, args.warmup)))
        return 0
    res = {s: {"times": [], "peak": []} for s in SETTINGS}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for _ in range(args.rounds):
        for s in SETTINGS:
            r = subprocess.run([sys.executable, __file__, "--worker", s, "--preset", args.preset, "--device",
                                args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                res[s]["error"] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
                continue
            out = json.loads(r.stdout.strip().splitlines()[-1])
            res[s]["times"] += out["times"]
            res[s]["peak"].append(out["peak_mib"])
            res[s]["seq_len"] = out["seq_len"]
            res[s]["layers"] = out["layers"]
    base_t = statistics.median(res["none"]["times"])
    base_m = max(res["none"]["peak"])
    import torch

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    lines = [f"# Where-to-look loss benchmark ({args.preset} preset, {args.device})", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; device: {dev}; torch {torch.__version__}. RANDOM weights, timing only.",
             f"Preset: {json.dumps(PRESETS[args.preset])}; sequence {res['none'].get('seq_len')} tokens "
             f"(576 image + {PRESETS[args.preset]['text']} text), capture layers {res['none'].get('layers') or res['capture'].get('layers')}; "
             f"{args.rounds} rounds × {args.steps} steps per setting, median step time; peak memory = "
             + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak process RSS (includes the Python/torch baseline)"), "",
             "| setting | step time (s, median) | vs none | peak memory (MiB) | vs none |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        if not res[s]["times"]:
            lines.append(f"| {s} | failed: {res[s].get('error')} | | | |")
            continue
        t, m = statistics.median(res[s]["times"]), max(res[s]["peak"])
        lines.append(f"| {s} | {t:.4f} | {100 * (t / base_t - 1):+.1f}% | {m:.0f} | {100 * (m / base_m - 1):+.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
