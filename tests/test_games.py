"""Exact tabular preference games (ALGORITHMS.md A6-A9, D, E.3): equilibria, exploitability, convergence
rates of Nash-MD / Nash-MP / online IPO (OMD) / EGPO / INPO, and steps taken through the registered
online losses equal to the closed forms."""
from __future__ import annotations

import pytest
import torch

from pipeline.algorithms import games as g
from pipeline.algorithms.nash import ONLINE_PREFERENCE_LOSSES

D = torch.float64
P3 = torch.tensor([[0.5, 0.9, 0.2], [0.1, 0.5, 0.7], [0.8, 0.3, 0.5]], dtype=D)


def _games(count: int, seed: int = 0):
    """``count`` (P, ref_logpi, logpi0, beta): random games with n in 3..20, β cycling over {0.05, 0.2, 1}."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = int(torch.randint(3, 21, (1,), generator=rng))
        out.append((g.random_preference(n, seed=100 + i), torch.randn(n, generator=rng, dtype=D),
                    2 * torch.randn(n, generator=rng, dtype=D), (0.05, 0.2, 1.0)[i % 3]))
    return out


# --------------------------------------------------------------------------- games and equilibria


def test_preference_matrices():
    for P in (g.random_preference(7, seed=1), g.cyclic_preference(5), g.cyclic_preference(4, strength=0.6), P3):
        assert torch.allclose(P + P.T, torch.ones_like(P), atol=1e-15) and bool((P >= 0).all() & (P <= 1).all())
        g.check_preference(P)
    rps = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]], dtype=D)
    assert torch.equal(g.cyclic_preference(3), rps)
    for K in (3, 4, 6, 7):  # circulant: every arm wins half the time against uniform
        assert torch.allclose(g.p_vs(g.cyclic_preference(K, strength=0.7), torch.full((K,), 1 / K, dtype=D)),
                              torch.full((K,), 0.5, dtype=D), atol=1e-15)
    with pytest.raises(ValueError, match="P \\+ Pᵀ = 1"):
        g.check_preference(torch.tensor([[0.5, 0.9], [0.2, 0.5]], dtype=D))


def test_unregularized_equilibria_match_the_lp():
    pi, v = g.nash_equilibrium_lp(g.cyclic_preference(3))
    assert torch.allclose(pi, torch.full((3,), 1 / 3, dtype=D), atol=1e-9) and abs(v) < 1e-9
    pi, v = g.nash_equilibrium_lp(P3)
    assert torch.allclose(pi, torch.tensor([2 / 9, 3 / 9, 4 / 9], dtype=D), atol=1e-9) and abs(v) < 1e-9
    assert pi.tolist() == pytest.approx([0.2222, 0.3333, 0.4444], abs=1e-4)
    pi5, _ = g.nash_equilibrium_lp(g.cyclic_preference(5))
    assert torch.allclose(pi5, torch.full((5,), 0.2, dtype=D), atol=1e-9)
    for P in (P3, g.random_preference(9, seed=4)):
        pi, _ = g.nash_equilibrium_lp(P)
        assert abs(g.exploitability(P, pi)) < 1e-9  # no arm beats the equilibrium
    assert g.exploitability(P3, torch.full((3,), 1 / 3, dtype=D)) == pytest.approx(1.6 / 3 - 0.5)  # uniform is exploitable


@pytest.mark.parametrize("beta", [0.05, 0.2, 1.0])
def test_regularized_equilibria_have_zero_exploitability(beta):
    games_ = [(P, ref) for P, ref, _, _ in _games(6, seed=int(beta * 100))] + [
        (g.cyclic_preference(3), torch.tensor([0.0, 1.0, -1.0], dtype=D)), (P3, torch.zeros(3, dtype=D))]
    for P, ref in games_:
        star = g.regularized_nash(P, ref, beta=beta)
        pi_ref = g.log_normalize(ref).exp()
        assert g.fixed_point_residual(P, star, ref, beta=beta) < 1e-12
        assert abs(g.regularized_exploitability(P, star.exp(), pi_ref, beta=beta)) < 1e-9
        assert g.regularized_exploitability(P, pi_ref, pi_ref, beta=beta) > 1e-4  # π_ref is not the equilibrium


def test_regularized_equilibrium_of_rps_with_uniform_reference_is_uniform():
    star = g.regularized_nash(g.cyclic_preference(3), torch.zeros(3, dtype=D), beta=0.1)
    assert torch.allclose(star.exp(), torch.full((3,), 1 / 3, dtype=D), atol=1e-14)


# --------------------------------------------------------------------------- Nash-MP (A7)


def test_nash_mp_contracts_kl_by_one_plus_two_beta_per_iteration():
    """KL(π*‖π_k) ≤ (1+2β)^{−k}·KL(π*‖π_0) at every k with η = 2β (30 random games, n 3..20, β ∈ {0.05, 0.2, 1}),
    and on cyclic games; checked while the bound is above 1e-12 (float64 resolution of KL)."""
    cyclic = [(g.cyclic_preference(K), torch.randn(K, generator=torch.Generator().manual_seed(K), dtype=D),
               torch.zeros(K, dtype=D), beta) for K in (3, 4, 7) for beta in (0.05, 1.0)]
    worst = 0.0
    for P, ref, l0, beta in _games(30) + cyclic:
        star = g.regularized_nash(P, ref, beta=beta)
        kl0 = float(g.kl(star, l0))
        x = g.log_normalize(l0)
        for k in range(1, 201):
            x = g.nash_mp_step(x, P, ref, beta=beta, eta=2 * beta)
            bound = (1 + 2 * beta) ** (-k) * kl0
            if bound < 1e-12:
                break
            ratio = float(g.kl(star, x)) / bound
            assert ratio <= 1.0, (P.shape[0], beta, k, ratio)
            worst = max(worst, ratio)
    assert worst > 0.5  # the bound is nearly tight somewhere: the check is not vacuous


def test_nash_mp_reaches_rps_equilibrium():
    P, ref, beta = g.cyclic_preference(3), torch.tensor([1.0, 0.0, -0.5], dtype=D), 0.2
    xs = g.iterate(lambda x: g.nash_mp_step(x, P, ref, beta=beta, eta=2 * beta), torch.zeros(3, dtype=D), 200)
    assert g.regularized_exploitability(P, xs[-1].exp(), g.log_normalize(ref).exp(), beta=beta) < 1e-13


def test_nash_mp_step_through_loss_equals_closed_form_and_prox_point_is_stationary():
    for P, ref, l0, beta in _games(6, seed=5):
        eta = 2 * beta
        assert (g.nash_mp_step_via_loss(l0, P, ref, beta=beta, eta=eta)
                - g.nash_mp_step(l0, P, ref, beta=beta, eta=eta)).abs().max() < 1e-12
        # the closed-form prox point zeroes the exact expected gradient of the registered loss
        anchor = g.log_normalize(l0)
        half = g.nash_mp_prox(anchor, anchor.exp(), P, ref, beta=beta, eta=eta)
        grad = g.loss_gradient(lambda th: g.expected_nash_mp_pg_loss(
            th, P, ref, beta=beta, eta=eta, anchor_logpi=anchor, opponent_logpi=anchor), half)
        assert grad.abs().max() < 1e-13
        grad_at_anchor = g.loss_gradient(lambda th: g.expected_nash_mp_pg_loss(
            th, P, ref, beta=beta, eta=eta, anchor_logpi=anchor, opponent_logpi=anchor), anchor)
        assert grad_at_anchor.abs().max() > 1e-3


def test_egpo_with_matching_step_is_nash_mp():
    """Uniform-pair EGPO with 4·lr/n = η/(1+η) is exactly Nash-MP with η (same anchored two-step structure)."""
    for P, ref, l0, beta in _games(4, seed=6):
        n = P.shape[0]
        eta = 2 * beta
        assert (g.egpo_step(l0, P, ref, beta=beta, lr=n * eta / (1 + eta) / 4)
                - g.nash_mp_step(l0, P, ref, beta=beta, eta=eta)).abs().max() < 1e-12


# --------------------------------------------------------------------------- Nash-MD (A6)


def test_nash_md_step_through_loss_equals_closed_form():
    for P, ref, l0, beta in _games(6, seed=7):
        for eta in (0.1, 0.5):
            assert (g.nash_md_step_via_loss(l0, P, ref, beta=beta, eta=eta)
                    - g.nash_md_step(l0, P, ref, beta=beta, eta=eta)).abs().max() < 1e-12


def test_nash_md_pg_is_trl_form():
    """ℓ = β·h·logπ − (p − ½)·logπ, as TRL's Nash-MD trainer, with h detached."""
    logp = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    ref, p = torch.tensor([-1.5, -1.0], dtype=D), torch.tensor([0.7, 0.2], dtype=D)
    loss = ONLINE_PREFERENCE_LOSSES.get("nash_md_pg")(logp=logp, ref_logp=ref, preference=p, beta=0.1)
    h = [-1.0 + 1.5, -2.0 + 1.0]
    assert loss.tolist() == pytest.approx([0.1 * h[0] * -1.0 - 0.2 * -1.0, 0.1 * h[1] * -2.0 + 0.3 * -2.0])
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert grad.tolist() == pytest.approx([0.1 * h[0] - 0.2, 0.1 * h[1] + 0.3])  # no gradient through h


