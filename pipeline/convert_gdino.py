"""``lookandlearn convert groundingdino``: an original GroundingDINO checkpoint -> a transformers folder.

The key mapping is transformers' ``convert_grounding_dino_to_hf.py`` (``create_rename_keys`` and
``read_in_q_k_v``: the Swin ``qkv`` matrices split into query / key / value); the architecture
comes from the original config file (``detect.config``) and the BERT config / tokenizer from the
text-encoder folder, so every size converts, not only the two released ones.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.convert import ConvertError

_BACKBONE = "model.backbone.conv_encoder.model."
_SWIN_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after",
               "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
               "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_DEFORMABLE = {"self_attn.sampling_offsets": "deformable_layer.self_attn.sampling_offsets",
               "self_attn.attention_weights": "deformable_layer.self_attn.attention_weights",
               "self_attn.value_proj": "deformable_layer.self_attn.value_proj",
               "self_attn.output_proj": "deformable_layer.self_attn.output_proj",
               "norm1": "deformable_layer.self_attn_layer_norm", "linear1": "deformable_layer.fc1",
               "linear2": "deformable_layer.fc2", "norm2": "deformable_layer.final_layer_norm"}
_TEXT_ENHANCER = {"self_attn.in_proj_weight": "text_enhancer_layer.self_attn.in_proj_weight",
                  "self_attn.in_proj_bias": "text_enhancer_layer.self_attn.in_proj_bias",
                  "self_attn.out_proj": "text_enhancer_layer.self_attn.out_proj",
                  "linear1": "text_enhancer_layer.fc1", "linear2": "text_enhancer_layer.fc2",
                  "norm1": "text_enhancer_layer.layer_norm_before", "norm2": "text_enhancer_layer.layer_norm_after"}
_FUSION = {"gamma_v": "fusion_layer.vision_param", "gamma_l": "fusion_layer.text_param",
           "layer_norm_v": "fusion_layer.layer_norm_vision", "layer_norm_l": "fusion_layer.layer_norm_text",
           "attn.v_proj": "fusion_layer.attn.vision_proj", "attn.l_proj": "fusion_layer.attn.text_proj",
           "attn.values_v_proj": "fusion_layer.attn.values_vision_proj",
           "attn.values_l_proj": "fusion_layer.attn.values_text_proj",
           "attn.out_v_proj": "fusion_layer.attn.out_vision_proj", "attn.out_l_proj": "fusion_layer.attn.out_text_proj"}
_DECODER = {"cross_attn.sampling_offsets": "encoder_attn.sampling_offsets",
            "cross_attn.attention_weights": "encoder_attn.attention_weights",
            "cross_attn.value_proj": "encoder_attn.value_proj", "cross_attn.output_proj": "encoder_attn.output_proj",
            "norm1": "encoder_attn_layer_norm", "ca_text.in_proj_weight": "encoder_attn_text.in_proj_weight",
            "ca_text.in_proj_bias": "encoder_attn_text.in_proj_bias", "ca_text.out_proj": "encoder_attn_text.out_proj",
            "catext_norm": "encoder_attn_text_layer_norm", "self_attn.in_proj_weight": "self_attn.in_proj_weight",
            "self_attn.in_proj_bias": "self_attn.in_proj_bias", "self_attn.out_proj": "self_attn.out_proj",
            "norm2": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2", "norm3": "final_layer_norm"}
_PREFIXES = (("bert.", "model.text_backbone."), ("input_proj.", "model.input_proj_vision."),
             ("feat_map.", "model.text_projection."),
             ("transformer.decoder.ref_point_head.", "model.decoder.reference_points_head."),
             ("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."),
             ("transformer.enc_output", "model.enc_output"),
             ("transformer.enc_out_bbox_embed.", "model.encoder_output_bbox_embed."),
             ("transformer.level_embed", "model.level_embed"), ("transformer.decoder.norm.", "model.decoder.layer_norm."),
             ("transformer.tgt_embed.", "model.query_position_embeddings."))


def _sub(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def _rename(key: str) -> str | None:
    """One original key -> its transformers key (None: the key has no counterpart, e.g. buffers)."""
    parts = key.split(".")
    if key.startswith("backbone.0."):
        rest = key[len("backbone.0."):]
        if rest.startswith("patch_embed.proj."):
            return _BACKBONE + "embeddings.patch_embeddings.projection." + parts[-1]
        if rest.startswith("patch_embed.norm."):
            return _BACKBONE + "embeddings.norm." + parts[-1]
        if rest.startswith("layers.") and parts[4] == "blocks":
            layer, block, inner = parts[3], parts[5], ".".join(parts[6:])
            if inner.startswith("attn.relative_position_index") or inner.startswith("attn.qkv"):
                return None  # a buffer; qkv is split by _split_qkv
            new = _sub(inner, _SWIN_BLOCK)
            return None if new is None else f"{_BACKBONE}encoder.layers.{layer}.blocks.{block}.{new}"
        if rest.startswith("layers.") and parts[4] == "downsample":
            return f"{_BACKBONE}encoder.layers.{parts[3]}.downsample.{'.'.join(parts[5:])}"
        if rest.startswith("norm"):  # the norms of the output stages: norm{i} -> stage{i+1}
            return f"{_BACKBONE}hidden_states_norms.stage{int(parts[2][4:]) + 1}.{parts[-1]}"
        return None
    for prefix, table in (("transformer.encoder.layers.", _DEFORMABLE), ("transformer.encoder.text_layers.", _TEXT_ENHANCER),
                          ("transformer.encoder.fusion_layers.", _FUSION), ("transformer.decoder.layers.", _DECODER)):
        if key.startswith(prefix):
            layer, inner = parts[3], ".".join(parts[4:])
            new = _sub(inner, table)
            where = "decoder" if "decoder" in prefix else "encoder"
            return None if new is None else f"model.{where}.layers.{layer}.{new}"
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("bbox_embed."):
        return key
    return None


def _split_qkv(state: dict, out: dict, embed_dim: int, depths: list[int]) -> None:
    """``read_in_q_k_v``: each Swin block's fused qkv -> query, key, value."""
    for layer, depth in enumerate(depths):
        hidden = embed_dim * 2 ** layer
        for block in range(depth):
            src = f"backbone.0.layers.{layer}.blocks.{block}.attn.qkv"
            dst = f"{_BACKBONE}encoder.layers.{layer}.blocks.{block}.attention.self"
            for kind in ("weight", "bias"):
                qkv = state[f"{src}.{kind}"]
                out[f"{dst}.query.{kind}"] = qkv[:hidden].clone()
                out[f"{dst}.key.{kind}"] = qkv[hidden:2 * hidden].clone()
                out[f"{dst}.value.{kind}"] = qkv[-hidden:].clone()


