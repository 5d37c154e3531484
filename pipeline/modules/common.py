"""Pieces shared by the LightningModules: optimizer + schedule, finite-loss guard."""
from __future__ import annotations

import contextlib
import json
import math

import torch
from transformers import get_scheduler

from pipeline.errors import TrainingError


def _fused_supported(params) -> bool:
    """Can AdamW use its fused kernel (one kernel for all parameters: 5x faster than the
    per-tensor loop on CPU for a small model; the same update up to float rounding)?"""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: keep the default implementation
        return False
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(p.device.type in devices and p.is_floating_point() for p in tensors)


def configure_adamw(module, params, optim_cfg):
    """AdamW (fused where torch has the kernel) + a transformers LR schedule with warmup,
    stepped every optimizer step."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                            betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=_fused_supported(params) or None)
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


class OnlineLogging:
    """Per-rollout-step logging and the held-out curve, shared by the online stages' modules
    (``OnlineRLModule``, ``OnlinePreferenceModule``): they set ``rollout_step``, ``policy``,
    ``evaluate_fn``, ``work_dir`` and ``last_eval``."""

    def _log(self, metrics: dict) -> None:
        """Per-rollout-step metrics, averaged over ranks, logged at ``rollout_step``."""
        t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="mean")
        metrics = dict(zip(metrics, t.tolist()))
        metrics["train/rollout_step"] = float(self.rollout_step)
        # callbacks (progress bar, the tuner's hook) read callback_metrics
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.rollout_step)

    def _evaluate(self, step: int = 0) -> None:
        """Held-out evaluation of the policy (rank 0): ``curve.jsonl``, the loggers, ``last_eval``."""
        if not self.trainer.is_global_zero:
            return
        was_training = self.policy.training
        m = {k: float(v) for k, v in self.evaluate_fn(self.policy).items()}
        self.policy.train(was_training)
        self.last_eval = {"step": step, **m}  # the runner's hook receives it at this step (MetricsHookCallback)
        if self.work_dir is not None:
            with open(self.work_dir / "curve.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **m}) + "\n")
        for logger in self.loggers:
            with contextlib.suppress(Exception):
                logger.log_metrics(m, step=step)