def test_nash_md_constant_step_is_biased_and_bias_shrinks_with_step():
    P, beta = g.random_preference(6, seed=11), 0.5
    ref = torch.randn(6, generator=torch.Generator().manual_seed(7), dtype=D)
    star = g.regularized_nash(P, ref, beta=beta)
    biases = []
    for eta in (0.4, 0.2, 0.1):
        x = g.log_normalize(ref)
        for _ in range(5000):
            nxt = g.nash_md_step(x, P, ref, beta=beta, eta=eta)
            if (nxt - x).abs().max() < 1e-15:
                break
            x = nxt
        assert (g.nash_md_step(x, P, ref, beta=beta, eta=eta) - x).abs().max() < 1e-13  # converged: it stalls here
        biases.append(float(g.kl(star, x)))
    assert all(b > 1e-6 for b in biases)  # a constant step never reaches π*
    for big, small in zip(biases, biases[1:]):
        assert 3.0 < big / small < 5.0  # bias ≈ O(η²): halving η divides the KL by ≈ 4


# --------------------------------------------------------------------------- online IPO / OMD, EGPO, INPO (A8, A9)


def test_online_ipo_step_through_loss_is_omd():
    for P, ref, l0, beta in _games(6, seed=8):
        n, lr = P.shape[0], 0.3
        via_loss = g.online_ipo_step_via_loss(l0, P, ref, beta=beta, lr=lr)
        assert (via_loss - g.online_ipo_step(l0, P, ref, beta=beta, lr=lr)).abs().max() < 1e-12
        assert (via_loss - g.omd_step(l0, P, ref, beta=beta, eta=4 * lr / (n * beta))).abs().max() < 1e-12


