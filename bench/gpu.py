"""GPU stage benchmark: the pipeline's ground+segment stage against a Grounded-SAM demo loop.

    python bench/gpu.py                      # on a GPU machine (no internet needed)
    python bench/gpu.py --toy --device cpu   # the same code at toy sizes, anywhere (a smoke test)

Models: real-size ARCHITECTURES with RANDOM WEIGHTS, built from their configs (nothing is
downloaded): GroundingDINO tiny (Swin-T + BERT-base) and base (Swin-B + BERT-base), SAM ViT-B and
ViT-H. The image processors are the models' default ones (GroundingDINO: shortest edge 800, longest
1333; SAM: longest edge 1024, padded to 1024x1024). The tokenizer is the project's tiny
bert-layout vocabulary (devkit/tiny_models.py), so prompts tokenize a little differently from
bert-base-uncased; the text encoder is full size. With random weights the scores mean nothing, so
both sides keep exactly one box per phrase (4 phrases, 4 boxes, 4 masks per image): the stage with
thresholds 0 and ``max_boxes_per_phrase=1``, the reference with the top-4 queries. Timings are
what matters here, never the boxes.

Inputs: COCO-like images (3 of 4 are 640x480, 1 of 4 is 480x640), synthetic pixels, 4 noun
phrases each.

* **stage**: ``stages.ground_segment.GroundAndSegment`` called on batches of ``--batch`` rows, as the
  Ray actor calls it, with the images already resized by the CPU half (``PrepareStage``; that
  runs in CPU workers in the pipeline and is timed separately, per CPU core). Output: sample
  records with boxes and COCO-RLE masks. ``bucket`` = the default batching (same input size
  only), ``pad`` = mixed sizes zero-padded into one batch.
* **reference**: one image at a time as the public Grounded-SAM demos do: ``processor(images,
  text)`` -> GroundingDINO -> top boxes to the host -> ``sam_processor(images, input_boxes)`` ->
  SAM -> ``post_process_masks`` on the host; then the same RLE encoding, so both sides produce the
  same thing. Run in float32 (the demos' default) and in bf16 autocast (same precision as the
  stage, to separate what batching/pipelining buys from what bf16 buys).
* **share of the matmul rate**: model FLOPs per image (``torch.utils.flop_counter``: matmuls,
  convolutions, attention; GroundingDINO's deformable-attention sampling is not counted) times
  images/s, over the bf16 matmul rate measured on the same GPU (8192^3 ``torch.matmul``).

``--profile`` adds a per-phase breakdown of one stage call and the top GPU kernels; ``--rle blob``
times the RLE step on object-like masks of the same size (random weights predict noise masks, which
real SAM masks never are), on both sides.

Writes ``--out`` (JSON) and prints a markdown table. Needs torch + transformers (GroundingDINO,
SAM) + torchvision; the masks are encoded by the record module (stages/record/rle.py, pycocotools).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHRASES = ["a man", "a red helmet", "a small moped", "a dirt road", "a brown dog", "a wooden table",
           "two white cups", "a large window", "a green tree", "a blue car", "a tall building",
           "a black cat", "a pizza", "a striped umbrella", "a tennis racket", "a yellow bus"]

CONFIGS = {
    # name: (GroundingDINO Swin backbone, SAM vision encoder)
    "gdino-tiny+sam-vit-b": ("tiny", "vit-b"),
    "gdino-base+sam-vit-h": ("base", "vit-h"),
}


# --- inputs --------------------------------------------------------------------------------

def synthetic_pixels(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    np.full_like(xx, 96)], axis=-1).astype(np.int32)
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    img[y0: y0 + height // 3, x0: x0 + width // 3] = rng.integers(0, 256, size=3)
    img += rng.integers(-20, 21, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_rows(n: int, phrases_per_image: int = 4):
    from stages import record as rec

    images, records = [], []
    for i in range(n):
        h, w = (640, 480) if i % 4 == 3 else (480, 640)
        picked = [PHRASES[(i * 3 + k * 5) % len(PHRASES)] for k in range(phrases_per_image)]
        caption = " and ".join(picked) + "."
        record = rec.new_record(f"bench-{i}", {"dataset": "bench", "id": str(i)}, w, h, "0" * 64,
                                {"caption": caption})
        pos = 0
        for k, phrase in enumerate(picked):
            start = caption.index(phrase, pos)
            pos = start + len(phrase)
            record["entities"].append({"id": k, "phrase": phrase, "start": start, "end": pos, "turn": -1,
                                       "root": phrase.split()[-1], "plural": False, "status": None,
                                       "regions": [], "reason": None,
                                       "expression": {"start": start, "end": pos, "text": phrase}})
        images.append(synthetic_pixels(h, w, i))
        records.append(record)
    return images, records


def make_batch(images, records, start: int, size: int) -> dict:
    from stages import record as rec

    idx = range(start, min(start + size, len(images)))
    pixels = np.empty(len(idx), dtype=object)
    pixels[:] = [images[i] for i in idx]
    return {"key": [records[i]["key"] for i in idx], "shard": [0] * len(idx), "seq": list(idx),
            "status": [rec.ROW_OK] * len(idx), "reason": [""] * len(idx), "image": [b""] * len(idx),
            "ext": ["jpg"] * len(idx), "pixels": pixels, "record": [rec.dumps(records[i]) for i in idx],
            "item": ["{}"] * len(idx), "log": ["[]"] * len(idx)}


# --- models --------------------------------------------------------------------------------

def tiny_tokenizer_dir() -> Path:
    from devkit.tiny_models import write_tiny_models

    root = Path(os.environ.get("LOOKANDLEARN_BENCH_CACHE", tempfile.gettempdir())) / "lookandlearn-bench-tiny"
    return Path(write_tiny_models(root)["grounding-dino-tiny-random"]).parent


def build_models(backbone: str, vit: str, device: torch.device, toy: bool):
    """(gdino, gdino_processor, sam, sam_processor, description) with RANDOM weights."""
    from transformers import (AutoProcessor, AutoTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SamConfig, SamImageProcessor,
                              SamModel, SamProcessor, SamVisionConfig, SwinConfig)

    tiny = tiny_tokenizer_dir()
    if toy:  # the project's tiny random models: same code path, seconds on a CPU
        gdino = GroundingDinoForObjectDetection.from_pretrained(str(tiny / "grounding-dino-tiny-random"))
        gproc = AutoProcessor.from_pretrained(str(tiny / "grounding-dino-tiny-random"))
        sam = SamModel.from_pretrained(str(tiny / "sam-tiny-random"))
        sproc = SamProcessor.from_pretrained(str(tiny / "sam-tiny-random"))
        return gdino.to(device).eval(), gproc, sam.to(device).eval(), sproc, "toy (tiny random test models)"

    swin = {"tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, image_size=224),
            "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12,
                         image_size=384)}[backbone]
    backbone_config = SwinConfig(out_indices=[2, 3, 4], out_features=["stage2", "stage3", "stage4"], **swin)
    gconf = GroundingDinoConfig(backbone_config=backbone_config, disable_custom_kernels=True)  # bert-base text
    vision = {"vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            global_attn_indexes=[2, 5, 8, 11]),
              "vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                            global_attn_indexes=[7, 15, 23, 31])}[vit]
    sconf = SamConfig(vision_config=SamVisionConfig(**vision).to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        gdino = GroundingDinoForObjectDetection(gconf).to(device)  # .to: legacy torch.Tensor() params
        sam = SamModel(sconf).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny / "grounding-dino-tiny-random"))
    gproc = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer)
    sproc = SamProcessor(image_processor=SamImageProcessor())
    return gdino.eval(), gproc, sam.eval(), sproc, f"GroundingDINO-{backbone} + SAM {vit}, RANDOM weights"


def make_stage(gdino, gproc, sam, sproc, device, dtype, batch_size: int, sam_batch: int, batching: str):
    from pipeline.manifest import RuntimeConfig
    from stages.ground import DetectConfig
    from stages.ground_segment import GroundAndSegment, PrepareStage
    from stages.prep import ImagePrep
    from stages.segment import SegmentConfig

    detect = DetectConfig(model="random/grounding-dino", box_threshold=0.0, text_threshold=0.0, nms_iou=0.5,
                          max_boxes_per_phrase=1, max_text_tokens=256, batch_size=batch_size, batching=batching)
    segment = SegmentConfig(model="random/sam", batch_size=sam_batch)
    runtime = RuntimeConfig(device=str(device.type), dtype="auto")
    stage = GroundAndSegment(detect, segment, runtime)
    prep_stage = PrepareStage(detect, segment, runtime)
    for g in (stage.ground, prep_stage.ground):
        g.processor, g.prep = gproc, ImagePrep(gproc.image_processor, "gdino")
    for s in (stage.segment, prep_stage.segment):
        s.processor, s.prep = sproc, ImagePrep(sproc.image_processor, "sam")
    g, s = stage.ground, stage.segment
    g.model, g.device, g.dtype = gdino, device, dtype
    g.max_tokens = min(256, int(getattr(gdino.config, "max_text_len", 256)))
    s.model, s.device, s.dtype = sam, device, dtype
    return stage, prep_stage


# --- timing helpers ------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device, toy: bool) -> float:
    n = 1024 if (toy or device.type != "cuda") else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# --- the two paths ---------------------------------------------------------------------------

def run_stage(stage, prep_stage, images, records, batch: int, device):
    """Prepare (CPU half) every batch first, then time the GPU stage over them."""
    batches = [make_batch(images, records, s, batch) for s in range(0, len(images), batch)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU half timed per core (Ray CPU workers run one thread each)
    t = time.perf_counter()
    prepared = [prep_stage(b) for b in batches]
    prep_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    stage(prepared[0])  # warm-up: kernels, cuDNN/cuBLAS heuristics, allocator
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = prepared[1:] if len(prepared) > 1 else prepared
    n = sum(len(b["key"]) for b in timed)
    t = time.perf_counter()
    outs = [stage(b) for b in timed]
    sync(device)
    elapsed = time.perf_counter() - t
    from stages import record as rec

    regions = [len(rec.loads(r)["regions"]) for o in outs for r in o["record"]]
    masks = sum(1 for o in outs for r in o["record"] for g in rec.loads(r)["regions"] if g.get("mask_rle"))
    return {"images": n, "seconds": round(elapsed, 3), "images_per_s": round(n / elapsed, 2),
            "boxes_per_image": round(sum(regions) / max(len(regions), 1), 2), "masks": masks,
            "batch_rows": batch,
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "cpu_prepare_ms_per_image_one_core": round(prep_s / len(images) * 1000, 2)}


def profile_stage(stage, prep_stage, images, records, batch: int, device) -> dict:
    """Where one stage call's time goes: (a) each phase timed with a device sync around it (this
    serialises the phases, so their sum exceeds the overlapped call), (b) torch.profiler: device
    kernel time against the call's wall time, and the top kernels."""
    import stages.segment as seg_mod

    b = prep_stage(make_batch(images, records, 0, batch))
    stage(b)  # warm
    phases: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync(device)
            t = time.perf_counter()
            r = fn(*a, **k)
            sync(device)
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
            return r
        return wrapper

    saved = (stage.ground.launch, stage.ground.finish, stage.segment.encode, stage.segment.decode, seg_mod.encode_masks)
    stage.ground.launch = timed("detector (issue + run)", saved[0])
    stage.ground.finish = timed("detector results on host (boxes, NMS)", saved[1])
    stage.segment.encode = timed("SAM image encoder", saved[2])
    stage.segment.decode = timed("SAM mask decoder + upscale + copy", saved[3])
    seg_mod.encode_masks = timed("RLE encoding (host)", saved[4])
    try:
        sync(device)
        t = time.perf_counter()
        stage(b)
        sync(device)
        total = time.perf_counter() - t
    finally:
        stage.ground.launch, stage.ground.finish, stage.segment.encode, stage.segment.decode = saved[:4]
        seg_mod.encode_masks = saved[4]
    n = len(b["key"])
    out = {"rows": n, "serialised_ms_per_image": {k: round(v / n * 1000, 2) for k, v in phases.items()},
           "serialised_total_ms_per_image": round(total / n * 1000, 2)}
    out["serialised_ms_per_image"]["other (JSON, records, rows)"] = round((total - sum(phases.values())) / n * 1000, 2)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync(device)
            t = time.perf_counter()
            stage(b)
            sync(device)
            wall = time.perf_counter() - t
        kernels = []
        for evt in prof.key_averages():
            dev_t = getattr(evt, "self_device_time_total", None)
            if dev_t is None:
                dev_t = getattr(evt, "self_cuda_time_total", 0)
            if dev_t:
                kernels.append((dev_t, evt.key, evt.count))
        kernels.sort(reverse=True)
        busy = sum(k[0] for k in kernels) / 1e6
        out.update(profiled_wall_ms_per_image=round(wall / n * 1000, 2),
                   device_busy_ms_per_image=round(busy / n * 1000, 2),
                   device_busy_share=round(busy / wall, 3),
                   top_kernels=[{"ms_per_image": round(k[0] / 1e3 / n, 3), "calls": k[2], "name": k[1][:90]}
                                for k in kernels[:12]])
    return out


