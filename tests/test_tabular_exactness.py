"""Exact tabular checks (ALGORITHMS.md E.1, E.5) through the production registries."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.algorithms import tabular as tb

D = torch.float64
BETA = 0.5


@pytest.fixture(scope="module")
def bandit():
    """6-arm KL-regularised bandit: (pi_ref, r)."""
    g = torch.Generator().manual_seed(0)
    pi_ref = torch.softmax(0.5 * torch.randn(6, generator=g, dtype=D), -1)
    r = torch.rand(6, generator=g, dtype=D)
    return pi_ref, r


def _random_logits(seed, n=6):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_pg_k1_expected_gradient_is_objective_gradient(bandit):
    pi_ref, r = bandit
    for seed in range(3):
        theta = _random_logits(seed)
        pi = tb.softmax_policy(theta)
        shaped = r - BETA * (pi.log() - pi_ref.log())
        grad_j = pi * (shaped - (pi * shaped).sum())
        assert torch.allclose(tb.pg_k1_gradient(theta, pi_ref, r, BETA), grad_j, atol=1e-14)
        # on-policy PPO-clip surrogate gives the same expected gradient
        ppo = tb.expected_gradient(theta, pi_ref, r, BETA, policy_loss="ppo_clip")
        assert torch.allclose(ppo, grad_j, atol=1e-14)


def test_pg_k1_in_reward_converges_to_kl_regularized_optimum(bandit):
    pi_ref, r = bandit
    theta, _ = tb.solve(lambda th: tb.pg_k1_gradient(th, pi_ref, r, BETA), torch.zeros(6, dtype=D), lr=5.0)
    pi, pi_star = tb.softmax_policy(theta), tb.kl_regularized_optimum(pi_ref, r, BETA)
    assert (pi - pi_star).abs().max().item() < 1e-6
    optimal_value = BETA * math.log((pi_ref * torch.exp(r / BETA)).sum().item())
    assert tb.kl_regularized_objective(pi, pi_ref, r, BETA).item() == pytest.approx(optimal_value, abs=1e-10)


def test_rloo_in_reward_converges_to_kl_regularized_optimum(bandit):
    pi_ref, r = bandit
    theta, _ = tb.solve(lambda th: tb.rloo_gradient(th, pi_ref, r, BETA, k=2), torch.zeros(6, dtype=D), lr=5.0)
    pi_star = tb.kl_regularized_optimum(pi_ref, r, BETA)
    assert (tb.softmax_policy(theta) - pi_star).abs().max().item() < 1e-6


def test_grpo_k3_in_loss_lands_at_forward_kl_point_not_optimum(bandit):
    pi_ref, r = bandit
    theta0 = _random_logits(7)
    pi0 = tb.softmax_policy(theta0)
    # expected k3-loss gradient is −β∇KL(π_ref‖π) = β(π_ref − π) on top of the exact PG
    assert torch.allclose(tb.grpo_k3_gradient(theta0, pi_ref, r, BETA),
                          tb.exact_pg_gradient(theta0, r) + BETA * (pi_ref - pi0), atol=1e-14)
    theta, _ = tb.solve(lambda th: tb.grpo_k3_gradient(th, pi_ref, r, BETA), torch.zeros(6, dtype=D), lr=5.0)
    pi = tb.softmax_policy(theta)
    assert tb.forward_kl_stationarity_residual(pi, pi_ref, r, BETA).abs().max().item() < 1e-6
    assert (pi - tb.kl_regularized_optimum(pi_ref, r, BETA)).abs().max().item() > 1e-3


@pytest.mark.parametrize("k", [2, 3])
def test_rloo_expected_gradient_is_unbiased(k):
    g = torch.Generator().manual_seed(k)
    n = 4
    pi_ref = torch.softmax(torch.randn(n, generator=g, dtype=D), -1)
    r = torch.randn(n, generator=g, dtype=D)
    theta = torch.randn(n, generator=g, dtype=D)
    # no KL: E[ĝ_RLOO] = ∇E_π[r] (closed form)
    rloo = tb.rloo_gradient(theta, pi_ref, r, 0.0, k=k)
    exact = tb.exact_pg_gradient(theta, r)
    assert exact.abs().max() > 1e-2
    assert (rloo - exact).abs().max().item() < 1e-10
    # with k1 KL in the reward it matches the exact k1-PG gradient
    assert (tb.rloo_gradient(theta, pi_ref, r, BETA, k=k) - tb.pg_k1_gradient(theta, pi_ref, r, BETA)).abs().max() < 1e-10


def test_dr_grpo_expected_gradient_is_shrunk_by_one_minus_one_over_g():
    """Group-mean baseline includes the sample itself: E[ĝ] = (1 − 1/G)·∇E_π[r] (ALGORITHMS.md E.5)."""
    g = torch.Generator().manual_seed(9)
    n, G = 4, 3
    pi_ref = torch.softmax(torch.randn(n, generator=g, dtype=D), -1)
    r = torch.randn(n, generator=g, dtype=D)
    theta = torch.randn(n, generator=g, dtype=D)
    dr = tb.expected_gradient(theta, pi_ref, r, 0.0, estimator="dr_grpo", k=G, kl_in_reward=None)
    assert torch.allclose(dr, (1 - 1 / G) * tb.exact_pg_gradient(theta, r), atol=1e-12)
    std_norm = tb.expected_gradient(theta, pi_ref, r, 0.0, estimator="grpo", k=G, kl_in_reward=None)
    assert not torch.allclose(std_norm, dr, atol=1e-3)