def test_online_ipo_population_optimum_is_the_preference_contrast():
    P, beta = g.random_preference(5, seed=2), 0.4
    ref = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=D)
    opp = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=D), -1)
    theta = g.newton_minimize(lambda th: g.expected_online_ipo_loss(th, P, ref, beta=beta, opponent_pi=opp),
                              torch.zeros(5, dtype=D))
    h = g.log_normalize(theta) - g.log_normalize(ref)
    target = g.p_vs(P, opp) / beta
    assert ((h - h.mean()) - (target - target.mean())).abs().max() < 1e-10


@pytest.mark.parametrize("P", [g.cyclic_preference(3), g.random_preference(8, seed=2)], ids=["rps", "random8"])
def test_omd_converges_linearly_for_large_beta(P):
    n, beta, eta = P.shape[0], 1.0, 0.5
    ref = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=D)
    star = g.regularized_nash(P, ref, beta=beta)
    xs = g.iterate(lambda x: g.online_ipo_step(x, P, ref, beta=beta, lr=eta * n * beta / 4), torch.zeros(n, dtype=D), 40)
    kls = [float(g.kl(star, x)) for x in xs]
    assert kls[0] > 1e-2 and kls[-1] < 1e-14
    assert all(kls[t + 5] < 0.1 * kls[t] for t in range(0, 20, 5))  # geometric decrease