def reference_one(image, prompt_text, k, gdino, gproc, sam, sproc, device, dtype):
    """One image the Grounded-SAM demo way; returns (masks (k, H, W) bool numpy, iou numpy)."""
    from PIL import Image

    from stages.models import autocast
    from stages.segment import encode_masks

    pil = Image.fromarray(image)
    inputs = gproc(images=pil, text=prompt_text, return_tensors="pt").to(device)
    with torch.inference_mode(), autocast(device, dtype):
        out = gdino(**inputs)
    probs = out.logits[0].float().sigmoid()
    top = probs.max(dim=-1).values.topk(k).indices
    cx, cy, w, h = out.pred_boxes[0][top].float().unbind(-1)
    H, W = image.shape[:2]
    boxes = (torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
             * torch.tensor([W, H, W, H], device=device)).tolist()  # to the host, as the demos do
    sam_in = sproc(images=pil, input_boxes=[boxes], return_tensors="pt").to(device)
    with torch.inference_mode(), autocast(device, dtype):
        sout = sam(pixel_values=sam_in["pixel_values"], input_boxes=sam_in["input_boxes"], multimask_output=False)
    masks = sproc.image_processor.post_process_masks(
        sout.pred_masks.float().cpu(), sam_in["original_sizes"].cpu(), sam_in["reshaped_input_sizes"].cpu())[0]
    masks = masks[:, 0].numpy()
    encode_masks(masks)  # the dataset needs RLE either way: same work as the stage
    return masks, sout.iou_scores.float().cpu().numpy()


