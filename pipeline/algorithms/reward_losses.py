"""Reward-model losses and ensemble aggregation (pure functions, registries).

- Bradley-Terry: ``-log sigmoid(r_w - r_l - m)`` with optional margin ``m`` and the
  centering term ``c * (r_w + r_l)^2`` (Eisenstein et al., TRL ``center_rewards_coefficient``).
- Ensemble aggregation over K members (Coste et al.): ``mean``; ``wco`` worst-case
  ``min_k R_k``; ``uwo`` uncertainty-weighted ``mean - lambda * var_k R_k``.
"""
from __future__ import annotations

import torch

from pipeline.algorithms.preference_losses import logistic_nll
from pipeline.registry import Registry

ENSEMBLE_AGGREGATIONS: Registry = Registry("reward ensemble aggregation")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (optionally weighted) BT negative log-likelihood over pairs: the shared pairwise-logistic
    core :func:`~pipeline.algorithms.preference_losses.logistic_nll` at z = r_w − r_l − m."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = logistic_nll(diff, label_smoothing=0.0)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp(min=1e-8)


@ENSEMBLE_AGGREGATIONS.register("mean")
def aggregate_mean(scores: torch.Tensor, **_) -> torch.Tensor:
    """scores [K, N] -> [N]"""
    return scores.mean(0)


@ENSEMBLE_AGGREGATIONS.register("wco")
def aggregate_worst_case(scores: torch.Tensor, **_) -> torch.Tensor:
    return scores.min(0).values


@ENSEMBLE_AGGREGATIONS.register("uwo")
def aggregate_uncertainty_weighted(scores: torch.Tensor, uwo_coef: float = 1.0, **_) -> torch.Tensor:
    var = scores.var(0, unbiased=False) if scores.shape[0] > 1 else torch.zeros_like(scores[0])
    return scores.mean(0) - uwo_coef * var


def aggregate(scores: torch.Tensor, mode: str = "mean", *, key: str = "aggregation", **kwargs) -> torch.Tensor:
    return ENSEMBLE_AGGREGATIONS.get(mode, key=key)(scores, **kwargs)
