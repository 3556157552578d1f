"""Tiny, randomly initialised checkpoints of the other model families (issue 12, item 4).

``write_tiny_family(out_dir, family)`` writes one Hugging Face style folder for a family that
``detect.model`` / ``segment.model`` accept besides GroundingDINO and SAM (those two are in
``devkit/tiny_models.py``)::

    mm-grounding-dino   out_dir/mm-grounding-dino-tiny-random/  (MMGroundingDinoForObjectDetection, BERT vocab)
    owlv2               out_dir/owlv2-tiny-random/              (Owlv2ForObjectDetection, tiny CLIP BPE)
    sam_hq              out_dir/sam-hq-tiny-random/             (SamHQModel + SamHQProcessor)
    sam2                out_dir/sam2-tiny-random/               (Sam2Model + Sam2Processor)
    sam3                out_dir/sam3-tiny-random/               (Sam3Model + Sam3Processor, tiny CLIP BPE)

They load through ``from_pretrained`` like the real checkpoints, so the stages run their real
code paths. Every weight is RANDOM: outputs are noise and must never be presented as results.
Everything is derived from a fixed seed.
"""
from __future__ import annotations

import json
from pathlib import Path

from devkit.tiny_models import CAPTION_WORDS, DEFAULT_SEED, GENERATOR_VERSION, _build_vocab, _complete, _readme

FAMILY_DIRS = {
    "mm-grounding-dino": "mm-grounding-dino-tiny-random",
    "owlv2": "owlv2-tiny-random",
    "sam_hq": "sam-hq-tiny-random",
    "sam2": "sam2-tiny-random",
    "sam3": "sam3-tiny-random",
}
# words of the generated sample scenes (devkit/scenes.py), one token each in the tiny CLIP vocabulary
_SHAPE_WORDS = "circle circles square squares triangle triangles rectangle star shape shapes disk ring".split()
_FILES = ("config.json", "model.safetensors", "processor_config.json", "README.md")