def run_reference(images, records, gdino, gproc, sam, sproc, device, dtype, n: int, tokenizer, max_tokens):
    from stages.phrase_boxes import build_prompts, normalize_phrase

    prompts = []
    for r in records[: n + 2]:
        keys = [normalize_phrase(e["phrase"]) for e in r["entities"]]
        prompts.append((build_prompts(keys, tokenizer, max_tokens)[0].text, len(keys)))
    for i in range(2):  # warm-up
        reference_one(images[i], prompts[i][0], prompts[i][1], gdino, gproc, sam, sproc, device, dtype)
    sync(device)
    t = time.perf_counter()
    for i in range(2, n + 2):
        reference_one(images[i], prompts[i][0], prompts[i][1], gdino, gproc, sam, sproc, device, dtype)
    sync(device)
    elapsed = time.perf_counter() - t
    return {"images": n, "seconds": round(elapsed, 3), "images_per_s": round(n / elapsed, 2), "boxes_per_image": 4}


# --- the GPU path gives the CPU path's results ------------------------------------------------

def check_device_matches_cpu(device, n: int = 8) -> dict:
    """Tiny models, float32 on both: the stage on ``device`` (pinned memory, non-blocking copies,
    batched decoding) against the same stage on the CPU, same inputs."""
    from stages import record as rec
    from stages.record import rle

    images, records = make_rows(n)
    out = {}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    # full float32 on the GPU too (cuDNN convolutions default to TF32): random tiny models have
    # near-tied scores, and TF32 rounding alone can pick another box
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    for dev in (torch.device("cpu"), device):
        gdino, gproc, sam, sproc, _ = build_models("tiny", "vit-b", dev, toy=True)
        stage, prep_stage = make_stage(gdino, gproc, sam, sproc, dev, torch.float32, 4, 4, "bucket")
        batch = prep_stage(make_batch(images, records, 0, n))
        out[dev.type] = [rec.loads(r) for r in stage(batch)["record"]]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
    boxes = ious = 0
    worst_box, worst_iou = 0.0, 1.0
    for a, b in zip(out["cpu"], out[device.type]):
        assert len(a["regions"]) == len(b["regions"]), (a["key"], len(a["regions"]), len(b["regions"]))
        for ra, rb in zip(a["regions"], b["regions"]):
            boxes += 1
            worst_box = max(worst_box, float(np.abs(np.subtract(ra["box_xyxy"], rb["box_xyxy"])).max()))
            ma, mb = rle.decode(ra["mask_rle"]), rle.decode(rb["mask_rle"])
            union = np.logical_or(ma, mb).sum()
            iou = np.logical_and(ma, mb).sum() / union if union else 1.0
            ious += 1
            worst_iou = min(worst_iou, float(iou))
    return {"images": n, "regions": boxes, "max_box_diff_px": round(worst_box, 3), "min_mask_iou": round(worst_iou, 4),
            "ok": worst_box < 1.0 and worst_iou > 0.9}