@pytest.mark.parametrize("P", [g.cyclic_preference(3), g.random_preference(8, seed=2), g.cyclic_preference(5)],
                         ids=["rps", "random8", "cyclic5"])
@pytest.mark.parametrize("beta", [0.05, 0.2, 1.0])
def test_egpo_duality_gap_falls_linearly(P, beta):
    n = P.shape[0]
    ref = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=D)
    pi_ref = g.log_normalize(ref).exp()
    lr = n * (2 * beta / (1 + 2 * beta)) / 4
    x = torch.zeros(n, dtype=D)
    gaps = []
    for _ in range(80):
        gaps.append(2 * g.regularized_exploitability(P, x.exp(), pi_ref, beta=beta))
        x = g.egpo_step(x, P, ref, beta=beta, lr=lr)
    assert gaps[0] > 0.1 and gaps[-1] < 1e-6
    for t, gap in enumerate(gaps):
        if gaps[0] * (1 + 2 * beta) ** (-t) > 1e-12:
            assert gap <= gaps[0] * (1 + 2 * beta) ** (-t) * (1 + 1e-9), (t, gap)


def test_egpo_step_through_loss_equals_closed_form_and_beats_plain_online_ipo():
    for P, ref, l0, beta in _games(6, seed=9):
        assert (g.egpo_step_via_loss(l0, P, ref, beta=beta, lr=0.4)
                - g.egpo_step(l0, P, ref, beta=beta, lr=0.4)).abs().max() < 1e-12
    # on an intransitive game with small β, the same step without extragradient does not converge
    P, beta, n = g.cyclic_preference(3), 0.05, 3
    ref = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=D)
    pi_ref = g.log_normalize(ref).exp()
    lr = n * (2 * beta / (1 + 2 * beta)) / 4
    eg = g.iterate(lambda x: g.egpo_step(x, P, ref, beta=beta, lr=lr), torch.zeros(n, dtype=D), 100)[-1]
    plain = g.iterate(lambda x: g.online_ipo_step(x, P, ref, beta=beta, lr=lr), torch.zeros(n, dtype=D), 100)[-1]
    assert g.regularized_exploitability(P, eg.exp(), pi_ref, beta=beta) < 1e-10
    assert g.regularized_exploitability(P, plain.exp(), pi_ref, beta=beta) > 1e-3


def test_inpo_step_through_loss_is_the_omd_target():
    for P, ref, l0, beta in _games(6, seed=10):
        eta = 0.5
        assert (g.inpo_step_via_loss(l0, P, ref, beta=beta, eta=eta)
                - g.inpo_step(l0, P, ref, beta=beta, eta=eta)).abs().max() < 1e-10


@pytest.mark.parametrize("P", [g.cyclic_preference(3), g.random_preference(6, seed=5)], ids=["rps", "random6"])
def test_inpo_converges_to_regularized_equilibrium(P):
    n, beta, eta = P.shape[0], 0.5, 1.0
    ref = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D)
    star = g.regularized_nash(P, ref, beta=beta)
    x = torch.zeros(n, dtype=D)
    kls = [float(g.kl(star, x))]
    for t in range(30):
        x = g.inpo_step_via_loss(x, P, ref, beta=beta, eta=eta) if t < 3 else g.inpo_step(x, P, ref, beta=beta, eta=eta)
        kls.append(float(g.kl(star, x)))
    assert kls[0] > 1e-2 and kls[-1] < 1e-13
    assert all(b < a for a, b in zip(kls, kls[1:]) if a > 1e-14)
