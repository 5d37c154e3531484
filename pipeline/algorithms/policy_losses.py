"""Policy losses (registry ``POLICY_LOSSES``), loss aggregation (``LOSS_AGG_MODES``),
the clipped value loss and small diagnostics (explained variance, entropy).

Policy-loss signature (keyword-only, extra keywords ignored)::

    fn(*, logp[B,T], old_logp[B,T], advantages[B,T], response_mask[B,T],
       cliprange=0.2, agg_mode="token-mean", **_) -> (loss scalar, metrics)

``metrics`` holds detached float tensors ``clipfrac``, ``approx_kl`` (½·mean (logp − old_logp)²
over the mask, as verl/TRL) and ``ratio_mean``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pipeline.algorithms.utils import masked_mean, masked_sum, masked_var
from pipeline.registry import Registry

# --------------------------------------------------------------------------- aggregation

LossAgg = Callable[[Tensor, Tensor], Tensor]
LOSS_AGG_MODES: Registry[LossAgg] = Registry("loss aggregation mode")


def _nonempty_rows(mask: Tensor) -> Tensor:
    return (mask != 0).any(dim=-1)


@LOSS_AGG_MODES.register("token-mean")
def token_mean(loss_mat: Tensor, mask: Tensor) -> Tensor:
    """Σ_{i,t} m·ℓ / Σ_{i,t} m: every valid token weighs the same (DAPO / TRL "dapo")."""
    return masked_mean(loss_mat, mask)


@LOSS_AGG_MODES.register("seq-mean-token-sum")
def seq_mean_token_sum(loss_mat: Tensor, mask: Tensor) -> Tensor:
    """mean_i Σ_t m·ℓ: per-sequence sum, averaged over sequences with ≥ 1 valid token."""
    return masked_mean(masked_sum(loss_mat, mask, dim=-1), _nonempty_rows(mask))


@LOSS_AGG_MODES.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat: Tensor, mask: Tensor) -> Tensor:
    """mean_i (Σ_t m·ℓ / Σ_t m): per-sequence mean (original GRPO), averaged over non-empty sequences."""
    return masked_mean(masked_mean(loss_mat, mask, dim=-1), _nonempty_rows(mask))


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar with the aggregation ``mode`` (see ``LOSS_AGG_MODES``)."""
    return LOSS_AGG_MODES.get(mode, key="algorithm.loss_agg_mode")(loss_mat, mask)


# --------------------------------------------------------------------------- policy losses

PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


def _log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    # clamp as verl does, so exp() cannot overflow on wildly stale samples
    return (logp - old_logp).clamp(min=-20.0, max=20.0)


def _ratio_metrics(logp: Tensor, old_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        log_ratio = logp - old_logp
        return {
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(torch.exp(_log_ratio(logp, old_logp)), mask),
        }


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cliprange: float = 0.2,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    clip_ratio_c: float | None = None,
    agg_mode: str = "token-mean",
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t), ρ = e^{logp − old_logp}.

    ε_low/ε_high default to ``cliprange`` (set ``cliprange_high`` for DAPO clip-higher).
    Dual clip (off by default; ``clip_ratio_c`` > 1): for A < 0, ℓ_t = min(ℓ_t, −c·A_t).
    ``clipfrac`` = fraction of valid tokens where the clipped term is the active one.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    ratio = torch.exp(_log_ratio(logp, old_logp))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    loss_mat = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        dual = torch.minimum(loss_mat, -advantages * clip_ratio_c)
        loss_mat = torch.where(advantages < 0, dual, loss_mat)
    metrics = _ratio_metrics(logp, old_logp, response_mask)
    metrics["clipfrac"] = masked_mean(clip_active.to(logp.dtype), response_mask).detach()
    return agg_loss(loss_mat, response_mask, agg_mode), metrics


@POLICY_LOSSES.register("vanilla_pg")
def vanilla_pg(
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    agg_mode: str = "token-mean",
    **_: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE: ℓ_t = −A_t·logp_t (same gradient as ``ppo_clip`` at ρ = 1, i.e. on-policy)."""
    loss_mat = -advantages * logp
    metrics = _ratio_metrics(logp, old_logp, response_mask)
    metrics["clipfrac"] = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return agg_loss(loss_mat, response_mask, agg_mode), metrics


# --------------------------------------------------------------------------- critic and diagnostics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    cliprange_value: float | None = 0.2,
    agg_mode: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²).

    ``cliprange_value=None`` gives the plain ½·(V − R)². ``vf_clipfrac`` = fraction of valid
    tokens where the clipped term is larger.
    """
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        loss_mat = unclipped
        vf_clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        v_clip = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
        clipped = (v_clip - returns) ** 2
        loss_mat = torch.maximum(unclipped, clipped)
        vf_clipfrac = masked_mean((clipped > unclipped).to(values.dtype), response_mask).detach()
    return 0.5 * agg_loss(loss_mat, response_mask, agg_mode), {"vf_clipfrac": vf_clipfrac}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var(R − V)/Var(R) over valid tokens; nan when Var(R) = 0 (undefined)."""
    var_r = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_r
    return torch.where(var_r > 0, ev, torch.full_like(ev, float("nan")))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) − Σ_v softmax(z)_v·z_v over the last dim ([B, T, V] → [B, T]).

    Stable for large logits and for −inf (banned) entries.
    """
    p = torch.softmax(logits, dim=-1)
    finite = torch.where(torch.isneginf(logits), torch.zeros_like(logits), logits)
    return torch.logsumexp(logits, dim=-1) - (p * finite).sum(dim=-1)
