"""The tiny RANDOM GroundingDINO / SAM folders: complete, loadable through from_pretrained,
consistent sizes, deterministic bytes, not rewritten when complete."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from conftest_models import GDINO, SAM, gdino_dir, random_pixels, sam_dir  # noqa: F401


@contextlib.contextmanager
def _one_thread():
    """Time with one intra-op thread: on a shared 2-core box, thread contention (not the model)
    dominates, and 'well under a second' is about the model's size."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_folders_hold_config_weights_processor_and_readme(tiny_models):
    assert set(tiny_models) == {GDINO, SAM}
    for name in (GDINO, SAM):
        folder = tiny_models[name]
        for file in ("config.json", "model.safetensors", "processor_config.json", "README.md"):
            assert (folder / file).is_file(), f"{name}/{file} missing"
        readme = (folder / "README.md").read_text()
        assert "RANDOM" in readme and "NOT A REAL MODEL" in readme
    for file in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_models[GDINO] / file).is_file()


def test_grounding_dino_loads_and_runs_fast(gdino_dir):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
    from transformers.models.grounding_dino import modeling_grounding_dino

    processor = AutoProcessor.from_pretrained(gdino_dir)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(gdino_dir).eval()
    tok = processor.tokenizer
    # The model hard-codes BERT ids for [CLS], [SEP], '.', '?': the tiny vocabulary must agree.
    assert tok.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == list(modeling_grounding_dino.SPECIAL_TOKENS)
    ids = tok("a man . a red helmet .")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and ids.count(1012) == 2 and tok.unk_token_id not in ids
    assert processor.image_processor.size["longest_edge"] <= 512

    image = random_pixels(480, 640)
    inputs = processor(images=[image], text=["a man . a red helmet ."], return_tensors="pt")
    with torch.inference_mode(), _one_thread():
        model(**inputs)  # warm-up
        elapsed = min(_timed(lambda: model(**inputs)) for _ in range(3))
        out = model(**inputs)
    assert out.logits.shape[-1] == model.config.max_text_len
    assert out.pred_boxes.shape[:2] == out.logits.shape[:2]
    assert elapsed < 1.0, f"tiny GroundingDINO took {elapsed:.2f}s on 640x480"


def test_sam_loads_and_sizes_are_consistent(sam_dir):
    from transformers import SamModel, SamProcessor

    processor = SamProcessor.from_pretrained(sam_dir)
    model = SamModel.from_pretrained(sam_dir).eval()
    cfg = model.config
    size = cfg.vision_config.image_size
    assert processor.image_processor.size["longest_edge"] == size
    assert processor.image_processor.pad_size == {"height": size, "width": size}
    assert cfg.prompt_encoder_config.image_size == size
    assert cfg.prompt_encoder_config.image_embedding_size == size // cfg.vision_config.patch_size

    image = random_pixels(480, 640)
    enc = processor(images=[image], input_boxes=[[[10.0, 20.0, 300.0, 400.0]]], return_tensors="pt")
    with torch.inference_mode(), _one_thread():
        emb = model.get_image_embeddings(enc["pixel_values"])
        out = model(image_embeddings=emb, input_boxes=enc["input_boxes"], multimask_output=False)
        elapsed = min(_timed(lambda: model(image_embeddings=model.get_image_embeddings(enc["pixel_values"]),
                                           input_boxes=enc["input_boxes"], multimask_output=False))
                      for _ in range(3))
    assert emb.shape[-1] == cfg.prompt_encoder_config.image_embedding_size
    masks = processor.post_process_masks(out.pred_masks, enc["original_sizes"], enc["reshaped_input_sizes"])
    assert tuple(masks[0].shape[-2:]) == (480, 640)
    assert elapsed < 1.0, f"tiny SAM took {elapsed:.2f}s on 640x480"


def test_deterministic_bytes_and_no_rewrite(tiny_models, tmp_path):
    from devkit.tiny_models import write_tiny_models

    again = write_tiny_models(tmp_path / "again")
    for name in (GDINO, SAM):
        for file in sorted(p.name for p in tiny_models[name].iterdir()):
            assert (tiny_models[name] / file).read_bytes() == (again[name] / file).read_bytes(), f"{name}/{file}"
    # A complete folder is left alone ...
    stamp = {p: p.stat().st_mtime_ns for p in again[SAM].iterdir()}
    write_tiny_models(tmp_path / "again")
    assert {p: p.stat().st_mtime_ns for p in again[SAM].iterdir()} == stamp
    # ... an incomplete one is rewritten.
    (again[SAM] / "model.safetensors").unlink()
    write_tiny_models(tmp_path / "again")
    assert (again[SAM] / "model.safetensors").read_bytes() == (tiny_models[SAM] / "model.safetensors").read_bytes()


def test_tokenizer_covers_caption_words(gdino_dir):
    from transformers import AutoTokenizer

    from devkit.tiny_models import CAPTION_WORDS

    tok = AutoTokenizer.from_pretrained(gdino_dir)
    vocab = tok.get_vocab()
    assert all(word in vocab for word in CAPTION_WORDS)
    # Unknown words fall back to character pieces, never [UNK], for ASCII text.
    ids = tok("zyzzyva xylophone!", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) > 2
    assert np.all(np.asarray(ids) < len(vocab))
