"""Image preparation for the GPU stage, split where the bytes are cheapest to move.

The Hugging Face image processors of GroundingDINO and SAM resize, rescale, normalise and pad
on the host, in float32, one call per batch, inside the GPU actor. Here the same steps are
split in two:

* :meth:`ImagePrep.resize` (CPU workers, before the GPU actor): the decoded ``(H, W, 3)`` uint8
  pixels resized to the processor's output size, **still uint8** (a quarter of the bytes of the
  float32 tensor the processor would make). The GPU actor never resizes.
* :meth:`ImagePrep.upload` (the GPU actor): the resized images of one batch copied through
  pinned host memory with ``non_blocking=True``, then cast, rescaled, normalised and padded on
  the device. Nothing in it waits for the device.

Both halves follow the processor's own recipe (transformers' torchvision backend: bilinear
antialiased resize, the fused ``(x - mean/scale) / (std/scale)`` normalisation in float32, zero
padding after normalisation), so the model sees what ``processor(images=...)`` would give it.
The output sizes are computed here, from the processor's ``size`` / ``pad_size`` settings, with
the same arithmetic as the processor (``tests/test_prep.py`` checks them against it).

Whether the resize ran in a CPU worker or inline in the actor, its result is the same pure
function of the pixels, so results never depend on where it ran.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def _get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def shortest_longest_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """GroundingDINO / DETR resize rule: shortest edge to ``shortest`` unless the longest edge
    would pass ``longest`` (transformers' ``get_size_with_aspect_ratio``, same rounding)."""
    size = shortest
    raw_size = None
    if longest is not None:
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > longest:
            raw_size = longest * lo / hi
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        ow = size
        oh = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
    else:
        oh = size
        ow = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return oh, ow


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """SAM resize rule: longest edge to ``longest`` (``SamImageProcessor._get_preprocess_shape``)."""
    scale = longest * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_uint8(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear with antialiasing (torchvision's tensor resize)."""
    h, w = size
    if tuple(pixels.shape[:2]) == (h, w):
        return np.ascontiguousarray(pixels)
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def rgb_pixels(pixels: Any) -> np.ndarray:
    """A ``pixels`` cell as an (H, W, 3) uint8 array."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"pixels must be a non-empty HxWx3 array, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def row_pixels(row) -> np.ndarray | None:
    """A row's ``pixels`` for the models, or None after rejecting the row (``bad_pixels: ...``)."""
    try:
        return rgb_pixels(row["pixels"])
    except (KeyError, TypeError, ValueError) as exc:
        row.reject(f"bad_pixels: {exc}")
        return None


def _stage_on_host(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Stack same-shape uint8 arrays into one (pinned, when the target is CUDA) host tensor."""
    shape = (len(arrays), *arrays[0].shape)
    pin = device.type == "cuda"
    buf = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
    view = buf.numpy()
    for i, arr in enumerate(arrays):
        view[i] = arr
    return buf


class ImagePrep:
    """Resize on the host (uint8), normalise and pad on the device, as ``image_processor`` would.

    ``kind``: ``"gdino"`` (shortest/longest edge, pad to the batch's largest image with a pixel
    mask) or ``"sam"`` (longest edge, pad to the fixed ``pad_size``).
    """

    def __init__(self, image_processor: Any, kind: str):
        if kind not in ("gdino", "sam"):
            raise ValueError(f"kind must be 'gdino' or 'sam', got {kind!r}")
        self.kind = kind
        size = image_processor.size
        if kind == "gdino":
            self.shortest = int(_get(size, "shortest_edge"))
            longest = _get(size, "longest_edge")
            self.longest = int(longest) if longest else None
            self.pad_size = None
        else:
            self.longest = int(_get(size, "longest_edge"))
            pad = getattr(image_processor, "pad_size", None)
            self.pad_size = (int(_get(pad, "height")), int(_get(pad, "width"))) if pad else None
        scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
        # transformers fuses rescale into normalise: (x - mean/scale) / (std/scale), in float32
        self.mean = torch.tensor(list(image_processor.image_mean), dtype=torch.float32) * (1.0 / scale)
        self.std = torch.tensor(list(image_processor.image_std), dtype=torch.float32) * (1.0 / scale)
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.kind == "gdino":
            return shortest_longest_size(height, width, self.shortest, self.longest)
        return longest_edge_size(height, width, self.longest)

    def resize(self, pixels: np.ndarray) -> np.ndarray:
        """CPU half: (H, W, 3) uint8 pixels -> the model's input size, uint8."""
        return resize_uint8(pixels, self.output_size(*pixels.shape[:2]))

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.mean.to(device).view(1, 3, 1, 1), self.std.to(device).view(1, 3, 1, 1))
        return self._on[key]

    def upload(self, arrays: Sequence[np.ndarray], device: torch.device,
               pad_to: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Device half: resized uint8 images -> ``(pixel_values (N, 3, H, W) float32, pixel_mask
        (N, H, W) int64)`` on ``device``, zero-padded (after normalisation) at the bottom/right to
        ``pad_to`` (default: SAM's ``pad_size``, or the largest image for GroundingDINO).
        Issues asynchronous work only: no host synchronisation."""
        if pad_to is None:
            pad_to = self.pad_size or (max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays))
        mean, std = self._stats(device)
        shapes = {tuple(a.shape) for a in arrays}
        if len(shapes) == 1:
            groups = [(list(range(len(arrays))), arrays)]
        else:  # mixed sizes: one copy per image
            groups = [([i], [a]) for i, a in enumerate(arrays)]
        values = torch.zeros((len(arrays), 3, *pad_to), dtype=torch.float32, device=device)
        mask = torch.zeros((len(arrays), *pad_to), dtype=torch.int64, device=device)
        for idx, group in groups:
            host = _stage_on_host(group, device)
            x = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
            x.sub_(mean).div_(std)
            h, w = group[0].shape[:2]
            if len(idx) == len(arrays):
                values[:, :, :h, :w] = x
                mask[:, :h, :w] = 1
            else:
                values[idx[0], :, :h, :w] = x[0]
                mask[idx[0], :h, :w] = 1
        return values, mask


__all__ = ["ImagePrep", "shortest_longest_size", "longest_edge_size", "resize_uint8"]
