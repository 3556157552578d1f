"""The where-to-look loss (docs/architecture.md): from captured attention rows and the collator's entity
tensors. Variants: ``kl`` (default, KL(p_e || a_e) on the head-averaged map), ``kl_head``
(per-head KL, averaged), ``mass`` ((1 - sum m*a)^2), ``dice_bce`` (soft dice + BCE of the
max-normalised map against the area-averaged mask)."""
from __future__ import annotations

import torch

VARIANTS = ("kl", "kl_head", "mass", "dice_bce")
EPS = 1e-6


def entity_maps(rows: dict[int, torch.Tensor], q_index: torch.Tensor, v_index: torch.Tensor,
                ent_sample: torch.Tensor, ent_qmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entity, per-head attention over image tokens, renormalised over V.

    rows: {layer: (B, H, Q, K)}; returns ``(maps (E, H, V), valid (E, V))``.
    """
    a = torch.stack([rows[k] for k in sorted(rows)]).mean(0)          # (B, H, Q, K) mean over layers
    bsz, n_heads, n_q, _ = a.shape
    v = v_index.to(a.device)
    valid_v = v >= 0
    idx = v.clamp(min=0)[:, None, None, :].expand(bsz, n_heads, n_q, v.shape[1])
    av = torch.gather(a, 3, idx) * valid_v[:, None, None, :]            # (B, H, Q, V)
    per_ent = av[ent_sample.to(a.device)]                               # (E, H, Q, V)
    maps = torch.einsum("ehqv,eq->ehv", per_ent, ent_qmask.to(a.device, a.dtype))
    maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
    return maps, valid_v[ent_sample.to(a.device)]


def wtl_loss(rows: dict[int, torch.Tensor], batch: dict, variant: str = "kl") -> torch.Tensor:
    """Mean over entities of the chosen variant; 0 (with a graph) when there is no entity."""
    if variant not in VARIANTS:
        raise ValueError(f"loss variant must be one of {VARIANTS}, got {variant!r}")
    if not rows or batch["wtl_ent_sample"].numel() == 0:
        ref = next(iter(rows.values())) if rows else None
        return ref.sum() * 0.0 if ref is not None else torch.zeros(())
    maps, valid = entity_maps(rows, batch["wtl_q_index"], batch["wtl_v_index"], batch["wtl_ent_sample"],
                              batch["wtl_ent_qmask"])
    m = batch["wtl_target"].to(maps.device, maps.dtype) * valid
    if variant in ("kl", "kl_head"):
        p = (m + EPS) * valid
        p = p / p.sum(-1, keepdim=True)
        a = maps.mean(1) if variant == "kl" else maps                   # (E, V) or (E, H, V)
        pp = p if variant == "kl" else p[:, None, :]
        kl = (pp * (torch.log(pp.clamp_min(1e-12)) - torch.log(a.clamp_min(1e-12)))) * (pp > 0)
        kl = kl.sum(-1)
        return kl.mean()
    a = maps.mean(1)
    if variant == "mass":
        return ((1.0 - (m * a).sum(-1)) ** 2).mean()
    s = a / a.amax(-1, keepdim=True).clamp_min(1e-12)
    inter = (s * m).sum(-1)
    dice = 1.0 - (2 * inter + 1.0) / (s.sum(-1) + m.sum(-1) + 1.0)
    bce = torch.nn.functional.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), m.clamp(0, 1), reduction="none")
    bce = (bce * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    return (dice + bce).mean()


def mask_iou_top(maps: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, thr: float = 0.5) -> torch.Tensor:
    """Token-grid IoU of the head-averaged map thresholded relative to its max vs the target
    mask binarised at 0.5 (a cheap training-time metric; the read-out does it in pixels)."""
    a = maps.mean(1) if maps.dim() == 3 else maps
    pred = (a >= thr * a.amax(-1, keepdim=True)) & valid
    gt = (target >= 0.5) & valid
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float().clamp_min(1)
    return inter / union


def lambda_at(lam: float, step: int, schedule: str = "constant", warmup: int = 0) -> float:
    """λ at optimizer ``step`` (0-based): ``constant``, or ``ramp``: 0 for ``warmup`` steps, then linear
    up to λ over as many steps. The shapes sweep (README, Experiment) found the ramp keeps λ = 1 off
    the plateau where a model trained with the attention loss from step 0 ignored colour."""
    if schedule == "constant" or lam == 0:
        return lam
    if schedule != "ramp":
        raise ValueError(f"unknown λ schedule {schedule!r} (constant | ramp)")
    return lam * min(1.0, max(0.0, (step - warmup) / max(warmup, 1)))
