"""Pieces shared by the LightningModules: optimizer + schedule, finite-loss guard."""
from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from pipeline.errors import TrainingError


def configure_adamw(module, params, optim_cfg):
    """AdamW + a transformers LR schedule with warmup, stepped every optimizer step."""
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                            betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = int(math.ceil(optim_cfg.warmup_ratio * total))
    sched = get_scheduler(optim_cfg.scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_finite(loss: torch.Tensor, *, step: int, key: str) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingError(
            f"loss became {loss.item()} at step {step}",
            where=key,
            fix=f"lower {key}.optim.lr, keep trainer.gradient_clip_val set, or use precision=32-true",
        )