def _clip_tokenizer(folder: Path, max_length: int):
    """A tiny CLIP BPE tokenizer: byte-level characters plus merges that make each caption word
    one token (so prompts stay short), saved to ``folder``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted(set(CAPTION_WORDS) | set(_SHAPE_WORDS)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            pair = (cur, nxt)
            cur = cur + nxt
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(cur, len(vocab))
    # special tokens last, as in CLIP (OWLv2 treats a query whose first id is 0 as padding)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    return tok


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = _build_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer.from_pretrained(str(folder), do_lower_case=True, model_max_length=256), len(vocab)


def _clean_tokenizer_config(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        for key in ("is_local", "local_files_only", "name_or_path"):
            cfg.pop(key, None)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_mm_grounding_dino(folder: Path, seed: int) -> str:
    import torch
    from transformers import (BertConfig, GroundingDinoImageProcessor, GroundingDinoProcessor,
                              MMGroundingDinoConfig, MMGroundingDinoForObjectDetection, SwinConfig)

    tokenizer, vocab_size = _bert_tokenizer(folder)
    backbone = SwinConfig(image_size=384, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=7, mlp_ratio=2.0, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
    config = MMGroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_queries=64, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=256, dropout=0.0,
        fusion_droppath=0.0, disable_custom_kernels=True)
    torch.manual_seed(seed)
    model = MMGroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():
        # The contrastive heads start at bias -4.6 (every score ~0.01, so no threshold would
        # bite): zero it, so random scores spread around 0.5 as the tiny GroundingDINO's do.
        for head in [*model.class_embed, model.model.encoder_output_class_embed]:
            head.bias.zero_()
    model.save_pretrained(str(folder))
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 256, "longest_edge": 384})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return "from transformers import AutoProcessor, AutoModelForZeroShotObjectDetection"


def _write_owlv2(folder: Path, seed: int) -> str:
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = _clip_tokenizer(folder, 16)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=128, patch_size=16),
        projection_dim=32)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():  # random box offsets would push every box to a corner: keep them small
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(str(folder))
    image_processor = Owlv2ImageProcessor(size={"height": 128, "width": 128})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return "from transformers import Owlv2Processor, Owlv2ForObjectDetection"


def _write_sam_hq(folder: Path, seed: int) -> str:
    import torch
    from transformers import (SamHQConfig, SamHQMaskDecoderConfig, SamHQModel, SamHQProcessor,
                              SamHQPromptEncoderConfig, SamHQVisionConfig, SamImageProcessor)

    width, size, patch = 32, 256, 16
    vision = SamHQVisionConfig(hidden_size=32, output_channels=width, num_hidden_layers=2, num_attention_heads=2,
                               image_size=size, patch_size=patch, mlp_ratio=2.0, window_size=4,
                               global_attn_indexes=[1], num_pos_feats=width // 2)
    prompt = SamHQPromptEncoderConfig(hidden_size=width, image_size=size, patch_size=patch, mask_input_channels=4)
    decoder = SamHQMaskDecoderConfig(hidden_size=width, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                     iou_head_hidden_dim=32, vit_dim=32)
    config = SamHQConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    torch.manual_seed(seed)
    SamHQModel(config).eval().save_pretrained(str(folder))
    low = 4 * (size // patch)
    image_processor = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                                        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})
    SamHQProcessor(image_processor=image_processor).save_pretrained(str(folder))
    return "from transformers import SamHQModel, SamHQProcessor"


def _write_sam2(folder: Path, seed: int) -> str:
    import torch
    from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2ImageProcessor, Sam2MaskDecoderConfig, Sam2Model,
                              Sam2Processor, Sam2PromptEncoderConfig, Sam2VisionConfig)

    size, width = 128, 32
    dims = [16, 32, 64, 128]
    backbone = Sam2HieraDetConfig(hidden_size=dims[0], num_attention_heads=1, image_size=[size, size],
                                  blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=dims,
                                  num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                                  global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4],
                                  mlp_ratio=2.0)
    grid = size // 4
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=dims[::-1],
                              backbone_feature_sizes=[[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]],
                              fpn_hidden_size=width)
    prompt = Sam2PromptEncoderConfig(hidden_size=width, image_size=size, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(hidden_size=width, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                    iou_head_hidden_dim=32)
    config = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    torch.manual_seed(seed)
    Sam2Model(config).eval().save_pretrained(str(folder))
    image_processor = Sam2ImageProcessor(size={"height": size, "width": size},
                                         mask_size={"height": grid, "width": grid})
    Sam2Processor(image_processor=image_processor).save_pretrained(str(folder))
    return "from transformers import Sam2Model, Sam2Processor"


def _write_sam3(folder: Path, seed: int) -> str:
    import torch
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    tokenizer = _clip_tokenizer(folder, 32)
    hidden, size, patch = 32, 112, 14
    grid = size // patch
    config = Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=size, patch_size=patch, window_size=4, global_attn_indexes=[1],
                                 pretrain_image_size=size),
            fpn_hidden_size=hidden, backbone_feature_sizes=[[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, projection_dim=hidden,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        geometry_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=64,
                                     dropout=0.0),
        detr_encoder_config=dict(hidden_size=hidden, num_layers=1, num_attention_heads=2, intermediate_size=64,
                                 dropout=0.0),
        detr_decoder_config=dict(hidden_size=hidden, num_layers=2, num_queries=16, num_attention_heads=2,
                                 intermediate_size=64, dropout=0.0),
        mask_decoder_config=dict(hidden_size=hidden, num_attention_heads=2),
    )
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    with torch.no_grad():
        # At init (std 0.02) every query predicts the same centred box with the same score, so NMS
        # leaves one box per phrase. Wider random queries, reference points and scoring projections
        # give boxes and scores that differ between queries and phrases (still meaningless).
        decoder, scoring = model.detr_decoder, model.dot_product_scoring
        for param, std in ((decoder.query_embed.weight, 1.0), (decoder.reference_points.weight, 1.0),
                           (decoder.box_head.layer3.weight, 0.5), (scoring.text_proj.weight, 0.3),
                           (scoring.query_proj.weight, 0.3)):
            param.normal_(0.0, std)
    model.save_pretrained(str(folder))
    image_processor = Sam3ImageProcessor(size={"height": size, "width": size})
    Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return "from transformers import Sam3Model, Sam3Processor"


_WRITERS = {"mm-grounding-dino": _write_mm_grounding_dino, "owlv2": _write_owlv2, "sam_hq": _write_sam_hq,
            "sam2": _write_sam2, "sam3": _write_sam3}


def write_tiny_family(out_dir: str | Path, family: str, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Write the tiny random folder of ``family`` (a key of :data:`FAMILY_DIRS`) under ``out_dir``;
    a complete folder is left alone unless ``force``. Returns the folder."""
    if family not in _WRITERS:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(_WRITERS)}")
    folder = Path(out_dir) / FAMILY_DIRS[family]
    if not force and _complete(folder, _FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").unlink(missing_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        loads = _WRITERS[family](folder, seed)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _clean_tokenizer_config(folder)
    (folder / "README.md").write_text(_readme(folder.name, loads, seed))
    return folder


__all__ = ["FAMILY_DIRS", "write_tiny_family", "GENERATOR_VERSION"]
