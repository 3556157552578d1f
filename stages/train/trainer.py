"""Hugging Face ``Trainer`` with ``loss = L_lm + λ · L_wtl``; the two terms are logged apart
(``lm_loss``, ``wtl_loss``) together with a token-grid attention IoU (``wtl_iou``)."""
from __future__ import annotations

import torch
from transformers import Trainer

from stages.train.attention import AttentionCapture
from stages.train.data import WTL_KEYS
from stages.train.loss import entity_maps, lambda_at, mask_iou_top, wtl_loss


class WTLTrainer(Trainer):
    def __init__(self, *args, capture: AttentionCapture, wtl_lambda: float = 1.0, wtl_variant: str = "kl",
                 wtl_schedule: str = "constant", wtl_warmup: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture = capture
        self.wtl_lambda = float(wtl_lambda)
        self.wtl_schedule, self.wtl_warmup = wtl_schedule, int(wtl_warmup)
        self.wtl_variant = wtl_variant
        self._acc = {"lm_loss": [], "wtl_loss": [], "wtl_iou": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        wtl = {k: inputs.pop(k) for k in WTL_KEYS}
        self.capture.activate()
        self.capture.set_queries(wtl["wtl_q_index"] if wtl["wtl_ent_sample"].numel() else None)
        outputs = model(**inputs)
        lm = outputs.loss
        rows = self.capture.rows
        if rows:
            lw = wtl_loss(rows, wtl, self.wtl_variant)
            with torch.no_grad():
                maps, valid = entity_maps(rows, wtl["wtl_q_index"], wtl["wtl_v_index"], wtl["wtl_ent_sample"],
                                          wtl["wtl_ent_qmask"])
                iou = mask_iou_top(maps, wtl["wtl_target"].to(maps.device), valid).mean()
        else:
            lw = lm.new_zeros(())
            iou = None
        lam = lambda_at(self.wtl_lambda, self.state.global_step, self.wtl_schedule, self.wtl_warmup)
        loss = lm + lam * lw if lam else lm + 0.0 * lw
        if model.training:
            self._acc["lm_loss"].append(lm.detach().float().item())
            self._acc["wtl_loss"].append(lw.detach().float().item())
            if iou is not None:
                self._acc["wtl_iou"].append(iou.item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:   # λ in force now (the schedule may ramp it up)
            logs["wtl_lambda"] = lambda_at(self.wtl_lambda, self.state.global_step, self.wtl_schedule, self.wtl_warmup)
        for k, vals in self._acc.items():
            if vals and "loss" in logs:
                logs[k] = round(sum(vals) / len(vals), 6)
                vals.clear()
        super().log(logs, *args, **kwargs)
