"""Tiny, randomly initialised checkpoints in the ORIGINAL formats (tests of the original backends).

``write_tiny_sam_checkpoint(path)``: a ``segment_anything`` ``Sam`` with tiny sizes, built by the
package's own classes, its ``state_dict()`` saved with ``torch.save`` as a ``.pth`` exactly like
``sam_vit_h_4b8939.pth`` (same keys, other shapes). Every tensor is random (the relative position
tables too, which the package initialises to zero), so a key that a conversion maps wrongly
changes the outputs. The weights are RANDOM: outputs mean nothing.
"""
from __future__ import annotations

from pathlib import Path

TINY_SAM = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4, img_size=256,
                patch_size=16, mlp_ratio=2.0, out_chans=32, mask_in_chans=4, decoder_depth=2, decoder_mlp_dim=64,
                num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32)


def write_tiny_sam_checkpoint(path: str | Path, seed: int = 0) -> Path:
    import torch

    from stages.backends.segment_anything import SamArch, build_sam

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_sam(SamArch(**TINY_SAM))
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.5)
    torch.save(sam.state_dict(), path)
    return path


__all__ = ["TINY_SAM", "write_tiny_sam_checkpoint"]


TINY_GDINO_CONFIG = dict(
    backbone="swin_T_224_1k", backbone_params=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                    window_size=7),
    hidden_dim=256, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=64,
    enc_n_points=2, dec_n_points=2, fusion_droppath=0.0, image_shortest_edge=256, image_longest_edge=384,
)


def write_tiny_groundingdino(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """A tiny random GroundingDINO in the original format: ``groundingdino_tiny.pth`` (``{"model":
    state_dict}`` as the released files), ``GroundingDINO_tiny.py`` (the package's SwinT-OGC config
    with tiny sizes, and ``backbone_params`` for the tiny Swin) and ``bert-tiny/`` (a tiny BERT config
    and the tiny vocabulary of ``devkit.tiny_models``, which keeps bert-base-uncased's special ids).
    ``hidden_dim`` stays 256: the original encoder hard-codes 256 features for the text positions."""
    import torch
    from transformers import BertConfig, BertTokenizer

    from devkit.tiny_models import _build_vocab
    from stages.backends.groundingdino import build_model, default_config_path, model_args

    folder = Path(folder)
    bert = folder / "bert-tiny"
    bert.mkdir(parents=True, exist_ok=True)
    vocab = _build_vocab()
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizer(vocab_file=...) ignores the file in transformers 5: go through from_pretrained
    BertTokenizer.from_pretrained(str(bert), do_lower_case=True, model_max_length=256).save_pretrained(str(bert))
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=512, type_vocab_size=2,
               pad_token_id=0).save_pretrained(str(bert))
    config = folder / "GroundingDINO_tiny.py"
    lines = [line for line in default_config_path().read_text().splitlines()
             if line.split("=")[0].strip() not in TINY_GDINO_CONFIG and line.split("=")[0].strip() != "text_encoder_type"]
    lines += [f"{k} = {v!r}" for k, v in TINY_GDINO_CONFIG.items()] + [f"text_encoder_type = {str(bert)!r}"]
    config.write_text("\n".join(lines) + "\n")
    torch.manual_seed(seed)
    model = build_model(model_args(str(config)), str(bert))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bbox_embed" in name and name.endswith(("layers.2.weight", "layers.2.bias")):
                param.normal_(0.0, 0.1)  # zero-initialised by the package: random here, so boxes vary
            if name.startswith("transformer.decoder.norm."):
                param.mul_(0.1)  # spread the scores (see devkit/tiny_models.py)
    pth = folder / "groundingdino_tiny.pth"
    torch.save({"model": model.state_dict()}, pth)
    return {"checkpoint": pth, "config": config, "text_encoder": bert}


__all__ += ["TINY_GDINO_CONFIG", "write_tiny_groundingdino"]
