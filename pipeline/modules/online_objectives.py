"""The online preference objectives (registry ``ONLINE_OBJECTIVES``): one gradient step's loss.

Each objective is ``fn(ctx, prompts, opponent) -> (loss, metrics)``: it samples responses
through the rollout engine (``ctx.sample``), asks the judge for P(y ≻ y') (``ctx.preference``,
with the missing-EOS penalty), computes sequence log-probs and evaluates a registered loss of
:mod:`pipeline.algorithms.nash` (the same functions the exact tabular backend
:mod:`pipeline.algorithms.games` differentiates) or of
:mod:`pipeline.algorithms.preference_losses` (online / iterative DPO). ``opponent`` is the
model the opponent's responses come from: the policy itself for ``update_rule=plain``; for
``update_rule=extragradient`` the frozen θ_t copy (first half step) and then the frozen half-step
policy θ_{t+½} (second half).

Metadata declared at registration (read by the loop and the stage's validation):

- ``samples_from``: ``policy`` (y ~ the current policy: on-policy estimators) or ``round_start``
  (y ~ π_t, the policy frozen at the start of the round: INPO's pairs, online DPO's candidates);
- ``updates``: the update operators the objective supports (``plain``, ``extragradient``);
- ``min_generations``: the least ``algorithm.num_generations`` it needs;
- ``options``: the ``algorithm.*`` settings it reads besides ``beta`` and the sampling ones (a
  changed setting no objective reads is a configuration error, not a silent no-op);
- ``models``: frozen models it reads besides the policy and the reference: ``reference_sampler``
  (Nash-MD samples from the policy/reference mixture), ``anchor`` (Nash-MP's π_k),
  ``previous`` (INPO's π_t).

Sequence log-probs are sums over response tokens at temperature 1 (the policy's distribution;
``algorithm.temperature`` only changes how responses are sampled).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pipeline.algorithms.nash import ONLINE_PREFERENCE_LOSSES
from pipeline.algorithms.preference_losses import PREFERENCE_LOSSES, PreferenceLogps, preference_loss
from pipeline.registry import Registry

Objective = Callable[..., tuple[Tensor, dict]]
ONLINE_OBJECTIVES: Registry[Objective] = Registry("online objective")


def _pairs_within_groups(n: int, g: int) -> tuple[Tensor, Tensor]:
    """All unordered pairs (i < j) of rows inside each group of ``g`` consecutive rows of ``n``."""
    ii, jj = torch.triu_indices(g, g, offset=1)
    base = torch.arange(0, n, g).repeat_interleave(len(ii))
    return base + ii.repeat(n // g), base + jj.repeat(n // g)


@ONLINE_OBJECTIVES.register("nash_md_pg", samples_from="policy", updates={"plain"}, min_generations=1,
                            models={"reference_sampler"}, options={"mixture_coef"})
def nash_md(ctx, prompts: list[str], opponent) -> tuple[Tensor, dict]:
    """Nash-MD-PG (ALGORITHMS.md A6): y ~ π, y' ~ the token-level geometric mixture
    softmax((1 − α)·logits_π + α·logits_ref) (α = ``mixture_coef``), loss ``nash_md_pg`` with
    P(y ≻ y') from the judge."""
    a = ctx.acfg
    y = ctx.sample(ctx.policy, prompts)
    y_opp = ctx.sample(opponent, prompts, mixture=ctx.reference_sampler, alpha=a.mixture_coef)
    pref = ctx.preference(y, y_opp)
    logp, ref_logp = ctx.logp(y), ctx.ref_logp(y)
    loss = ONLINE_PREFERENCE_LOSSES.get("nash_md_pg")(logp=logp, ref_logp=ref_logp, preference=pref, beta=a.beta)
    return loss.mean(), {"rollout/win_rate": pref.mean(), "policy/kl": (logp - ref_logp).detach().mean(), **ctx.stats(y)}


@ONLINE_OBJECTIVES.register("nash_mp_pg", samples_from="policy", updates={"extragradient"}, min_generations=1,
                            models={"anchor"}, options={"eta"})
def nash_mp(ctx, prompts: list[str], opponent) -> tuple[Tensor, dict]:
    """A Nash-MP prox step (A7): y ~ π (the policy being trained), y' ~ the opponent (π_k in the
    first half step, π_{k+½} in the second), loss ``nash_mp_pg`` anchored at the frozen π_k
    (``ctx.anchor``: the weights the iteration started from)."""
    a = ctx.acfg
    y = ctx.sample(ctx.policy, prompts)
    y_opp = ctx.sample(opponent, prompts)
    pref = ctx.preference(y, y_opp)
    logp, ref_logp = ctx.logp(y), ctx.ref_logp(y)
    loss = ONLINE_PREFERENCE_LOSSES.get("nash_mp_pg")(logp=logp, ref_logp=ref_logp, anchor_logp=ctx.frozen_logp(ctx.anchor, y),
                                                      preference=pref, beta=a.beta, eta=a.eta)
    return loss.mean(), {"rollout/win_rate": pref.mean(), "policy/kl": (logp - ref_logp).detach().mean(), **ctx.stats(y)}


@ONLINE_OBJECTIVES.register("online_ipo", samples_from="policy", updates={"plain", "extragradient"},
                            min_generations=2, models=set(), options=set())
def online_ipo(ctx, prompts: list[str], opponent) -> tuple[Tensor, dict]:
    """Online IPO (A8): G responses y ~ μ = sg(π) per prompt and G opponent responses y'' ~ the
    opponent; each response's win estimate w_i = mean_k P(y_i ≻ y''_k); every pair i < j of a
    prompt is a sample of ``online_ipo`` with target w_i − w_j (an unbiased estimate of
    P(y_i ≻ π_opp) − P(y_j ≻ π_opp)). With ``update_rule=extragradient`` this is EGPO."""
    a, g = ctx.acfg, ctx.acfg.num_generations
    y = ctx.sample(ctx.policy, prompts)
    y_opp = ctx.sample(opponent, prompts)
    n = len(y)
    # every (y_i, y''_k) of the same prompt: row r of y against the g opponent rows of its prompt
    rows = torch.arange(n).repeat_interleave(g)
    opp_rows = (torch.arange(n) // g * g).repeat_interleave(g) + torch.arange(g).repeat(n)
    pref = ctx.preference(y, y_opp, rows, opp_rows)
    wins = pref.view(n, g).mean(1)
    i, j = _pairs_within_groups(n, g)
    logp, ref_logp = ctx.logp(y), ctx.ref_logp(y)
    loss = ONLINE_PREFERENCE_LOSSES.get("online_ipo")(
        logp=logp[i], logp_other=logp[j], ref_logp=ref_logp[i], ref_logp_other=ref_logp[j], target=wins[i] - wins[j],
        beta=a.beta)
    return loss.mean(), {"rollout/win_rate": wins.mean(), "policy/kl": (logp - ref_logp).detach().mean(), **ctx.stats(y)}


@ONLINE_OBJECTIVES.register("inpo", samples_from="round_start", updates={"plain"}, min_generations=2,
                            models={"previous"}, options={"eta"})
def inpo(ctx, prompts: list[str], opponent) -> tuple[Tensor, dict]:
    """INPO (A9): G responses per prompt from π_t (the round's starting policy); every pair i < j
    is judged once and enters ``inpo`` in both orders weighted by the label probabilities,
    P_ij·ℓ(y_i ≻ y_j) + (1 − P_ij)·ℓ(y_j ≻ y_i) (the expectation over the sampled label)."""
    a, g = ctx.acfg, ctx.acfg.num_generations
    y = ctx.sample(ctx.previous, prompts)
    i, j = _pairs_within_groups(len(y), g)
    p = ctx.preference(y, y, i, j)
    logp, ref_logp, prev = ctx.logp(y), ctx.ref_logp(y), ctx.frozen_logp(ctx.previous, y)
    fn = ONLINE_PREFERENCE_LOSSES.get("inpo")

    def ordered(w: Tensor, l: Tensor) -> Tensor:
        return fn(logp_chosen=logp[w], logp_rejected=logp[l], ref_logp_chosen=ref_logp[w], ref_logp_rejected=ref_logp[l],
                  prev_logp_chosen=prev[w], prev_logp_rejected=prev[l], beta=a.beta, eta=a.eta)

    loss = p * ordered(i, j) + (1 - p) * ordered(j, i)
    metrics = {"rollout/preference_margin": (p - 0.5).abs().mean(), **ctx.stats(y)}
    if ctx.previous is ctx.policy:
        metrics["policy/kl"] = (logp - ref_logp).detach().mean()
    return loss.mean(), metrics


@ONLINE_OBJECTIVES.register("best_worst", samples_from="round_start", updates={"plain"}, min_generations=2,
                            models=set(), options={"loss_type", "loss_weights", "label_smoothing", "f_divergence_type",
                                                   "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma",
                                                   "cpl_lambda", "reference_free", "rpo_alpha"})
def best_worst(ctx, prompts: list[str], opponent) -> tuple[Tensor, dict]:
    """Online / iterative DPO (A10, A11): G candidates per prompt from π_t, ranked by the judge
    (its reward, or its round-robin win rate among the candidates); pairwise ``loss_type`` losses
    train on (best, worst), listwise ones (plackett_luce, rrhf) on the full ranking. The reference
    is the KL reference (``nlhf.ref_update_every`` makes it π_t: DNO)."""
    a, g = ctx.acfg, ctx.acfg.num_generations
    y = ctx.sample(ctx.previous, prompts)
    scores = ctx.rank(y).view(-1, g)
    order = scores.argsort(dim=1, descending=True, stable=True) + torch.arange(0, len(y), g).unsqueeze(1)
    logp, ref_logp = ctx.logp(y), ctx.ref_logp(y)
    lengths = y.response_lengths.to(logp)
    types = [a.loss_type] if isinstance(a.loss_type, str) else list(a.loss_type)
    listwise = any(PREFERENCE_LOSSES.meta(t)["data"] == "list" for t in types)
    if listwise:
        batch = PreferenceLogps(policy_logps=logp[order], ref_logps=ref_logp[order], lengths=lengths[order])
    else:
        w, l = order[:, 0], order[:, -1]
        batch = PreferenceLogps(policy_chosen=logp[w], policy_rejected=logp[l], ref_chosen=ref_logp[w],
                                ref_rejected=ref_logp[l], chosen_len=lengths[w], rejected_len=lengths[l])
    loss, m = preference_loss(batch, a.loss_type, a.loss_weights, ctx.loss_options)
    sorted_scores = scores.gather(1, order - torch.arange(0, len(y), g).unsqueeze(1))
    metrics = {**{f"train/{k}": v for k, v in m.items()}, "rollout/score_margin": (sorted_scores[:, 0] - sorted_scores[:, -1]).mean(),
               **ctx.stats(y)}
    if ctx.previous is ctx.policy:
        metrics["policy/kl"] = (logp - ref_logp).detach().mean()
    return loss, metrics
