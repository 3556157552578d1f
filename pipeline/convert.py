"""``lookandlearn convert``: an original SAM / GroundingDINO checkpoint -> a transformers folder.

The key mapping is the one transformers' own conversion scripts use
(``transformers/models/sam/convert_sam_to_hf.py``,
``transformers/models/grounding_dino/convert_grounding_dino_to_hf.py``); the architecture is
read from the checkpoint (SAM: its tensor shapes; GroundingDINO: its config file), so fine-tunes
and the tests' tiny models convert as well as the released sizes. The converted folder loads with
``from_pretrained`` and is what ``segment.backend`` / ``detect.backend: transformers`` (the
default) take. Loading is strict: a key that maps nowhere or a shape that differs is an error.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

# transformers' convert_sam_to_hf.py KEYS_TO_MODIFY_MAPPING (applied in this order, substring-wise)
SAM_KEYS = {
    "iou_prediction_head.layers.0": "iou_prediction_head.proj_in",
    "iou_prediction_head.layers.1": "iou_prediction_head.layers.0",
    "iou_prediction_head.layers.2": "iou_prediction_head.proj_out",
    "mask_decoder.output_upscaling.0": "mask_decoder.upscale_conv1",
    "mask_decoder.output_upscaling.1": "mask_decoder.upscale_layer_norm",
    "mask_decoder.output_upscaling.3": "mask_decoder.upscale_conv2",
    "mask_downscaling.0": "mask_embed.conv1",
    "mask_downscaling.1": "mask_embed.layer_norm1",
    "mask_downscaling.3": "mask_embed.conv2",
    "mask_downscaling.4": "mask_embed.layer_norm2",
    "mask_downscaling.6": "mask_embed.conv3",
    "point_embeddings": "point_embed",
    "pe_layer.positional_encoding_gaussian_matrix": "shared_embedding.positional_embedding",
    "image_encoder": "vision_encoder",
    "neck.0": "neck.conv1",
    "neck.1": "neck.layer_norm1",
    "neck.2": "neck.conv2",
    "neck.3": "neck.layer_norm2",
    "patch_embed.proj": "patch_embed.projection",
    ".norm": ".layer_norm",
    "blocks": "layers",
}
_HYPER = re.compile(r".*.output_hypernetworks_mlps.(\d+).layers.(\d+).*")


class ConvertError(ValueError):
    """The checkpoint does not convert (keys or shapes that do not fit the transformers model)."""


def sam_state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SAM keys -> transformers ``SamModel`` keys (``convert_sam_to_hf.replace_keys``)."""
    out = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in SAM_KEYS.items():
            if old in key:
                key = key.replace(old, new)
        match = _HYPER.match(key)
        if match:
            key = key.replace(f"layers.{match.group(2)}", {"0": "proj_in", "1": "layers.0", "2": "proj_out"}
                              [match.group(2)])
        out[key] = value
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


def sam_hf_config(arch):
    """transformers ``SamConfig`` of a :class:`stages.backends.segment_anything.SamArch`."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=arch.embed_dim, output_channels=arch.out_chans, num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads, image_size=arch.img_size, patch_size=arch.patch_size,
        mlp_ratio=arch.mlp_ratio, mlp_dim=int(round(arch.embed_dim * arch.mlp_ratio)), window_size=arch.window_size,
        global_attn_indexes=list(arch.global_attn_indexes), num_pos_feats=arch.out_chans // 2)
    prompt = SamPromptEncoderConfig(hidden_size=arch.out_chans, image_size=arch.img_size,
                                    patch_size=arch.patch_size, mask_input_channels=arch.mask_in_chans)
    decoder = SamMaskDecoderConfig(
        hidden_size=arch.out_chans, mlp_dim=arch.decoder_mlp_dim, num_hidden_layers=arch.decoder_depth,
        num_attention_heads=arch.decoder_heads, num_multimask_outputs=arch.num_multimask_outputs,
        iou_head_depth=arch.iou_head_depth, iou_head_hidden_dim=arch.iou_head_hidden_dim)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def _strict_load(model, state: dict, what: str, source) -> None:
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ConvertError(f"{source}: does not convert to {what}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def convert_sam(checkpoint: str | Path, out: str | Path, field: str = "checkpoint") -> Path:
    """Write a transformers ``SamModel`` + ``SamProcessor`` folder from an original SAM ``.pth``."""
    from transformers import SamImageProcessor, SamModel, SamProcessor

    from stages.backends.segment_anything import read_checkpoint

    path, state, arch = read_checkpoint(str(checkpoint), field)
    model = SamModel(sam_hf_config(arch)).eval()
    try:
        _strict_load(model, sam_state_dict_to_hf(dict(state)), "transformers SamModel", path)
    except RuntimeError as exc:  # shape mismatch
        raise ConvertError(f"{path}: does not convert to transformers SamModel: {str(exc).splitlines()[-1]}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    low_res = 4 * (arch.img_size // arch.patch_size)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": arch.img_size}, pad_size={"height": arch.img_size, "width": arch.img_size},
        mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res},
    )).save_pretrained(str(out))
    return out


__all__ = ["ConvertError", "SAM_KEYS", "sam_state_dict_to_hf", "sam_hf_config", "convert_sam"]