def _split_in_proj(mapped: dict) -> None:
    """``nn.MultiheadAttention``'s fused ``in_proj`` (text enhancer, decoder self- and text
    cross-attention) -> the separate query / key / value projections of transformers' layers."""
    for key in [k for k in mapped if k.endswith((".in_proj_weight", ".in_proj_bias"))]:
        fused = mapped.pop(key)
        base, kind = key.rsplit(".in_proj_", 1)
        for name, part in zip(("query", "key", "value"), fused.chunk(3, dim=0)):
            mapped[f"{base}.{name}.{kind}"] = part.clone()


def swin_params(args) -> dict:
    from groundingdino.models.GroundingDINO.backbone import swin_transformer  # noqa: F401  (package present)

    if getattr(args, "backbone_params", None):
        return dict(args.backbone_params)
    known = {"swin_T_224_1k": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7), "swin_B_224_22k": (128, [2, 2, 18, 2], [4, 8, 16, 32], 7),
             "swin_B_384_22k": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
             "swin_L_224_22k": (192, [2, 2, 18, 2], [6, 12, 24, 48], 7),
             "swin_L_384_22k": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12)}
    if args.backbone not in known:
        raise ConvertError(f"config: backbone {args.backbone!r} does not convert (Swin backbones only)")
    dim, depths, heads, window = known[args.backbone]
    return dict(embed_dim=dim, depths=depths, num_heads=heads, window_size=window)


