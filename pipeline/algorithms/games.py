"""Exact tabular preference games (ALGORITHMS.md A6-A9, D "Nash methods", E.3), for tests.

A game is a preference matrix P (n×n, float64, P + Pᵀ = 1, so P_yy = ½) over n one-token
"responses" (arms) and a reference policy π_ref. P(y≻π) = Σ_y' P[y, y']·π(y') = ``P @ π``.

Policies are passed to the iteration functions as normalised **log-probabilities** (``logpi``,
``ref_logpi``; any constant shift is removed with ``log_softmax``), because the convergence checks
need KL divergences far below float64's resolution of probabilities. The evaluation helpers
(:func:`p_vs`, :func:`exploitability`, :func:`regularized_exploitability`) take probabilities
(LP equilibria have exact zeros).

Each method has a closed-form step and, where the LLM version has a loss in
:mod:`pipeline.algorithms.nash`, a ``*_via_loss`` step that evaluates THE SAME registered loss on
every arm pair weighted by its probability (exact expectation) and differentiates it with
autograd. For on-policy policy-gradient losses the step is a mirror (natural-gradient) step:
with samples y ~ π, ∂L/∂θ_y = −π(y)·(f(y) − E_π f), so θ ← θ − s·(∂L/∂θ)/π is θ + s·(f − E_π f),
i.e. π ← π·e^{s·f}/Z, the multiplicative-weights update the closed forms are written in.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor

from pipeline.algorithms.nash import ONLINE_PREFERENCE_LOSSES

DTYPE = torch.float64
LossFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- games


def check_preference(P: Tensor, *, atol: float = 1e-12) -> Tensor:
    """``P`` as float64 after checking it is square, in [0, 1] and P + Pᵀ = 1 (ValueError otherwise)."""
    P = torch.as_tensor(P, dtype=DTYPE)
    if P.dim() != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"preference matrix must be square, got shape {tuple(P.shape)}")
    if bool((P < -atol).any() or (P > 1 + atol).any()):
        raise ValueError("preference matrix entries must lie in [0, 1]")
    if not torch.allclose(P + P.T, torch.ones_like(P), atol=atol, rtol=0):
        raise ValueError("preference matrix must satisfy P + Pᵀ = 1")
    return P


def random_preference(n: int, *, seed: int) -> Tensor:
    """Random game: P[i, j] ~ U(0, 1) for i < j, P[j, i] = 1 − P[i, j], P[i, i] = ½ (generically intransitive)."""
    g = torch.Generator().manual_seed(seed)
    upper = torch.triu(torch.rand(n, n, generator=g, dtype=DTYPE), diagonal=1)
    lower = torch.tril(1.0 - upper.T, diagonal=-1)
    return upper + lower + 0.5 * torch.eye(n, dtype=DTYPE)


def cyclic_preference(K: int, *, strength: float = 1.0) -> Tensor:
    """Generalised rock-paper-scissors: arm i beats the next ⌈K/2⌉ − 1 arms cyclically,
    P[i, j] = ½ + s/2 if 1 ≤ (j − i) mod K < K/2, ½ − s/2 if (j − i) mod K > K/2, else ½
    (s = ``strength`` ∈ (0, 1]). Circulant, so P(y≻uniform) = ½ for every y: uniform is a Nash
    equilibrium (the unique one for odd K). K = 3, s = 1 is rock-paper-scissors."""
    if K < 3:
        raise ValueError(f"cyclic_preference needs K >= 3, got {K}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    i = torch.arange(K)
    d = (i.unsqueeze(0) - i.unsqueeze(1)) % K  # d[i, j] = (j − i) mod K
    P = torch.full((K, K), 0.5, dtype=DTYPE)
    P[(d >= 1) & (2 * d < K)] = 0.5 + strength / 2
    P[2 * d > K] = 0.5 - strength / 2
    return P


def p_vs(P: Tensor, pi: Tensor) -> Tensor:
    """P(y≻π) = Σ_y' P[y, y']·π(y') for every arm y."""
    return P @ pi


def log_normalize(logits: Tensor) -> Tensor:
    """log π for π = softmax(logits)."""
    return torch.log_softmax(torch.as_tensor(logits, dtype=DTYPE), dim=-1)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) = Σ p·(log p − log q) from log-probabilities."""
    logp, logq = log_normalize(logp), log_normalize(logq)
    return (logp.exp() * (logp - logq)).sum()


def _kl_probs(p: Tensor, q: Tensor) -> Tensor:
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum()


# --------------------------------------------------------------------------- evaluation


def exploitability(P: Tensor, pi: Tensor) -> float:
    """Unregularised exploitability max_π' P(π'≻π) − ½ = max_y P(y≻π) − ½ (0 exactly at a Nash equilibrium)."""
    return float(p_vs(P, pi).max() - 0.5)


def regularized_exploitability(P: Tensor, pi: Tensor, pi_ref: Tensor, *, beta: float) -> float:
    """β-regularised exploitability (ALGORITHMS.md D), half the duality gap of the game
    P(π≻π') − β·KL(π‖π_ref) + β·KL(π'‖π_ref):

        β·log Σ_y π_ref(y)·e^{P(y≻π)/β} + β·KL(π‖π_ref) − ½   (≥ 0, = 0 only at π*).
    """
    best_response = beta * torch.logsumexp(torch.log(pi_ref) + p_vs(P, pi) / beta, dim=-1)
    return float(best_response + beta * _kl_probs(pi, pi_ref) - 0.5)


def fixed_point_residual(P: Tensor, logpi: Tensor, ref_logpi: Tensor, *, beta: float) -> float:
    """max_y |F(y) − mean F| for F = log π − log π_ref − P(y≻π)/β: 0 iff π ∝ π_ref·e^{P(y≻π)/β}."""
    logpi = log_normalize(logpi)
    F = logpi - log_normalize(ref_logpi) - p_vs(P, logpi.exp()) / beta
    return float((F - F.mean()).abs().max())


def regularized_nash(
    P: Tensor, ref_logpi: Tensor, *, beta: float, tol: float = 1e-12, max_iters: int = 100_000
) -> Tensor:
    """log π* of the β-regularised Nash equilibrium, the fixed point π* ∝ π_ref·exp(P(y≻π*)/β)
    (ALGORITHMS.md A6), to ``tol`` in :func:`fixed_point_residual`.

    Nash-MP iterations (η = 2β, contraction (1+2β)^{−1} in KL) bring the residual below 1e-3, then
    Newton steps on F(θ) = θ − log π_ref − P·softmax(θ)/β (Jacobian I − P·(diag π − ππᵀ)/β, always
    invertible: P − ½ is antisymmetric) finish quadratically; a Newton step that does not reduce the
    residual is replaced by a Nash-MP step. RuntimeError if ``tol`` is not reached.
    """
    P = check_preference(P)
    ref = log_normalize(ref_logpi)
    x = ref.clone()
    eye = torch.eye(P.shape[0], dtype=DTYPE)
    res = fixed_point_residual(P, x, ref, beta=beta)
    for _ in range(max_iters):
        if res < tol:
            return x
        if res < 1e-3:
            pi = x.exp()
            F = x - ref - p_vs(P, pi) / beta
            J = eye - P @ (torch.diag(pi) - torch.outer(pi, pi)) / beta
            cand = log_normalize(x + torch.linalg.solve(J, -F))
            cand_res = fixed_point_residual(P, cand, ref, beta=beta)
            if cand_res < res:
                x, res = cand, cand_res
                continue
        x = nash_mp_step(x, P, ref, beta=beta, eta=2 * beta)
        res = fixed_point_residual(P, x, ref, beta=beta)
    raise RuntimeError(f"regularized_nash: residual {res:.3e} after {max_iters} iterations (tol {tol:g})")


def nash_equilibrium_lp(P: Tensor) -> tuple[Tensor, float]:
    """Unregularised symmetric Nash equilibrium by linear programming (``scipy.optimize.linprog``).

    max v s.t. Σ_y π(y)·(P[y, y'] − ½) ≥ v for every y', Σπ = 1, π ≥ 0. Returns (π, v); for a
    symmetric zero-sum game v = 0 (the equilibrium's P(π≻π') − ½ against any π').
    """
    P = check_preference(P)
    A = (P - 0.5).numpy()
    n = A.shape[0]
    c = np.zeros(n + 1)
    c[-1] = -1.0  # minimise −v
    A_ub = np.hstack([-A.T, np.ones((n, 1))])  # v − Σ_y π(y) A[y, y'] ≤ 0
    A_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
    bounds = [(0.0, None)] * n + [(None, None)]
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(n), A_eq=A_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if not res.success:
        raise RuntimeError(f"nash_equilibrium_lp: linprog failed: {res.message}")
    pi = torch.as_tensor(np.clip(res.x[:n], 0.0, None), dtype=DTYPE)
    return pi / pi.sum(), float(res.x[-1])


# --------------------------------------------------------------------------- closed-form steps


def geometric_mixture(logpi: Tensor, ref_logpi: Tensor, *, weight: float) -> Tensor:
    """log π^μ for π^μ ∝ π^{1−w}·π_ref^{w} (Nash-MD's mixture, w = ηβ)."""
    return log_normalize((1.0 - weight) * log_normalize(logpi) + weight * log_normalize(ref_logpi))


def nash_md_step(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """Nash-MD (A6): π_{t+1} ∝ π_t^μ·exp(η·P(y≻π_t^μ)), π_t^μ ∝ π_t^{1−ηβ}·π_ref^{ηβ}."""
    mix = geometric_mixture(logpi, ref_logpi, weight=eta * beta)
    return log_normalize(mix + eta * p_vs(P, mix.exp()))


def nash_mp_prox(anchor_logpi: Tensor, opponent_pi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float,
                 eta: float) -> Tensor:
    """argmin_π (1/β)·P(opp≻π) + KL(π‖π_ref) + (1/η)·KL(π‖π_k) in closed form (A7):
    log π = [η/(β(1+η))]·P(y≻opp) + [η/(1+η)]·log π_ref + [1/(1+η)]·log π_k + c."""
    a = eta / (1.0 + eta)
    return log_normalize(
        (a / beta) * p_vs(P, opponent_pi) + a * log_normalize(ref_logpi) + (1.0 - a) * log_normalize(anchor_logpi)
    )


def nash_mp_step(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """Nash Mirror Prox (A7): π_{k+½} = prox(π_k; opponent π_k), π_{k+1} = prox(π_k; opponent π_{k+½}),
    both anchored at π_k. With η = 2β: KL(π*‖π_k) ≤ (1+2β)^{−k}·KL(π*‖π_0)."""
    logpi = log_normalize(logpi)
    half = nash_mp_prox(logpi, logpi.exp(), P, ref_logpi, beta=beta, eta=eta)
    return nash_mp_prox(logpi, half.exp(), P, ref_logpi, beta=beta, eta=eta)


def omd_step(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """Online mirror descent / INPO target (A9, τ = β): π_{t+1} ∝ π_t^{1−βη}·π_ref^{βη}·exp(η·P(y≻π_t)).
    One online-IPO gradient step is this update (:func:`online_ipo_step`)."""
    logpi = log_normalize(logpi)
    return log_normalize((1.0 - beta * eta) * logpi + beta * eta * log_normalize(ref_logpi) + eta * p_vs(P, logpi.exp()))


def _ipo_descent(theta: Tensor, opponent_pi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, lr: float) -> Tensor:
    """θ − lr·∇L for the uniform-pair online-IPO loss, in closed form: L = (2/n)·Σ(u − ū)², u = θ − log π_ref
    − P(y≻opp)/β, so ∇L = (4/n)·(u − ū)."""
    u = theta - log_normalize(ref_logpi) - p_vs(P, opponent_pi) / beta
    return theta - lr * 4.0 / theta.shape[-1] * (u - u.mean())


def online_ipo_step(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, lr: float) -> Tensor:
    """One gradient step (learning rate ``lr``) on the uniform-pair online-IPO loss against the current
    policy, in closed form: equal to :func:`omd_step` with η = 4·lr/(n·β)."""
    logpi = log_normalize(logpi)
    return log_normalize(_ipo_descent(logpi, logpi.exp(), P, ref_logpi, beta=beta, lr=lr))


def egpo_step(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, lr: float) -> Tensor:
    """EGPO (A8) on tabular logits, uniform pairs as in the EGPO code, in closed form:
    θ_{t+½} = θ_t − lr·∇L(θ_t; π_t), θ_{t+1} = θ_t − lr·∇L(θ_t; π_{t+½}). With 4·lr/n = η/(1+η)
    it coincides with :func:`nash_mp_step` (same anchored two-step structure)."""
    logpi = log_normalize(logpi)
    half = log_normalize(_ipo_descent(logpi, logpi.exp(), P, ref_logpi, beta=beta, lr=lr))
    return log_normalize(_ipo_descent(logpi, half.exp(), P, ref_logpi, beta=beta, lr=lr))


def inpo_step(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """INPO iteration: the exact population minimiser of the INPO loss is the OMD target (:func:`omd_step`)."""
    return omd_step(logpi, P, ref_logpi, beta=beta, eta=eta)


def iterate(step: Callable[[Tensor], Tensor], logpi0: Tensor, n_steps: int) -> list[Tensor]:
    """[π_0, π_1, ..., π_{n_steps}] (log-probabilities) of ``step`` applied repeatedly."""
    out = [log_normalize(logpi0)]
    for _ in range(n_steps):
        out.append(step(out[-1]))
    return out


# --------------------------------------------------------------------------- exact expected losses


def _pairs(n: int) -> tuple[Tensor, Tensor]:
    """All n² ordered arm pairs (y, y') as two LongTensors."""
    grid = torch.tensor(list(itertools.product(range(n), repeat=2)), dtype=torch.long)
    return grid[:, 0], grid[:, 1]


def expected_nash_md_pg_loss(theta: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float,
                             opponent_logpi: Tensor) -> Tensor:
    """E_{y~sg(π_θ), y'~opp}[``nash_md_pg`` loss]: every (y, y') weighted by π_θ(y)·opp(y')."""
    logp = torch.log_softmax(theta, dim=-1)
    y, yp = _pairs(theta.shape[-1])
    w = logp.detach().exp()[y] * log_normalize(opponent_logpi).exp()[yp]
    per = ONLINE_PREFERENCE_LOSSES.get("nash_md_pg")(
        logp=logp[y], ref_logp=log_normalize(ref_logpi)[y], preference=P[y, yp], beta=beta
    )
    return (w * per).sum()


def expected_nash_mp_pg_loss(theta: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float,
                             anchor_logpi: Tensor, opponent_logpi: Tensor) -> Tensor:
    """E_{y~sg(π_θ), y'~opp}[``nash_mp_pg`` loss] with the frozen anchor π_k."""
    logp = torch.log_softmax(theta, dim=-1)
    y, yp = _pairs(theta.shape[-1])
    w = logp.detach().exp()[y] * log_normalize(opponent_logpi).exp()[yp]
    per = ONLINE_PREFERENCE_LOSSES.get("nash_mp_pg")(
        logp=logp[y], ref_logp=log_normalize(ref_logpi)[y], anchor_logp=log_normalize(anchor_logpi)[y],
        preference=P[y, yp], beta=beta, eta=eta,
    )
    return (w * per).sum()


def expected_online_ipo_loss(theta: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, opponent_pi: Tensor,
                             mu: Tensor | None = None) -> Tensor:
    """E_{y,y'~μ}[``online_ipo`` loss] with the exact targets P(y≻opp) − P(y'≻opp); μ uniform by default
    (as the EGPO tabular code)."""
    n = theta.shape[-1]
    logp = torch.log_softmax(theta, dim=-1)
    ref = log_normalize(ref_logpi)
    mu = torch.full((n,), 1.0 / n, dtype=DTYPE) if mu is None else mu
    y, yp = _pairs(n)
    wins = p_vs(P, opponent_pi.detach())
    per = ONLINE_PREFERENCE_LOSSES.get("online_ipo")(
        logp=logp[y], logp_other=logp[yp], ref_logp=ref[y], ref_logp_other=ref[yp], target=wins[y] - wins[yp],
        beta=beta,
    )
    return (mu[y] * mu[yp] * per).sum()


def expected_inpo_loss(theta: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float,
                       prev_logpi: Tensor) -> Tensor:
    """E[``inpo`` loss] over pairs y, y' ~ π_t labelled by P: each ordered (y_w, y_l) weighted by
    π_t(y_w)·π_t(y_l)·P(y_w≻y_l)."""
    logp = torch.log_softmax(theta, dim=-1)
    ref, prev = log_normalize(ref_logpi), log_normalize(prev_logpi)
    w_, l_ = _pairs(theta.shape[-1])
    weight = prev.exp()[w_] * prev.exp()[l_] * P[w_, l_]
    per = ONLINE_PREFERENCE_LOSSES.get("inpo")(
        logp_chosen=logp[w_], logp_rejected=logp[l_], ref_logp_chosen=ref[w_], ref_logp_rejected=ref[l_],
        prev_logp_chosen=prev[w_], prev_logp_rejected=prev[l_], beta=beta, eta=eta,
    )
    return (weight * per).sum()


# --------------------------------------------------------------------------- steps through the losses


def loss_gradient(loss_fn: LossFn, theta: Tensor) -> Tensor:
    """∇_θ loss_fn(θ) by autograd (θ float64, detached copy)."""
    t = theta.detach().to(DTYPE).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(t), t)
    return g


def mirror_step(logpi: Tensor, loss_fn: LossFn, *, step: float) -> Tensor:
    """θ − step·∇L(θ)/π at θ = log π: the natural-gradient / multiplicative-weights step of an
    on-policy policy-gradient loss (∂L/∂θ_y = −π(y)·(f(y) − E_π f) ⇒ π ← π·e^{step·f}/Z)."""
    logpi = log_normalize(logpi)
    return log_normalize(logpi - step * loss_gradient(loss_fn, logpi) / logpi.exp())


def nash_md_step_via_loss(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """Nash-MD through ``nash_md_pg``: a mirror step of size η on the exact expected loss against the
    mixture opponent. Equals :func:`nash_md_step`: log π + η·(P(y≻π^μ) − β·log(π/π_ref)) + c
    = log π^μ + η·P(y≻π^μ) + c."""
    logpi = log_normalize(logpi)
    mix = geometric_mixture(logpi, ref_logpi, weight=eta * beta)
    return mirror_step(
        logpi, lambda th: expected_nash_md_pg_loss(th, P, ref_logpi, beta=beta, opponent_logpi=mix), step=eta
    )


def nash_mp_step_via_loss(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """Nash-MP through ``nash_mp_pg``: each prox step is one mirror step of size η/(β(1+η)) from the
    anchor π_k (which lands exactly on the prox point), the first against π_k, the second against
    π_{k+½}. Equals :func:`nash_mp_step`."""
    logpi = log_normalize(logpi)
    s = eta / (beta * (1.0 + eta))

    def prox(opponent: Tensor) -> Tensor:
        return mirror_step(logpi, lambda th: expected_nash_mp_pg_loss(
            th, P, ref_logpi, beta=beta, eta=eta, anchor_logpi=logpi, opponent_logpi=opponent), step=s)

    return prox(prox(logpi))


def online_ipo_step_via_loss(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, lr: float) -> Tensor:
    """One gradient step θ − lr·∇L on the exact uniform-pair ``online_ipo`` loss with the current policy
    as the (detached) opponent. Equals :func:`online_ipo_step`."""
    theta = log_normalize(logpi)
    g = loss_gradient(lambda th: expected_online_ipo_loss(th, P, ref_logpi, beta=beta, opponent_pi=theta.exp()), theta)
    return log_normalize(theta - lr * g)


def egpo_step_via_loss(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, lr: float) -> Tensor:
    """EGPO through ``online_ipo``: extragradient with both gradients at θ_t, targets from π_t then from
    π_{t+½}. Equals :func:`egpo_step`."""
    theta = log_normalize(logpi)

    def grad(opponent_pi: Tensor) -> Tensor:
        return loss_gradient(lambda th: expected_online_ipo_loss(th, P, ref_logpi, beta=beta, opponent_pi=opponent_pi),
                             theta)

    half = log_normalize(theta - lr * grad(theta.exp()))
    return log_normalize(theta - lr * grad(half.exp()))


def inpo_step_via_loss(logpi: Tensor, P: Tensor, ref_logpi: Tensor, *, beta: float, eta: float) -> Tensor:
    """INPO through ``inpo``: the exact minimiser over θ of the expected loss on pairs from π_t
    (Newton on the quadratic). Equals :func:`inpo_step`."""
    prev = log_normalize(logpi)
    theta = newton_minimize(lambda th: expected_inpo_loss(th, P, ref_logpi, beta=beta, eta=eta, prev_logpi=prev), prev)
    return log_normalize(theta)


def newton_minimize(loss_fn: LossFn, theta0: Tensor, *, tol: float = 1e-12, max_iters: int = 100) -> Tensor:
    """Minimise a smooth convex ``loss_fn`` of logits by Newton's method with autograd Hessians.

    The pseudo-inverse handles the softmax shift invariance (Hessian singular along 1); Armijo
    backtracking while the gradient is large, full steps once max|∇| < 1e-6. Stops when
    max|∇| < ``tol``; RuntimeError after ``max_iters``.
    """
    theta = theta0.detach().to(DTYPE).clone()
    for _ in range(max_iters):
        g = loss_gradient(loss_fn, theta)
        if float(g.abs().max()) < tol:
            return theta
        H = torch.autograd.functional.hessian(loss_fn, theta)
        step = -torch.linalg.pinv(H, hermitian=True) @ g
        t = 1.0
        if float(g.abs().max()) > 1e-6:
            f0 = float(loss_fn(theta))
            while float(loss_fn(theta + t * step)) > f0 + 1e-4 * t * float(g @ step) and t > 1e-8:
                t *= 0.5
        theta = theta + t * step
    raise RuntimeError(f"newton_minimize: max|grad| = {float(g.abs().max()):.3e} after {max_iters} iterations")
