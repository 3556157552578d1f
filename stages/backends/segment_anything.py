"""``segment.backend: segment-anything``: the original SAM package and an original ``.pth``.

The checkpoint (``sam_vit_h_4b8939.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_b_01ec64.pth``
or a fine-tune of one of them) is read with ``torch.load(weights_only=True)``; its architecture
is read from the tensor shapes (:func:`read_arch`). The three released sizes are built with the
package's own ``sam_model_registry`` (``vit_h`` / ``vit_l`` / ``vit_b``); any other size (the
tests' tiny models) with the same classes and the same construction as the registry's builder.

:class:`OriginalSam` gives the stage the two calls it makes on transformers' ``SamModel``:
``get_image_embeddings(pixel_values)`` (the image encoder, one embedding per image, several
images per pass) and ``model(image_embeddings=, input_boxes=, multimask_output=False)`` (per
image, every box of it in ONE prompt-encoder + mask-decoder call, as ``SamPredictor.predict_torch``
does), so :class:`~stages.segment.SegmentStage` does the batching, resizing (longest side to the
encoder's size, as ``ResizeLongestSide``), normalisation, padding and mask post-processing
(``Sam.postprocess_masks``' steps) for both backends, and the records are alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from stages.backends.checkpoints import checkpoint_error, checkpoint_path, load_state_dict
from stages.models import ModelUnavailableError

FIELD = "segment.model"
EXPECTS = ("The segment-anything backend takes an original SAM checkpoint (.pth) such as sam_vit_h_4b8939.pth "
           "(https://github.com/facebookresearch/segment-anything#model-checkpoints); for a transformers "
           "folder or hub id use segment.backend=transformers")
# What every SAM checkpoint holds (the architecture is read from their shapes).
REQUIRED = ("image_encoder.patch_embed.proj.weight", "image_encoder.neck.0.weight",
            "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "prompt_encoder.mask_downscaling.3.weight",
            "mask_decoder.mask_tokens.weight", "mask_decoder.transformer.layers.0.mlp.lin1.weight")
DECODER_HEADS = 8          # every released SAM (not readable from the shapes)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch:
    """A SAM's sizes, as ``segment_anything.build_sam._build_sam`` takes them (plus the decoder's)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    img_size: int
    patch_size: int
    mlp_ratio: float
    out_chans: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    decoder_heads: int = DECODER_HEADS

    @property
    def registry_name(self) -> str | None:
        """``vit_h`` / ``vit_l`` / ``vit_b`` when this is a released size (built by the registry)."""
        for name, (dim, depth, heads, glob) in _RELEASED.items():
            if (self.embed_dim, self.depth, self.num_heads, self.global_attn_indexes) == (dim, depth, heads, glob) \
                    and asdict(self) | _FIXED == asdict(self):
                return name
        return None


