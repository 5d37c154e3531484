"""Advantage estimators (registry ``ADVANTAGE_ESTIMATORS``), in the style of verl's core_algos.

Every estimator has the same keyword-only signature::

    fn(*, token_rewards[B,T], response_mask[B,T], values[B,T] | None = None,
       group_index[B] | None = None, baseline_scores[B] | None = None,
       gamma=1.0, lam=0.95, norm_adv_by_std=True, eps=1e-6, **_) -> (advantages[B,T], returns[B,T])

and ignores the keywords it does not use. Rows sharing a ``group_index`` value (any
integers) form a group: the samples of one prompt. Outputs are 0 outside the mask and
carry no gradient (computed under ``torch.no_grad``).

The sequence return of a row is R = Σ_t r_t over its valid tokens (score − β·Σ kl_t with
the usual shaping). ``norm_adv_by_std=False`` turns every "divide by a std" step into
mean-centring only (Dr. GRPO for ``grpo``). ``eps`` is added to the group std in ``grpo``;
the global whitening uses :func:`masked_whiten`'s own variance epsilon.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pipeline.algorithms.rewards import last_token_index
from pipeline.algorithms.utils import masked_mean, masked_sum, masked_whiten, zero_outside_mask
from pipeline.errors import ConfigError
from pipeline.registry import Registry

AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")

_KEY = "algorithm.advantage_estimator"


# --------------------------------------------------------------------------- helpers


def _float_mask(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    if token_rewards.shape != response_mask.shape:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)} and response_mask {tuple(response_mask.shape)} differ")
    return response_mask.to(token_rewards.dtype)


def reward_to_go(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = r_t + γ·G_{next valid token}, i.e. Σ_{s≥t} γ^{s−t} r_s over valid tokens.

    Masked positions are skipped (their reward is ignored, G passes through them) and
    set to 0 in the output; G after the last valid token is 0.
    """
    mask = _float_mask(token_rewards, response_mask) != 0
    running = torch.zeros_like(token_rewards[:, 0])
    out = []
    for t in reversed(range(token_rewards.shape[1])):
        g = token_rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], g, running)
        out.append(g)
    return zero_outside_mask(torch.stack(out[::-1], dim=1), mask)