def hf_config(args, text_config):
    from transformers import GroundingDinoConfig, SwinConfig

    swin = swin_params(args)
    stages = [f"stage{i + 1}" for i in args.return_interm_indices]
    backbone = SwinConfig(image_size=int(args.backbone.split("_")[-2]), patch_size=4, embed_dim=swin["embed_dim"],
                          depths=list(swin["depths"]), num_heads=list(swin["num_heads"]),
                          window_size=swin["window_size"], out_features=stages)
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text_config, num_queries=args.num_queries, d_model=args.hidden_dim,
        encoder_layers=args.enc_layers, decoder_layers=args.dec_layers, encoder_ffn_dim=args.dim_feedforward,
        decoder_ffn_dim=args.dim_feedforward, encoder_attention_heads=args.nheads, decoder_attention_heads=args.nheads,
        num_feature_levels=args.num_feature_levels, encoder_n_points=args.enc_n_points,
        decoder_n_points=args.dec_n_points, max_text_len=args.max_text_len, two_stage=args.two_stage_type == "standard",
        positional_embedding_temperature=args.pe_temperatureH, activation_function=args.transformer_activation,
        embedding_init_target=args.embed_init_tgt, decoder_bbox_embed_share=args.dec_pred_bbox_embed_share,
        two_stage_bbox_embed_share=args.two_stage_bbox_embed_share, query_dim=args.query_dim,
        dropout=0.0, fusion_droppath=0.0, disable_custom_kernels=True)


def convert_groundingdino(checkpoint: str | Path, out: str | Path, config: str | None = None,
                          text_encoder: str | None = None) -> Path:
    """Write a transformers GroundingDINO folder (model + processor) from an original checkpoint."""
    from transformers import (BertConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor,
                              GroundingDinoProcessor)

    from stages.backends import groundingdino as original
    from stages.models import load_pretrained

    detect = type("Detect", (), {"model": str(checkpoint), "config": config, "text_encoder": text_encoder})()
    path, state, args, _ = original.read_checkpoint(detect, "checkpoint")
    name = original.text_encoder_name(detect, args)
    text_config = load_pretrained(BertConfig, name, None, field="--text-encoder")
    config = hf_config(args, text_config)
    swin = swin_params(args)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _rename(key)
        if new is not None and not key.startswith("bert.pooler."):  # unused; transformers' text backbone has none
            mapped[new] = value.clone()  # shared (tied) tensors must be separate in safetensors
    _split_qkv(state, mapped, swin["embed_dim"], list(swin["depths"]))
    _split_in_proj(mapped)
    # The names above are the conversion script's (transformers 4); from_pretrained applies
    # transformers' own renaming of those legacy names (conversion_mapping.py), then every key
    # and shape is checked.
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file(mapped, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model, info = GroundingDinoForObjectDetection.from_pretrained(tmp, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if "position_ids" not in k]
    unexpected = [k for k in info["unexpected_keys"] if "position_ids" not in k and "token_type_ids" not in k]
    if missing or unexpected or info.get("mismatched_keys"):
        raise ConvertError(f"{path}: does not convert to transformers GroundingDinoForObjectDetection: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}, mismatched {list(info.get('mismatched_keys', []))[:3]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    size = {"shortest_edge": int(getattr(args, "image_shortest_edge", 800)),
            "longest_edge": int(getattr(args, "image_longest_edge", 1333))}
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=size),
                           tokenizer=original.load_tokenizer(name)).save_pretrained(str(out))
    return out


__all__ = ["convert_groundingdino", "hf_config", "swin_params"]
