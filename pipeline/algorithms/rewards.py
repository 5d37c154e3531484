"""Reward shaping: sequence scores → per-token rewards.

Order used by the online trainers (N+ / OpenRLHF): EOS penalty → clip → (optional)
whitening of scores → :func:`token_level_rewards` with the KL penalty.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.algorithms.utils import zero_outside_mask, masked_whiten, whiten


def apply_missing_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float | None) -> Tensor:
    """score − penalty for rows without EOS (TRL ``missing_eos_penalty`` semantics).

    Note: the N+ recipe instead *replaces* the score by −1 when there is no EOS; TRL
    subtracts a positive ``penalty`` (e.g. 1.0). ``penalty=None`` leaves scores unchanged.
    Returns a new tensor.
    """
    if penalty is None:
        return scores
    return torch.where(has_eos.bool(), scores, scores - penalty)


def clip_rewards(scores: Tensor, clip: float | None) -> Tensor:
    """clip(score, −clip, clip); ``clip=None`` leaves scores unchanged."""
    if clip is None:
        return scores
    return scores.clamp(min=-clip, max=clip)


def whiten_rewards(scores: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(score − mean)/√(var + eps) over the batch (over masked entries when ``mask`` is given)."""
    if mask is None:
        return whiten(scores, shift_mean=shift_mean, eps=eps)
    return masked_whiten(scores, mask, shift_mean=shift_mean, eps=eps)


def last_token_index(response_mask: Tensor) -> Tensor:
    """Index of the last position where ``response_mask`` is nonzero, per row; −1 for an empty row."""
    T = response_mask.shape[-1]
    positions = torch.arange(T, device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask != 0, positions, torch.full_like(positions, -1)).max(dim=-1).values


def token_level_rewards(scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = −kl_coef·kl_t + 1[t = last valid token]·score, zero outside the mask.

    ``scores`` [B], ``kl`` and ``response_mask`` [B, T]. A row whose mask is all zero
    gets no score (it has no token to carry it).
    """
    rewards = zero_outside_mask(-kl_coef * kl, response_mask)
    last = last_token_index(response_mask)
    has_token = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_token]
    return rewards.index_put((rows, last[has_token]), scores[has_token].to(rewards.dtype), accumulate=True)