_RELEASED = {"vit_h": (1280, 32, 16, (7, 15, 23, 31)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
             "vit_b": (768, 12, 12, (2, 5, 8, 11))}
_FIXED = {"window_size": 14, "img_size": 1024, "patch_size": 16, "mlp_ratio": 4.0, "out_chans": 256,
          "mask_in_chans": 16, "decoder_depth": 2, "decoder_mlp_dim": 2048, "num_multimask_outputs": 3,
          "iou_head_depth": 3, "iou_head_hidden_dim": 256, "decoder_heads": DECODER_HEADS}


def _count(state: dict, prefix: str) -> int:
    n = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(n) + 1 if n else 0


def read_arch(state: dict[str, torch.Tensor], path: Path | str = "", field: str = FIELD) -> SamArch:
    """The architecture of a SAM state dict, from its tensor shapes (nothing is computed)."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise checkpoint_error(field, path, f"is not a SAM checkpoint (no {', '.join(missing[:3])}"
                                            f"{' ...' if len(missing) > 3 else ''})", EXPECTS)
    try:
        embed_dim, _, patch, _ = state["image_encoder.patch_embed.proj.weight"].shape
        depth = _count(state, "image_encoder.blocks.")
        grid = state["image_encoder.pos_embed"].shape[1]
        img_size = grid * patch
        head_dim, windows, glob = None, set(), []
        for i in range(depth):
            rel = state[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
            head_dim = rel.shape[1]
            size = (rel.shape[0] + 1) // 2
            if size == grid:
                glob.append(i)
            else:
                windows.add(size)
        mlp = state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
        out_chans = state["image_encoder.neck.0.weight"].shape[0]
        arch = SamArch(
            embed_dim=int(embed_dim), depth=depth, num_heads=int(embed_dim // head_dim),
            global_attn_indexes=tuple(glob), window_size=int(windows.pop() if windows else 14),
            img_size=int(img_size), patch_size=int(patch), mlp_ratio=float(mlp / embed_dim),
            out_chans=int(out_chans),
            mask_in_chans=int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
            decoder_depth=_count(state, "mask_decoder.transformer.layers."),
            decoder_mlp_dim=int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
            num_multimask_outputs=int(state["mask_decoder.mask_tokens.weight"].shape[0] - 1),
            iou_head_depth=_count(state, "mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden_dim=int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
        )
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise checkpoint_error(field, path, f"is not a SAM checkpoint of a known layout ({type(exc).__name__}: "
                                            f"{exc})", EXPECTS) from None
    if windows:
        raise checkpoint_error(field, path, f"mixes window sizes {sorted(windows | {arch.window_size})}", EXPECTS)
    return arch


def _import_package():
    try:
        import segment_anything
    except ImportError as exc:
        raise ModelUnavailableError(
            "segment.backend: segment-anything needs the original package, which is not installed here "
            f"({exc}): pip install 'look-and-learn[sam]' (or pip install segment-anything)") from exc
    return segment_anything


def build_sam(arch: SamArch):
    """An (untrained) ``segment_anything.modeling.Sam`` of this architecture: the package's
    ``sam_model_registry`` for the released sizes, else the same construction with other sizes."""
    sa = _import_package()
    name = arch.registry_name
    if name is not None:
        return sa.sam_model_registry[name]()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.img_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth, embed_dim=arch.embed_dim, img_size=arch.img_size, mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.num_heads,
            patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=arch.global_attn_indexes, window_size=arch.window_size, out_chans=arch.out_chans),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.out_chans, image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size), mask_in_chans=arch.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.out_chans,
                                          mlp_dim=arch.decoder_mlp_dim, num_heads=arch.decoder_heads),
            transformer_dim=arch.out_chans, iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim),
        pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD),
    ).eval()


def _fit(sam, state: dict[str, torch.Tensor], path: Path, field: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, after checking every key and shape against ``sam``'s."""
    weights = {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
    want = sam.state_dict()
    missing = sorted(set(want) - set(weights))
    unexpected = sorted(set(weights) - set(want))
    shapes = [f"{k} {tuple(weights[k].shape)} != {tuple(want[k].shape)}" for k in want
              if k in weights and weights[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise checkpoint_error(field, path, f"does not fit the SAM architecture read from it ({'; '.join(parts)})",
                               EXPECTS)
    return weights


def read_checkpoint(name: str, field: str = FIELD) -> tuple[Path, dict[str, torch.Tensor], SamArch]:
    """Check an original SAM checkpoint without reading its weights (memory-mapped, and the model
    built on the meta device): the file, its safety, its keys and every shape. Errors name
    ``field`` (CLI exit 2)."""
    path = checkpoint_path(name, field, EXPECTS)
    state = load_state_dict(path, field, EXPECTS)
    arch = read_arch(state, path, field)
    with torch.device("meta"):
        _fit(build_sam(arch), state, path, field)
    return path, state, arch


def load_sam(name: str, field: str = FIELD):
    """The original ``Sam`` with the checkpoint's weights (every key, every shape checked)."""
    path, state, arch = read_checkpoint(name, field)
    with torch.device("meta"):
        sam = build_sam(arch)
    sam.load_state_dict(_fit(sam, state, path, field), strict=True, assign=True)
    # the pixel statistics are buffers the checkpoint does not hold
    sam.pixel_mean = torch.tensor(PIXEL_MEAN).view(-1, 1, 1)
    sam.pixel_std = torch.tensor(PIXEL_STD).view(-1, 1, 1)
    return sam.eval()


class OriginalSam(torch.nn.Module):
    """The original ``Sam`` behind the two calls :class:`~stages.segment.SegmentStage` makes."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam
        self.config = SimpleNamespace(backend="segment-anything")

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised, padded images -> (N, C, S/16, S/16) image embeddings."""
        return self.sam.image_encoder(pixel_values)

    def forward(self, image_embeddings: torch.Tensor, input_boxes: torch.Tensor, multimask_output: bool = False):
        """Boxes ``(B, n, 4)`` in the encoder's input coordinates -> ``pred_masks (B, n, 1, h, w)``
        low-resolution logits and ``iou_scores (B, n, 1)``: for each image, all its boxes in one
        prompt-encoder + mask-decoder call (``SamPredictor.predict_torch``)."""
        sam = self.sam
        dense_pe = sam.prompt_encoder.get_dense_pe()
        masks, scores = [], []
        for b in range(image_embeddings.shape[0]):
            sparse, dense = sam.prompt_encoder(points=None, boxes=input_boxes[b], masks=None)
            low_res, iou = sam.mask_decoder(image_embeddings=image_embeddings[b:b + 1], image_pe=dense_pe,
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=multimask_output)
            masks.append(low_res)
            scores.append(iou)
        return SimpleNamespace(pred_masks=torch.stack(masks), iou_scores=torch.stack(scores))


def image_processor(arch: SamArch) -> SimpleNamespace:
    """The settings :class:`~stages.prep.ImagePrep` reads from a SamImageProcessor, for this SAM:
    longest side to the encoder's size, SAM's pixel mean / std, zero padding to a square."""
    return SimpleNamespace(size={"longest_edge": arch.img_size},
                           pad_size={"height": arch.img_size, "width": arch.img_size},
                           rescale_factor=1 / 255, image_mean=[m / 255 for m in PIXEL_MEAN],
                           image_std=[s / 255 for s in PIXEL_STD])


__all__ = ["SamArch", "read_arch", "read_checkpoint", "build_sam", "load_sam", "OriginalSam", "image_processor",
           "FIELD", "EXPECTS"]