def use_blob_masks_for_rle() -> None:
    """Time the RLE of object-like masks (what real SAM weights give) instead of random-weight noise:
    ``stages.segment.encode_masks`` encodes, for each mask, an ellipse of the same size (both the stage
    and the reference call it). The stored RLEs are then not the predicted masks: timing only."""
    import stages.segment as seg

    real = seg.encode_masks
    blobs: dict = {}

    def encode_blobs(masks):
        masks = np.asarray(masks)
        if len(masks) == 0:
            return []
        n, h, w = masks.shape
        if (h, w) not in blobs:
            yy, xx = np.mgrid[0:h, 0:w]
            blobs[(h, w)] = ((xx - w / 2) / (w / 4)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2 <= 1
        return real(np.repeat(blobs[(h, w)][None], n, axis=0))

    seg.encode_masks = encode_blobs


# --- main ----------------------------------------------------------------------------------

def machine(device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    info["rle_encoder"] = "pycocotools"  # stages/record/rle.py
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    multiprocessors=p.multi_processor_count)
    else:
        info["gpu"] = None
    return info


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"GPU stage vs Grounded-SAM demo loop on **{m.get('gpu') or 'CPU'}** "
             f"(torch {m['torch']}, transformers {m['transformers']}); RANDOM weights, real-size architectures"
             + (" (TOY sizes)" if result["toy"] else "")
             + ("; RLE timed on object-like masks of the same size (--rle blob)" if result.get("rle") == "blob" else "")
             + ".",
             f"Measured bf16 matmul rate: {result['matmul_tflops']:.0f} TFLOP/s." if result.get("matmul_tflops") else "",
             "", "| config | stage mode | stage img/s | ref fp32 img/s | ref bf16 img/s | vs fp32 | vs bf16 "
             "| GFLOP/img | share of matmul rate | CPU prep ms/img/core |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["configs"]:
        r32 = (c.get("reference_fp32") or {}).get("images_per_s")
        r16 = (c.get("reference_bf16") or {}).get("images_per_s")
        for mode, s in (c.get("stage") or {}).items():
            ips = s.get("images_per_s")
            share = s.get("share_of_matmul_rate")
            lines.append(f"| {c['name']} | {mode} | {ips} | {r32} | {r16} | "
                         f"{(ips / r32) if ips and r32 else float('nan'):.2f}x | "
                         f"{(ips / r16) if ips and r16 else float('nan'):.2f}x | "
                         f"{c.get('gflops_per_image', float('nan')):.0f} | "
                         f"{(share * 100) if share is not None else float('nan'):.1f}% | "
                         f"{s.get('cpu_prepare_ms_per_image_one_core')} |")
    if result.get("errors"):
        lines += ["", "Errors: " + "; ".join(e.splitlines()[-1] for e in result["errors"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--toy", action="store_true", help="tiny models (CPU smoke test)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--modes", default="bucket,pad")
    ap.add_argument("--images", type=int, default=128, help="timed images for the stage (plus one warm-up batch)")
    ap.add_argument("--batch", type=int, default=64, help="rows per stage call (runtime.cpu_batch_size)")
    ap.add_argument("--det-batch", type=int, default=16, help="detect.batch_size")
    ap.add_argument("--sam-batch", type=int, default=8, help="segment.batch_size")
    ap.add_argument("--ref-images", type=int, default=12)
    ap.add_argument("--rle", choices=("real", "blob"), default="real",
                    help="blob: RLE-encode an object-like mask of the same size instead of each predicted mask "
                         "(random weights predict noise masks, ~10^5 runs each, which real SAM masks never are); "
                         "both sides, timing only")
    ap.add_argument("--profile", action="store_true", help="also break one stage call down (phases, kernels)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
    args = ap.parse_args(argv)

    started = time.perf_counter()
    if args.rle == "blob":
        use_blob_masks_for_rle()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from stages.models import resolve_dtype

    dtype = resolve_dtype("auto", device)
    result = {"benchmark": "gpu", "weights": "RANDOM (real-size architectures, no checkpoint)", "toy": args.toy,
              "rle": args.rle,
              "machine": machine(device), "dtype": str(dtype), "configs": [], "errors": []}
    print(json.dumps(result["machine"]), flush=True)
    try:
        result["matmul_tflops"] = round(matmul_tflops(device, args.toy), 1)
    except Exception:
        result["errors"].append(traceback.format_exc())
    if device.type != "cpu":
        try:
            result["device_matches_cpu"] = check_device_matches_cpu(device)
            print("device vs cpu:", result["device_matches_cpu"], flush=True)
        except Exception:
            result["errors"].append("device_matches_cpu: " + traceback.format_exc())
            print(result["errors"][-1], flush=True)
    n_total = args.images + args.batch
    images, records = make_rows(max(n_total, args.ref_images + 2))

    def over() -> bool:
        return time.perf_counter() - started > args.budget_s

    for name in [c for c in args.configs.split(",") if c]:
        if over():
            result["errors"].append(f"{name}: skipped, over the time budget")
            continue
        backbone, vit = CONFIGS[name]
        entry = {"name": name, "stage": {}}
        result["configs"].append(entry)
        try:
            t = time.perf_counter()
            gdino, gproc, sam, sproc, desc = build_models(backbone, vit, device, args.toy)
            entry.update(models=desc, build_seconds=round(time.perf_counter() - t, 1),
                         params_m={"gdino": round(sum(p.numel() for p in gdino.parameters()) / 1e6, 1),
                                   "sam": round(sum(p.numel() for p in sam.parameters()) / 1e6, 1)})
            print(f"[{name}] built {desc} in {entry['build_seconds']}s", flush=True)
            stage, prep_stage = make_stage(gdino, gproc, sam, sproc, device, dtype, args.det_batch, args.sam_batch,
                                           "bucket")
            from stages.phrase_boxes import build_prompts, normalize_phrase
            keys = [normalize_phrase(e["phrase"]) for e in records[0]["entities"]]
            prompt = build_prompts(keys, gproc.tokenizer, stage.ground.max_tokens)[0].text
            entry["gflops_per_image"] = count_flops(
                lambda: reference_one(images[0], prompt, 4, gdino, gproc, sam, sproc, device, dtype)) / 1e9
        except Exception:
            result["errors"].append(f"{name}: " + traceback.format_exc())
            print(result["errors"][-1], flush=True)
            continue
        if args.profile and not over():
            try:
                entry["profile"] = profile_stage(stage, prep_stage, images, records, args.batch, device)
                print(f"[{name}] profile: {json.dumps(entry['profile'])}", flush=True)
            except Exception:
                result["errors"].append(f"{name}/profile: " + traceback.format_exc())
                print(result["errors"][-1], flush=True)
        for mode in [m for m in args.modes.split(",") if m]:
            if over():
                result["errors"].append(f"{name}/{mode}: skipped, over the time budget")
                continue
            try:
                stage.ground.detect.batching = mode
                s = run_stage(stage, prep_stage, images[:n_total], records[:n_total], args.batch, device)
                if result.get("matmul_tflops") and entry.get("gflops_per_image"):
                    s["share_of_matmul_rate"] = round(
                        entry["gflops_per_image"] * s["images_per_s"] / 1e3 / result["matmul_tflops"], 4)
                entry["stage"][mode] = s
                print(f"[{name}] stage {mode}: {s}", flush=True)
            except Exception:
                result["errors"].append(f"{name}/{mode}: " + traceback.format_exc())
                print(result["errors"][-1], flush=True)
        for label, ref_dtype in (("reference_fp32", torch.float32), ("reference_bf16", dtype)):
            if label == "reference_bf16" and ref_dtype == torch.float32:
                continue
            if over():
                result["errors"].append(f"{name}/{label}: skipped, over the time budget")
                continue
            try:
                r = run_reference(images, records, gdino, gproc, sam, sproc, device, ref_dtype, args.ref_images,
                                  gproc.tokenizer, stage.ground.max_tokens)
                entry[label] = r
                print(f"[{name}] {label}: {r}", flush=True)
            except Exception:
                result["errors"].append(f"{name}/{label}: " + traceback.format_exc())
                print(result["errors"][-1], flush=True)
        ref = (entry.get("reference_fp32") or {}).get("images_per_s")
        best = max((s["images_per_s"] for s in entry["stage"].values()), default=None)
        if ref and best:
            entry["speedup_vs_reference_fp32"] = round(best / ref, 2)
        ref16 = (entry.get("reference_bf16") or {}).get("images_per_s")
        if ref16 and best:
            entry["speedup_vs_reference_bf16"] = round(best / ref16, 2)
        del stage, prep_stage, gdino, sam
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # partial results survive a kill
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["summary_markdown"] = markdown(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(result["summary_markdown"])
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
