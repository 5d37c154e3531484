"""Masked reductions over ``[B, T]`` token tensors.

``mask`` is 1 (or True) on valid response tokens and 0 elsewhere (bool, int or float).
Values outside the mask never leak into a result, even when they are ``nan``/``inf``
(padding log-probs can be ``-inf``). An all-zero mask gives 0 instead of ``nan``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def zero_outside_mask(x: Tensor, mask: Tensor) -> Tensor:
    """x·mask, with exact zeros (not nan) where mask is 0 even if x is inf/nan there."""
    mask = mask.to(x.dtype)
    return torch.where(mask != 0, x * mask, torch.zeros_like(x))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m over ``dim`` (all elements when ``dim`` is None)."""
    xm = zero_outside_mask(x, mask)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_count(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ m over ``dim``, broadcast to ``x`` first, in ``x``'s dtype."""
    m = torch.broadcast_to(mask.to(x.dtype), x.shape)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x·m / Σ m over ``dim``; 0 where Σ m = 0."""
    total = masked_sum(x, mask, dim)
    count = masked_count(x, mask, dim)
    return torch.where(count > 0, total / count.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Masked variance Σ m(x − x̄)² / (Σ m − 1) (``unbiased``) or / Σ m; 0 where Σ m ≤ 1 (resp. 0)."""
    mean = masked_mean(x, mask, dim)
    centered = x - (mean if dim is None else mean.unsqueeze(dim))
    sq = masked_sum(centered**2, mask, dim)
    count = masked_count(x, mask, dim)
    denom = count - 1 if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(sq))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean)/√(var + eps) over all masked elements (unbiased var, as TRL/verl).

    With ``shift_mean=False`` the mean is added back: only the scale changes. Entries
    outside the mask are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_outside_mask(whitened, mask)


def whiten(x: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Unmasked :func:`masked_whiten` (e.g. over a ``[B]`` vector of sequence scores)."""
    return masked_whiten(x, torch.ones_like(x), shift_mean=shift_mean, eps=eps)
