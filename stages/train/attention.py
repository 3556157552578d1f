"""Where-to-look attention capture: a transformers attention function that returns the normal
SDPA (or flash) output and, for selected language-model layers, recomputes the softmax rows of
only the entity query positions against all keys, differentiably (docs/architecture.md, "The where-to-look
loss").

Usage::

    from stages.train.attention import AttentionCapture
    capture = AttentionCapture.attach(model, layers=[4, 5, 6])   # sets attn_implementation
    capture.set_queries(query_positions)        # LongTensor (B, Q), -1 = padding
    out = model(**batch)                        # normal outputs, unchanged
    rows = capture.rows                         # {layer: (B, H, Q, K) fp32 softmax rows}

Design notes
------------
* Registered under ``CAPTURE_SDPA`` (and ``CAPTURE_FLASH``) with both ``AttentionInterface``
  and ``AttentionMaskInterface``: a custom name alone would get ``attention_mask=None`` for
  padded batches; registering the SDPA mask function (flash mask function for the flash
  variant) gives it the same mask SDPA gets.
* The function is called by every attention module of the model (vision tower too). Only
  modules tagged by :meth:`AttentionCapture.attach` (the language model's self-attention of the
  selected layers) record rows; every other call is exactly SDPA / flash.
* Inputs arrive after rotary embeddings (the model applies RoPE / M-RoPE before calling the
  interface) and before grouped-query repetition: the recomputation groups query heads per
  key/value head instead of repeating keys.
* Masks honoured: the 4D boolean (SDPA) or additive float mask when given; causal built from
  positions when the mask is ``None`` (SDPA's ``is_causal`` path); a 2D key-padding mask (the
  flash mask function's output) plus causality.
* Gradient checkpointing: the capture runs identically in the recomputation (the context stays
  set until the next ``set_queries``), so the saved-tensor order checked by non-reentrant
  checkpointing matches; the rows kept are the ones from the first forward (the loss already
  holds them). Use ``use_reentrant=False`` (reentrant checkpointing runs the forward under
  ``no_grad`` and the rows would carry no gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

CAPTURE_SDPA = "lookandlearn_capture_sdpa"
CAPTURE_FLASH = "lookandlearn_capture_flash"
_TAG = "_lookandlearn_capture_layer"
_REGISTERED = False

# The active capture context. One model forward at a time per process (training step or
# read-out); nested/concurrent captures on different models would need a contextvar.
_ACTIVE: "AttentionCapture | None" = None


def _base_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _base_flash():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["flash_attention_2"]


def entity_rows(module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, q_index: torch.Tensor, heads: list[int] | None = None) -> torch.Tensor:
    """Softmax rows ``(B, H, Q, K)`` (fp32) for query positions ``q_index`` (B, Q; -1 = none).

    ``query`` (B, H, Lq, D), ``key`` (B, Hkv, K, D) as given to the attention interface.
    Rows for ``-1`` positions are zeros. Differentiable w.r.t. query and key.
    """
    bsz, n_heads, q_len, dim = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    n_rep = n_heads // n_kv
    scale = scaling if scaling is not None else dim ** -0.5
    valid = q_index >= 0
    idx = q_index.clamp(min=0).to(query.device)
    n_q = idx.shape[1]
    q_sel = torch.gather(query, 2, idx[:, None, :, None].expand(bsz, n_heads, n_q, dim))  # (B,H,Q,D)
    # Group query heads by their key/value head: (B, Hkv, n_rep*Q, D) @ (B, Hkv, D, K).
    q_grp = q_sel.reshape(bsz, n_kv, n_rep * n_q, dim).float()
    scores = torch.matmul(q_grp, key.float().transpose(-1, -2)) * scale
    scores = scores.reshape(bsz, n_heads, n_q, k_len)
    offset = k_len - q_len  # keys before the first query (cache); 0 in training
    if attention_mask is None or attention_mask.dim() == 2:
        q_abs = idx + offset  # (B, Q)
        allowed = torch.arange(k_len, device=query.device)[None, None, :] <= q_abs[:, :, None]  # (B,Q,K)
        if attention_mask is not None:  # flash: 2D key padding mask (1 = keep)
            allowed = allowed & attention_mask[:, None, -k_len:].bool()
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    else:
        m = attention_mask
        if m.shape[-2] == 1 and q_len > 1:  # broadcast row mask
            m = m.expand(m.shape[0], m.shape[1], q_len, m.shape[-1])
        m = m[..., :k_len]
        rows_idx = idx[:, None, :, None].expand(m.shape[0] if m.shape[0] == bsz else bsz, m.shape[1], n_q, m.shape[-1])
        m = torch.gather(m.expand(bsz, *m.shape[1:]), 2, rows_idx)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.float()
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (padding queries)
    probs = probs * valid[:, None, :, None].to(probs.dtype)
    if heads is not None:
        probs = probs[:, heads]
    return probs


def capture_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    return _capture(_base_sdpa(), module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)


def capture_flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                    scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    return _capture(_base_flash(), module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)


def _capture(base, module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    out, _ = base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                  is_causal=is_causal, **kwargs)
    ctx = _ACTIVE
    layer = getattr(module, _TAG, None)
    if ctx is not None and layer is not None and ctx.wants(module, layer):
        ctx._record(layer, entity_rows(module, query, key, attention_mask, scaling, ctx.q_index, ctx.heads))
    return out, None


def register() -> None:
    """Register the capture functions (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

    AttentionInterface.register(CAPTURE_SDPA, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_SDPA, sdpa_mask)
    AttentionInterface.register(CAPTURE_FLASH, capture_flash_attention_forward)
    AttentionMaskInterface.register(CAPTURE_FLASH, flash_attention_mask)
    _REGISTERED = True


def language_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of the model's language model (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
    and plain causal LMs), with or without a peft wrapper."""
    base = model
    for attr in ("base_model", "model"):  # peft: PeftModel.base_model.model
        if type(base).__name__.startswith("Peft") and hasattr(base, attr):
            base = getattr(base, attr)
    if hasattr(base, "base_model") and type(base).__name__ == "LoraModel":
        base = base.model
    for path in ("model.language_model.layers", "language_model.layers", "model.layers",
                 "model.language_model.model.layers", "language_model.model.layers"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    raise ValueError(f"cannot find the language model's decoder layers in {type(model).__name__}")


def middle_third(n_layers: int) -> list[int]:
    """The default layer set: the middle third of the language model's layers."""
    lo = n_layers // 3
    hi = max(lo + 1, (2 * n_layers + 2) // 3)
    return list(range(lo, min(hi, n_layers)))


@dataclass
class AttentionCapture:
    """Context: which layers/heads to capture, the query positions of the current batch, and the
    rows captured by the last forward."""

    layers: list[int]
    heads: list[int] | None = None
    q_index: torch.Tensor | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    enabled: bool = True
    _fresh: set = field(default_factory=set)

    @classmethod
    def attach(cls, model, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
               backend: str = "sdpa") -> "AttentionCapture":
        """Tag the language model's attention modules, switch the model to the capture attention
        function (``backend`` ``sdpa`` or ``flash``) and make this capture the active one."""
        global _ACTIVE
        register()
        decoder = language_layers(model)
        chosen = list(layers) if layers is not None else middle_third(len(decoder))
        for i in chosen:
            if not 0 <= i < len(decoder):
                raise ValueError(f"layer {i} out of range (the language model has {len(decoder)} layers)")
        for i, layer in enumerate(decoder):
            setattr(layer.self_attn, _TAG, i)
        name = CAPTURE_FLASH if backend.startswith("flash") else CAPTURE_SDPA
        target = model
        if hasattr(target, "get_base_model"):
            target = target.get_base_model()
        target.set_attn_implementation(name)
        cap = cls(layers=chosen, heads=None if heads is None else list(heads))
        _ACTIVE = cap
        return cap

    def activate(self) -> "AttentionCapture":
        global _ACTIVE
        _ACTIVE = self
        return self

    def set_queries(self, q_index: torch.Tensor | None) -> None:
        """Query positions for the next forward: (B, Q) LongTensor, -1 marks padding. Clears the
        rows of the previous step."""
        self.q_index = q_index
        self.rows = {}
        self._fresh = set()

    def wants(self, module, layer: int) -> bool:
        return self.enabled and self.q_index is not None and layer in self.layers and self.q_index.numel() > 0

    def _record(self, layer: int, rows: torch.Tensor) -> None:
        # Keep the first forward's rows; a checkpoint recomputation runs the same ops but its
        # results are not the tensors the loss was built from.
        if layer not in self._fresh:
            self.rows[layer] = rows
            self._fresh.add(layer)

    def stacked(self) -> torch.Tensor:
        """Rows of all captured layers stacked: (L, B, H, Q, K)."""
        return torch.stack([self.rows[i] for i in sorted(self.rows)])
