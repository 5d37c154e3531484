"""Tabular (bandit) backend with exact expectations, for correctness tests.

A policy is a softmax over ``n`` arms given logits θ (torch float64). Each arm is a
one-token "response", so the production functions apply unchanged: rewards are shaped
with :func:`token_level_rewards` and a registered KL estimator, advantages come from a
registered estimator, and the surrogate loss is a registered policy loss differentiated
by autograd. Expectations are exact: the batch enumerates every arm (or every k-tuple of
arms for group estimators) and each row's advantage is weighted by its probability.

Gradients returned here are *ascent* directions on θ (minus the loss gradient).
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor

from pipeline.algorithms.advantages import ADVANTAGE_ESTIMATORS, sequence_returns
from pipeline.algorithms.kl import KL_ESTIMATORS
from pipeline.algorithms.policy_losses import POLICY_LOSSES, agg_loss
from pipeline.algorithms.rewards import token_level_rewards

DTYPE = torch.float64
GradFn = Callable[[Tensor], Tensor]


def softmax_policy(logits: Tensor) -> Tensor:
    """π = softmax(θ)."""
    return torch.softmax(logits.to(DTYPE), dim=-1)


def kl_regularized_optimum(pi_ref: Tensor, r: Tensor, beta: float) -> Tensor:
    """π* ∝ π_ref·exp(r/β), the maximiser of E_π r − β·KL(π‖π_ref)."""
    return torch.softmax(torch.log(pi_ref.to(DTYPE)) + r.to(DTYPE) / beta, dim=-1)


def kl_regularized_objective(pi: Tensor, pi_ref: Tensor, r: Tensor, beta: float) -> Tensor:
    """J(π) = Σ π·r − β·Σ π·log(π/π_ref)."""
    return (pi * r).sum() - beta * (pi * (torch.log(pi) - torch.log(pi_ref))).sum()


def exact_pg_gradient(logits: Tensor, r: Tensor) -> Tensor:
    """Closed form ∇_θ E_π[r] = π ⊙ (r − E_π r) for a softmax policy."""
    pi = softmax_policy(logits)
    return pi * (r - (pi * r).sum())


def forward_kl_stationarity_residual(pi: Tensor, pi_ref: Tensor, r: Tensor, beta: float) -> Tensor:
    """π(r − E_π r) − β(π − π_ref): zero at stationary points of E_π r − β·KL(π_ref‖π)
    (where GRPO with k3 in the loss lands)."""
    return pi * (r - (pi * r).sum()) - beta * (pi - pi_ref)


def enumerate_groups(n_arms: int, k: int) -> Tensor:
    """All n^k ordered k-tuples of arms, LongTensor [n^k, k]."""
    return torch.tensor(list(itertools.product(range(n_arms), repeat=k)), dtype=torch.long).reshape(-1, k)


def expected_gradient(
    logits: Tensor,
    pi_ref: Tensor,
    r: Tensor,
    beta: float,
    *,
    estimator: str | None = None,
    k: int = 1,
    kl_in_reward: str | None = "k1",
    kl_in_loss: str | None = None,
    policy_loss: str = "vanilla_pg",
    **estimator_kwargs: object,
) -> Tensor:
    """Exact E[ĝ] of a sampled on-policy gradient estimator, as an ascent direction on θ.

    Groups of ``k`` i.i.d. arms from π are enumerated with probability Π π(y_i). Per row:
    score r(y), token reward via :func:`token_level_rewards` with ``kl_in_reward`` (coefficient
    β; None = no KL in the reward); advantage via ``ADVANTAGE_ESTIMATORS[estimator]`` with
    the group as ``group_index`` (``estimator=None``: A = R, plain REINFORCE). The surrogate
    is ``POLICY_LOSSES[policy_loss]`` evaluated on-policy (old_logp = sg(logp)), plus
    β·``kl_in_loss`` differentiated through logp (GRPO style), each row weighted by
    P(group)/k so the batch average is the exact expectation of (1/k)·Σ_i per-sample terms.
    """
    theta = logits.detach().to(DTYPE).requires_grad_(True)
    logp_all = torch.log_softmax(theta, dim=-1)
    ref_logp_all = torch.log(pi_ref.to(DTYPE))
    groups = enumerate_groups(theta.shape[-1], k)
    arms = groups.reshape(-1)
    n_rows = arms.numel()
    group_index = torch.arange(groups.shape[0]).repeat_interleave(k)
    row_weight = (logp_all.detach()[groups].sum(dim=-1).exp() / k).repeat_interleave(k)

    logp = logp_all[arms].unsqueeze(-1)
    ref_logp = ref_logp_all[arms].unsqueeze(-1)
    mask = torch.ones_like(logp)
    kl = KL_ESTIMATORS.get(kl_in_reward)(logp.detach(), ref_logp) if kl_in_reward else torch.zeros_like(logp)
    rewards = token_level_rewards(r.to(DTYPE)[arms], kl, mask, beta if kl_in_reward else 0.0)
    if estimator is None:
        advantages = sequence_returns(rewards, mask).unsqueeze(-1) * mask
    else:
        advantages, _ = ADVANTAGE_ESTIMATORS.get(estimator)(
            token_rewards=rewards, response_mask=mask, group_index=group_index, **estimator_kwargs
        )

    scale = (row_weight * n_rows).unsqueeze(-1)  # token-mean divides by n_rows
    loss, _ = POLICY_LOSSES.get(policy_loss)(
        logp=logp, old_logp=logp.detach(), advantages=advantages * scale, response_mask=mask, agg_mode="token-mean"
    )
    if kl_in_loss:
        loss = loss + beta * agg_loss(KL_ESTIMATORS.get(kl_in_loss)(logp, ref_logp) * scale, mask, "token-mean")
    (grad,) = torch.autograd.grad(loss, theta)
    return -grad


def pg_k1_gradient(logits: Tensor, pi_ref: Tensor, r: Tensor, beta: float) -> Tensor:
    """E_π[(r(y) − β·log π(y)/π_ref(y))·∇log π(y)] (REINFORCE, k1 KL in the reward) = ∇J exactly."""
    return expected_gradient(logits, pi_ref, r, beta, kl_in_reward="k1")


def grpo_k3_gradient(
    logits: Tensor, pi_ref: Tensor, r: Tensor, beta: float, *, estimator: str | None = None, k: int = 1
) -> Tensor:
    """GRPO-style: unbiased reward gradient (REINFORCE, or e.g. ``estimator="rloo"``) and
    β·k3 as a *loss* term, differentiated through logp on on-policy samples.

    E_π[∇k3] = Σ (π − π_ref)·∇log π = ∇KL(π_ref‖π): the forward KL, so the fixed point
    solves π(r − E_π r) = β(π − π_ref), not π* ∝ π_ref·e^{r/β}.
    (GRPO's group-std scaling is left out: its population effect is a θ-dependent step
    size that would move the fixed point further.)
    """
    return expected_gradient(logits, pi_ref, r, beta, estimator=estimator, k=k, kl_in_reward=None, kl_in_loss="k3")


def rloo_gradient(logits: Tensor, pi_ref: Tensor, r: Tensor, beta: float, k: int = 2) -> Tensor:
    """Exact expected RLOO gradient over all k-tuples (k1 KL in the reward with coefficient β)."""
    return expected_gradient(logits, pi_ref, r, beta, estimator="rloo", k=k, kl_in_reward="k1")


def solve(
    grad_fn: GradFn, logits0: Tensor, *, lr: float = 1.0, tol: float = 1e-12, max_iters: int = 100_000
) -> tuple[Tensor, int]:
    """Gradient ascent θ ← θ + lr·grad_fn(θ) until max|grad| < tol; returns (θ, iterations).

    Raises RuntimeError when it has not converged after ``max_iters`` steps.
    """
    theta = logits0.detach().to(DTYPE).clone()
    for it in range(max_iters):
        g = grad_fn(theta)
        if float(g.abs().max()) < tol:
            return theta, it
        theta = theta + lr * g
    raise RuntimeError(f"solve: no convergence after {max_iters} steps (max|grad| = {float(g.abs().max()):.3e})")
