"""Online preference-game (Nash) losses on sampled responses (registry ``ONLINE_PREFERENCE_LOSSES``).

Pure per-sample functions of sequence-level log-probs ``[B]`` (sums over response tokens),
returning the per-sample loss ``[B]`` (the caller means). The online Nash stage calls them on
LLM samples; :mod:`pipeline.algorithms.games` calls THE SAME functions on every arm pair of a
tabular game, weighted by the pair's probability, to take exact expected steps (ALGORITHMS.md E.3).

Notation: h(y) = logπ(y) − logπ_ref(y); P(y≻y') a preference model (or σ(r(y) − r(y')) from an RM);
sg = stop-gradient (``detach``). All coefficients multiplying ``logp`` in the policy-gradient
losses are detached, so ∇ℓ = −coef·∇logπ(y): a REINFORCE estimator whose expectation over
y ~ π is the exact gradient of the objective written next to each loss.

=============  =====================================================================  ===========
name           per-sample loss                                                          ALGORITHMS
=============  =====================================================================  ===========
nash_md_pg     −sg(P(y≻y') − ½ − β·h(y))·logπ(y);  y ~ π, y' ~ π^μ ∝ π^{1−ηβ}π_ref^{ηβ}  A6
nash_mp_pg     −sg(P(y≻y') − ½ − β·h(y) − (β/η)·log(π(y)/π_k(y)))·logπ(y);  y ~ π,      A7
               y' ~ opponent (π_k, then π_{k+½}); π_k a frozen anchor copy
online_ipo     (h(y) − h(y') − (P(y≻y'') − P(y'≻y''))/β)²;  y, y' ~ μ, y'' ~ sg(π_opp)   A8
inpo           (log π(y_w)/π(y_l) − βη·log π_ref(y_w)/π_ref(y_l)                          A9
                − (1−βη)·log π_t(y_w)/π_t(y_l) − η/2)²;  pairs ~ π_t, oracle-labelled
=============  =====================================================================  ===========

Registry metadata (``ONLINE_PREFERENCE_LOSSES.meta(name)``): ``inputs`` (the keyword tensors the
loss takes), ``opponent`` (where y' / the targets come from: ``geometric_mixture``,
``anchor_then_half_step``, ``detached_policy``, ``previous_policy``) and ``options`` (its scalar
hyperparameters).

Outer operators and reuse (not separate losses):

- **EGPO** (A8) is the extragradient operator on ``online_ipo``: θ_{t+½} = θ_t − η∇L(θ_t; π_{θ_t});
  θ_{t+1} = θ_t − η∇_θL(θ; π_{θ_{t+½}})|_{θ_t}: the gradient is taken at θ_t, the opponent
  samples y'' (preference targets) come from the half-step policy.
- **Online IPO / OMD** is one plain step of ``online_ipo`` with the current policy as opponent.
- **Nash-MP** (A7): each prox step is a few steps of ``nash_mp_pg`` against a frozen π_k; the first
  uses opponent π_k, the second opponent π_{k+½}, both anchored at π_k (one mirror step with
  step η/(β(1+η)) from π_k is the exact prox point, see ``games.nash_mp_step_via_loss``).
- **DNO** (A10) and **online / iterative DPO** (A11) use the offline ``sigmoid`` preference loss
  (:mod:`pipeline.algorithms.preference_losses`) with π_t (DNO) or π_ref as the reference.
- INPO's τ is β here (the KL-regularisation coefficient), its η the OMD step.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from pipeline.registry import Registry

OnlineLoss = Callable[..., Tensor]
ONLINE_PREFERENCE_LOSSES: Registry[OnlineLoss] = Registry("online preference loss")


@ONLINE_PREFERENCE_LOSSES.register(
    "nash_md_pg", inputs={"logp", "ref_logp", "preference"}, opponent="geometric_mixture", options={"beta"}
)
def nash_md_pg_loss(*, logp: Tensor, ref_logp: Tensor, preference: Tensor, beta: float) -> Tensor:
    """Nash-MD-PG (Munos et al.; ALGORITHMS.md A6): ℓ = −sg(P(y≻y') − ½ − β·h(y))·logπ(y).

    ``logp`` = logπ(y) (with grad) for y ~ π; ``ref_logp`` = logπ_ref(y); ``preference`` = P(y≻y')
    for y' ~ π^μ ∝ π^{1−ηβ}·π_ref^{ηβ} (TRL: token-wise mixture of logits with α = ηβ).
    E[∇ℓ] = −∇_θ[P(π_θ≻π^μ) − β·KL(π_θ‖π_ref)]; with TRL's p = σ(RM(y) − RM(y')) this is TRL's
    ``β·h·logπ − (p − ½)·logπ``.
    """
    coef = (preference - 0.5 - beta * (logp - ref_logp)).detach()
    return -coef * logp


@ONLINE_PREFERENCE_LOSSES.register(
    "nash_mp_pg", inputs={"logp", "ref_logp", "anchor_logp", "preference"}, opponent="anchor_then_half_step",
    options={"beta", "eta"},
)
def nash_mp_pg_loss(
    *, logp: Tensor, ref_logp: Tensor, anchor_logp: Tensor, preference: Tensor, beta: float, eta: float
) -> Tensor:
    """Nash-MP prox step (ALGORITHMS.md A7), Nash-MD-PG-style estimator with a KL anchor:

        ℓ = −sg(P(y≻y') − ½ − β·h(y) − (β/η)·(logπ(y) − logπ_k(y)))·logπ(y)

    y ~ π (the policy being trained in the inner loop), ``anchor_logp`` = logπ_k(y) under the frozen
    anchor, y' ~ the opponent (π_k for the half step, π_{k+½} for the full step). E[∇ℓ] is −∇ of
    P(π≻opp) − β·KL(π‖π_ref) − (β/η)·KL(π‖π_k), i.e. of −β·[(1/β)·P(opp≻π) + KL(π‖π_ref) + (1/η)·KL(π‖π_k)],
    the prox objective whose minimiser is the closed form of A7.
    """
    coef = (preference - 0.5 - beta * (logp - ref_logp) - (beta / eta) * (logp - anchor_logp)).detach()
    return -coef * logp


@ONLINE_PREFERENCE_LOSSES.register(
    "online_ipo", inputs={"logp", "logp_other", "ref_logp", "ref_logp_other", "target"}, opponent="detached_policy",
    options={"beta"},
)
def online_ipo_loss(
    *, logp: Tensor, logp_other: Tensor, ref_logp: Tensor, ref_logp_other: Tensor, target: Tensor, beta: float
) -> Tensor:
    """Online IPO (ALGORITHMS.md A8): ℓ = (h(y) − h(y') − target/β)².

    y, y' ~ μ (the sampling distribution; the EGPO tabular code uses uniform pairs), ``target`` =
    P(y≻y'') − P(y'≻y'') with y'' ~ sg(π_opp) (unbiased for P(y≻π_opp) − P(y'≻π_opp), which the exact
    version passes). Population optimum: h(y) − h(y') = (P(y≻π_opp) − P(y'≻π_opp))/β.
    """
    return ((logp - ref_logp) - (logp_other - ref_logp_other) - target / beta) ** 2


@ONLINE_PREFERENCE_LOSSES.register(
    "inpo",
    inputs={"logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "prev_logp_chosen",
            "prev_logp_rejected"},
    opponent="previous_policy", options={"beta", "eta"},
)
def inpo_loss(
    *,
    logp_chosen: Tensor,
    logp_rejected: Tensor,
    ref_logp_chosen: Tensor,
    ref_logp_rejected: Tensor,
    prev_logp_chosen: Tensor,
    prev_logp_rejected: Tensor,
    beta: float,
    eta: float,
) -> Tensor:
    """INPO (ALGORITHMS.md A9, τ = β): on pairs y, y' ~ π_t labelled (y_w, y_l) by the oracle,

        ℓ = (log π(y_w)/π(y_l) − βη·log π_ref(y_w)/π_ref(y_l) − (1 − βη)·log π_t(y_w)/π_t(y_l) − η/2)²

    ``prev_logp_*`` are log-probs under the frozen previous iterate π_t. The population minimiser is
    the OMD target π_{t+1} ∝ π_t^{1−βη}·π_ref^{βη}·exp(η·P(y≻π_t)) (no win-rate estimates needed).
    """
    d = (
        (logp_chosen - logp_rejected)
        - beta * eta * (ref_logp_chosen - ref_logp_rejected)
        - (1.0 - beta * eta) * (prev_logp_chosen - prev_logp_rejected)
    )
    return (d - eta / 2.0) ** 2