def sequence_returns(token_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """R = Σ_t r_t over each row's valid tokens, shape [B]."""
    return masked_sum(token_rewards, _float_mask(token_rewards, response_mask), dim=1)


def group_stats(x: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (group mean, unbiased group std, group size) of ``x`` [B] under ``group_index`` [B].

    The std of a group of size 1 is 0.
    """
    if group_index is None:
        raise ValueError("this advantage estimator needs group_index (which prompt each row belongs to)")
    if group_index.shape != x.shape:
        raise ValueError(f"group_index {tuple(group_index.shape)} does not match batch {tuple(x.shape)}")
    _, inv = torch.unique(group_index, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    zeros = torch.zeros(n_groups, dtype=x.dtype, device=x.device)
    count = zeros.index_add(0, inv, torch.ones_like(x))
    mean = zeros.index_add(0, inv, x) / count
    sq = zeros.index_add(0, inv, (x - mean[inv]) ** 2)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return mean[inv], var.sqrt()[inv], count[inv]


def _broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    return zero_outside_mask(seq_adv.unsqueeze(-1).expand_as(mask), mask)


def _normalise_global(x: Tensor, mask: Tensor, norm_adv_by_std: bool) -> Tensor:
    """Masked whitening over the whole batch, or mean-centring only."""
    if norm_adv_by_std:
        return masked_whiten(x, mask)
    return zero_outside_mask(x - masked_mean(x, mask), mask)


# --------------------------------------------------------------------------- estimators


@ADVANTAGE_ESTIMATORS.register("gae", needs={"values"})
@torch.no_grad()
def gae(
    *,
    token_rewards: Tensor,
    response_mask: Tensor,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    norm_adv_by_std: bool = True,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al.), as verl's masked GAE.

    δ_t = r_t + γ·V_{t'} − V_t (t' the next valid token, V = 0 after the last one);
    A_t = δ_t + γλ·A_{t'}; returns = A + V (unwhitened); advantages whitened over the
    batch's valid tokens. Masked positions inside a row are skipped.
    """
    if values is None:
        raise ConfigError("advantage estimator 'gae' needs a critic (values)", where=_KEY,
                          fix="use a critic-free estimator (grpo, rloo, reinforce_pp, remax) or enable the critic")
    mask = _float_mask(token_rewards, response_mask) != 0
    next_value = torch.zeros_like(token_rewards[:, 0])
    last_gae = torch.zeros_like(next_value)
    out = []
    for t in reversed(range(token_rewards.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * last_gae
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        last_gae = torch.where(mask[:, t], a, last_gae)
        out.append(a)
    adv = zero_outside_mask(torch.stack(out[::-1], dim=1), mask)
    returns = zero_outside_mask(adv + values, mask)
    return _normalise_global(adv, mask, norm_adv_by_std), returns


@ADVANTAGE_ESTIMATORS.register("grpo", needs={"groups"})
@torch.no_grad()
def grpo(
    *,
    token_rewards: Tensor,
    response_mask: Tensor,
    group_index: Tensor | None = None,
    norm_adv_by_std: bool = True,
    eps: float = 1e-6,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """GRPO group normalisation: A_i = (R_i − mean_g R)/(std_g R + eps), broadcast to tokens.

    std is the unbiased group std (as TRL/verl). ``norm_adv_by_std=False`` gives Dr. GRPO:
    A_i = R_i − mean_g R. A group of size 1 gets advantage 0. returns = advantages.
    """
    mask = _float_mask(token_rewards, response_mask)
    R = sequence_returns(token_rewards, mask)
    mean, std, _count = group_stats(R, group_index)
    seq_adv = R - mean
    if norm_adv_by_std:
        seq_adv = seq_adv / (std + eps)
    adv = _broadcast(seq_adv, mask)
    return adv, adv


@ADVANTAGE_ESTIMATORS.register("dr_grpo", needs={"groups"})
def dr_grpo(**kwargs: object) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: :func:`grpo` with group-mean centring only (``norm_adv_by_std`` forced False)."""
    kwargs["norm_adv_by_std"] = False
    return grpo(**kwargs)  # type: ignore[arg-type]


@ADVANTAGE_ESTIMATORS.register("rloo", needs={"groups"})
@torch.no_grad()
def rloo(
    *,
    token_rewards: Tensor,
    response_mask: Tensor,
    group_index: Tensor | None = None,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out: A_i = R_i − (1/(k−1))·Σ_{j≠i} R_j within the group, broadcast.

    Every group needs k ≥ 2. returns = advantages.
    """
    mask = _float_mask(token_rewards, response_mask)
    R = sequence_returns(token_rewards, mask)
    mean, _std, count = group_stats(R, group_index)
    if bool((count < 2).any()):
        raise ConfigError("advantage estimator 'rloo' needs at least 2 samples per prompt (a group of size 1 was found)",
                          where=_KEY, fix="sample k >= 2 responses per prompt (num_generations)")
    baseline = (mean * count - R) / (count - 1)
    adv = _broadcast(R - baseline, mask)
    return adv, adv


@ADVANTAGE_ESTIMATORS.register("remax", needs={"baseline_scores"})
@torch.no_grad()
def remax(
    *,
    token_rewards: Tensor,
    response_mask: Tensor,
    baseline_scores: Tensor | None = None,
    gamma: float = 1.0,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """ReMax: Ret_t = Σ_{s≥t} γ^{s−t} r_s − b, b = the greedy decode's sequence return (per row).

    As in the ReMax code (and verl), the per-token reward-to-go minus the baseline is used
    both as advantage and as return. On the first token (and on every token when the
    rewards are terminal-only) it equals R − b.
    """
    if baseline_scores is None:
        raise ConfigError("advantage estimator 'remax' needs baseline_scores (the greedy decode's return)",
                          where=_KEY, fix="enable greedy baseline sampling for remax")
    mask = _float_mask(token_rewards, response_mask)
    G = reward_to_go(token_rewards, mask, gamma)
    adv = zero_outside_mask(G - baseline_scores.to(G.dtype).unsqueeze(-1), mask)
    return adv, adv


@ADVANTAGE_ESTIMATORS.register("reinforce_pp", needs=set())
@torch.no_grad()
def reinforce_pp(
    *,
    token_rewards: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    norm_adv_by_std: bool = True,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (OpenRLHF "reinforce"): G_t = Σ_{s≥t} γ^{s−t} r_s; A = masked whitening of G
    over the whole batch; returns = G."""
    mask = _float_mask(token_rewards, response_mask)
    G = reward_to_go(token_rewards, mask, gamma)
    return _normalise_global(G, mask, norm_adv_by_std), G


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", needs={"groups"})
@torch.no_grad()
def reinforce_pp_baseline(
    *,
    token_rewards: Tensor,
    response_mask: Tensor,
    group_index: Tensor | None = None,
    gamma: float = 1.0,
    norm_adv_by_std: bool = True,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (OpenRLHF "reinforce_baseline").

    The group mean of the sequence return, mean_g R, is subtracted from the reward of each
    row's last valid token (where the score sits); then G_t = Σ_{s≥t} γ^{s−t} r_s and
    A = masked whitening of G over the whole batch; returns = G.
    Note: OpenRLHF subtracts the group mean of the score before adding the KL terms; here
    R includes the KL terms, so the baseline also holds the group-mean KL sum.
    """
    mask = _float_mask(token_rewards, response_mask)
    R = sequence_returns(token_rewards, mask)
    mean, _std, _count = group_stats(R, group_index)
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    shaped = token_rewards.index_put((rows, last[rows]), -mean[rows], accumulate=True)
    G = reward_to_go(shaped, mask, gamma)
    return _normalise_global(G, mask, norm_adv_by_std), G


# --------------------------------------------------------------------------- what each needs
def requirements(name: str) -> frozenset[str]:
    """What estimator ``name`` needs from the training loop besides token rewards and the mask,
    as declared at registration: ``values`` (a critic), ``groups`` (G >= 2 completions per
    prompt), ``baseline_scores`` (the score of a greedy decode per prompt). The loop and the
    config validation read this instead of testing estimator names; unknown names raise."""
    return ADVANTAGE_ESTIMATORS.meta(name, key=_KEY).get("needs", frozenset())
