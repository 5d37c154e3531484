"""Offline preference losses (registry ``PREFERENCE_LOSSES``), the mixing combinator and
config validation (ALGORITHMS.md B; TRL ``DPOTrainer.dpo_loss`` / ``CPOTrainer`` / ``ORPOTrainer``).

Notation: π is the policy, π_ref the reference. For a response y, ``logπ(y)`` is the log-prob
summed over its tokens and h(y) = logπ(y) − logπ_ref(y) (the implicit reward is β·h).
For a pair, Δh = h(y_w) − h(y_l). σ is the logistic function.

Batch contract: one :class:`PreferenceLogps` per step, holding *sequence-level* summed log-probs
(``[B]`` for pairs, ``[B, K]`` for K ranked responses, best first) and token counts. Each
registered loss is a pure function::

    fn(batch: PreferenceLogps, *, beta, <its options>) -> per-example loss [B]

and :func:`preference_loss` mixes several with weights (TRL ``loss_type: [sigmoid, sft]``,
``loss_weights: [1.0, 0.2]``) into ``(scalar loss, metrics)``.

Metadata declared at registration (``PREFERENCE_LOSSES.meta(name)``):

=============  ====================================================================================
key            meaning
=============  ====================================================================================
``reference``  ``"required"`` reads π_ref log-probs and cannot run with ``reference_free``;
               ``"optional"`` reads them, and with ``reference_free=true`` uses a uniform reference
               (logπ_ref ≡ 0, TRL semantics); ``"none"`` never reads them (reference-free by construction).
``options``    frozenset of the config options (below) the loss reads, beyond ``beta``.
``data``       ``"pair"`` (chosen/rejected), ``"list"`` (K ranked responses) or ``"any"``.
``role``       ``"preference"`` or ``"regularizer"`` (``sft``: only meaningful mixed with a preference loss).
``lengths``    True when the loss needs token counts (length normalisation).
``margin``     True when the loss consumes the optional per-pair ``margin``.
``runtime``    frozenset of per-step state the stage must pass (``bco_delta``), not config.
=============  ====================================================================================

Config options (names as TRL's ``DPOConfig``/``CPOConfig`` where TRL has them). The defaults
live in the config schema, NOT here: the loss functions take these as keyword arguments without
defaults. TRL's defaults are listed for the schema author.

===========================  =========================  ===========================================
option                       TRL default                meaning / used by
===========================  =========================  ===========================================
``beta``                     0.1                        β: temperature of the implicit reward, IPO's τ,
                                                        ORPO's λ, CPL's α; every loss receives it
``label_smoothing``          0.0                        ε ∈ [0, 0.5): label-noise rate. ``sigmoid``
                                                        (cDPO), ``robust``, ``exo_pair`` (0 means 1e-3,
                                                        as TRL), ``aot``, ``aot_pair``, ``simpo``
``f_divergence_type``        ``"reverse_kl"``           f-DPO score ψ(h) replacing h: ``reverse_kl`` (h,
                                                        plain DPO), ``forward_kl`` (−e^{−h}),
                                                        ``js_divergence`` (log σ(h)), ``alpha_divergence``
                                                        (−e^{−αh}/α). ``sigmoid``, ``robust``,
                                                        ``exo_pair``, ``hinge``, ``ipo``
``f_alpha_divergence_coef``  1.0                        α of ``alpha_divergence`` (> 0; α = 1 is
                                                        forward KL, α → 0 reverse KL)
``discopop_tau``             0.05                       τ of the DiscoPOP blend (``discopop``)
``simpo_gamma``              0.5                        SimPO target margin γ (``simpo``)
``cpl_lambda``               0.5 (CPL repo; not TRL)    conservative bias λ ∈ (0, 1] (``cpl``)
``reference_free``           False                      ignore π_ref (uniform reference); only for
                                                        losses with ``reference="optional"``
``rpo_alpha``                None                       adds ``rpo_alpha``·``sft`` (RPO); same as
                                                        appending ``sft`` to ``loss_type`` with that
                                                        weight. TRL CPO's ``cpo_alpha`` is this with
                                                        ``reference_free=true``
===========================  =========================  ===========================================

``loss_type`` (a name or list, TRL default ``"sigmoid"``) and ``loss_weights`` (list or None =
all 1.0) pick and weight the losses; :func:`validate_loss_config` rejects invalid combinations.

Deliberate differences from TRL (documented where they occur): IPO normalises by token count only
inside ``ipo`` (TRL normalises the log-probs of *every* loss in a mix that contains ``ipo``); the
``rewards/*`` metrics are β·h once, not summed over the mix with the loss weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.registry import Registry, closest

PreferenceLoss = Callable[..., Tensor]
PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: options read by the f-divergence-aware losses (TRL applies ψ to the ``logits`` of these)
_F_OPTS = {"f_divergence_type", "f_alpha_divergence_coef"}
#: EXO with label_smoothing = 0 would divide by zero inside log ε; TRL substitutes 1e-3
EXO_MIN_EPSILON = 1e-3


# --------------------------------------------------------------------------- batch contract


@dataclass(frozen=True)
class PreferenceLogps:
    """Sequence-level log-probs of one preference batch (sums over response tokens).

    Pairwise data (``kind == "pair"``):
        ``policy_chosen``, ``policy_rejected`` [B]: logπ(y_w), logπ(y_l);
        ``ref_chosen``, ``ref_rejected`` [B] or None (reference-free);
        ``chosen_len``, ``rejected_len`` [B]: response token counts (length-normalised losses);
        ``margin`` [B] or None: per-pair target margin (losses with ``margin=True`` metadata).
    Listwise data (``kind == "list"``), K ranked responses per prompt, best first:
        ``policy_logps`` [B, K], ``ref_logps`` [B, K] or None, ``lengths`` [B, K],
        ``mask`` [B, K] bool (True = real response; padding anywhere is allowed, ≥ 2 per row).
    ``weight`` [B] or None: per-example weights multiplied into the mixed loss (e.g. WPO weights,
    computed detached by the caller).
    """

    policy_chosen: Tensor | None = None
    policy_rejected: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_len: Tensor | None = None
    rejected_len: Tensor | None = None
    margin: Tensor | None = None
    policy_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    lengths: Tensor | None = None
    mask: Tensor | None = None
    weight: Tensor | None = None

    def __post_init__(self) -> None:
        pair = self.policy_chosen is not None
        if pair == (self.policy_logps is not None):
            raise ValueError("PreferenceLogps: give either policy_chosen/policy_rejected (pairs) or policy_logps (lists)")
        if pair:
            if self.policy_rejected is None or self.policy_rejected.shape != self.policy_chosen.shape:
                raise ValueError("PreferenceLogps: policy_rejected must have the shape of policy_chosen")
            if self.policy_chosen.dim() != 1:
                raise ValueError(f"PreferenceLogps: pair log-probs must be [B], got {tuple(self.policy_chosen.shape)}")
            if (self.ref_chosen is None) != (self.ref_rejected is None):
                raise ValueError("PreferenceLogps: give both ref_chosen and ref_rejected, or neither")
            if (self.chosen_len is None) != (self.rejected_len is None):
                raise ValueError("PreferenceLogps: give both chosen_len and rejected_len, or neither")
        else:
            if self.policy_logps.dim() != 2:
                raise ValueError(f"PreferenceLogps: policy_logps must be [B, K], got {tuple(self.policy_logps.shape)}")
            if self.mask is None:
                object.__setattr__(self, "mask", torch.ones_like(self.policy_logps, dtype=torch.bool))
            elif self.mask.shape != self.policy_logps.shape:
                raise ValueError("PreferenceLogps: mask must have the shape of policy_logps")
            else:
                object.__setattr__(self, "mask", self.mask.bool())
            if bool((self.mask.sum(-1) < 2).any()):
                raise ValueError("PreferenceLogps: every list needs at least 2 real responses")

    @property
    def kind(self) -> str:
        return "pair" if self.policy_chosen is not None else "list"

    @property
    def has_reference(self) -> bool:
        return (self.ref_chosen if self.kind == "pair" else self.ref_logps) is not None

    def without_reference(self) -> "PreferenceLogps":
        """The same batch with the reference log-probs dropped (``reference_free``)."""
        return dataclasses.replace(self, ref_chosen=None, ref_rejected=None, ref_logps=None)

    def best_worst(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(policy_chosen, policy_rejected, ref_chosen, ref_rejected): the pair itself, or for
        lists the best (first real) and the worst (last real) response of each row."""
        if self.kind == "pair":
            return self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected
        first, last = _first_last(self.mask)
        rows = torch.arange(self.mask.shape[0], device=self.mask.device)
        ref = self.ref_logps
        return (
            self.policy_logps[rows, first],
            self.policy_logps[rows, last],
            None if ref is None else ref[rows, first],
            None if ref is None else ref[rows, last],
        )


def _first_last(mask: Tensor) -> tuple[Tensor, Tensor]:
    k = torch.arange(mask.shape[-1], device=mask.device)
    big = mask.shape[-1]
    first = torch.where(mask, k, torch.full_like(k, big)).min(-1).values
    last = torch.where(mask, k, torch.full_like(k, -1)).max(-1).values
    return first, last


def _require_ref(batch: PreferenceLogps, loss: str) -> None:
    if not batch.has_reference:
        raise ValueError(f"preference loss {loss!r} needs reference log-probs (ref_chosen/ref_rejected)")


def _require_lengths(batch: PreferenceLogps, loss: str) -> None:
    if (batch.chosen_len if batch.kind == "pair" else batch.lengths) is None:
        raise ValueError(f"preference loss {loss!r} needs token counts (chosen_len/rejected_len or lengths)")


def _logratios(batch: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """(h_w, h_l) = logπ − logπ_ref for chosen and rejected; logπ_ref ≡ 0 when reference-free."""
    if batch.ref_chosen is None:
        return batch.policy_chosen, batch.policy_rejected
    return batch.policy_chosen - batch.ref_chosen, batch.policy_rejected - batch.ref_rejected


def _capped_exp(x: Tensor) -> Tensor:
    """e^x with x clamped at log(max float) so it never overflows to inf (TRL ``cap_exp``)."""
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max)))


def f_divergence_logits(h_w: Tensor, h_l: Tensor, *, f_divergence_type: str, f_alpha_divergence_coef: float) -> Tensor:
    """ψ(h_w) − ψ(h_l) for the f-DPO score ψ = f′(π/π_ref) (TRL ``f_divergence_type``).

    ``reverse_kl``: ψ(h) = h (plain DPO). ``forward_kl``: ψ(h) = −e^{−h}.
    ``js_divergence``: ψ(h) = log σ(h) (TRL: Δh − (softplus(h_w) − softplus(h_l))).
    ``alpha_divergence``: ψ(h) = −e^{−αh}/α, α = ``f_alpha_divergence_coef`` (TRL's parametrisation;
    α = 1 gives forward KL, α → 0 reverse KL).
    """
    if f_divergence_type == "reverse_kl":
        return h_w - h_l
    if f_divergence_type == "forward_kl":
        return _capped_exp(-h_l) - _capped_exp(-h_w)
    if f_divergence_type == "js_divergence":
        return (h_w - h_l) - (F.softplus(h_w) - F.softplus(h_l))
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        return (_capped_exp(-a * h_l) - _capped_exp(-a * h_w)) / a
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCE_TYPES)}")


# --------------------------------------------------------------------------- shared logistic core


def logistic_nll(z: Tensor, *, label_smoothing: float) -> Tensor:
    """Pairwise-logistic negative log-likelihood of "first beats second" with logit z, per element:

        −(1 − ε)·log σ(z) − ε·log σ(−z)

    The core of Bradley-Terry reward modelling (z = r_w − r_l − m), DPO (z = β·Δh) and the
    other logistic preference losses. ε = ``label_smoothing`` (cDPO); ε = 0 is −log σ(z).
    """
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def plackett_luce_nll(scores: Tensor, mask: Tensor) -> Tensor:
    """Plackett-Luce negative log-likelihood of the ranking "column order" (best first), per row:

        −Σ_k [s_k − log Σ_{j≥k} e^{s_j}]   over real entries (``mask``), padding skipped.

    K = 2 gives −log σ(s_0 − s_1). (ALGORITHMS.md C "K-wise Plackett-Luce".)
    """
    mask = mask.bool()
    neg_inf = torch.finfo(scores.dtype).min
    s = torch.where(mask, scores, torch.full_like(scores, neg_inf))
    tail_lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)  # log Σ_{j≥k} e^{s_j}
    terms = torch.where(mask, s - tail_lse, torch.zeros_like(s))
    return -terms.sum(-1)


# --------------------------------------------------------------------------- pairwise losses (DPO family)


@PREFERENCE_LOSSES.register("sigmoid", reference="optional", options={"label_smoothing"} | _F_OPTS, data="pair",
                            role="preference", lengths=False, margin=True, runtime=set())
def sigmoid_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float, f_divergence_type: str,
                 f_alpha_divergence_coef: float) -> Tensor:
    """DPO: −log σ(β·Δψ − m); with ε = ``label_smoothing`` the conservative cDPO
    −(1−ε)·log σ(z) − ε·log σ(−z). Δψ = ψ(h_w) − ψ(h_l) (= Δh for ``reverse_kl``), m the optional
    per-pair ``margin`` (0 when absent). Also DNO / iterative DPO with π_t as the reference
    (ALGORITHMS.md A10/A11)."""
    z = beta * f_divergence_logits(*_logratios(batch), f_divergence_type=f_divergence_type,
                                   f_alpha_divergence_coef=f_alpha_divergence_coef)
    if batch.margin is not None:
        z = z - batch.margin
    return logistic_nll(z, label_smoothing=label_smoothing)


@PREFERENCE_LOSSES.register("robust", reference="optional", options={"label_smoothing"} | _F_OPTS, data="pair",
                            role="preference", lengths=False, margin=True, runtime=set())
def robust_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float, f_divergence_type: str,
                f_alpha_divergence_coef: float) -> Tensor:
    """Robust DPO (Chowdhury et al.): [−(1−ε)·log σ(z) + ε·log σ(−z)]/(1 − 2ε), z = β·Δψ − m.
    Unbiased under label-flip rate ε; ε = 0 is DPO."""
    eps = label_smoothing
    z = beta * f_divergence_logits(*_logratios(batch), f_divergence_type=f_divergence_type,
                                   f_alpha_divergence_coef=f_alpha_divergence_coef)
    if batch.margin is not None:
        z = z - batch.margin
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@PREFERENCE_LOSSES.register("exo_pair", reference="optional", options={"label_smoothing"} | _F_OPTS, data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def exo_pair_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float, f_divergence_type: str,
                  f_alpha_divergence_coef: float) -> Tensor:
    """EXO (pairwise, eq. 16): KL(p_θ ‖ p_ε) with p_θ = (σ(z), σ(−z)), p_ε = (1−ε, ε), z = β·Δψ:

        σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z) − log ε)

    ε = ``label_smoothing``; ε = 0 is replaced by 1e-3 (as TRL: log 0 is undefined)."""
    eps = label_smoothing if label_smoothing > 0 else EXO_MIN_EPSILON
    z = beta * f_divergence_logits(*_logratios(batch), f_divergence_type=f_divergence_type,
                                   f_alpha_divergence_coef=f_alpha_divergence_coef)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1.0 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@PREFERENCE_LOSSES.register("hinge", reference="optional", options=_F_OPTS, data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def hinge_loss(batch: PreferenceLogps, *, beta: float, f_divergence_type: str, f_alpha_divergence_coef: float) -> Tensor:
    """SLiC-style hinge: relu(1 − β·Δψ) (RSO's hinge-norm with γ = β)."""
    d = f_divergence_logits(*_logratios(batch), f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef)
    return torch.relu(1.0 - beta * d)


@PREFERENCE_LOSSES.register("ipo", reference="optional", options=_F_OPTS, data="pair",
                            role="preference", lengths=True, margin=False, runtime=set())
def ipo_loss(batch: PreferenceLogps, *, beta: float, f_divergence_type: str, f_alpha_divergence_coef: float) -> Tensor:
    """IPO (Azar et al. eq. 17, τ = β): (Δψ̄ − 1/(2β))², where h̄ = h/|y| is the log-ratio averaged
    over the response's tokens (TRL's normalisation, confirmed with the authors; ALGORITHMS.md B).
    On one-token responses this is the paper's (Δh − 1/(2τ))²."""
    _require_lengths(batch, "ipo")
    h_w, h_l = _logratios(batch)
    h_w, h_l = h_w / batch.chosen_len, h_l / batch.rejected_len
    d = f_divergence_logits(h_w, h_l, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    return (d - 1.0 / (2.0 * beta)) ** 2


@PREFERENCE_LOSSES.register("bco_pair", reference="required", options=set(), data="pair",
                            role="preference", lengths=False, margin=False, runtime={"bco_delta"})
def bco_pair_loss(batch: PreferenceLogps, *, beta: float, bco_delta: Tensor | float) -> Tensor:
    """BCO (pairwise): −log σ(β·h_w − δ) − log σ(−(β·h_l − δ)), δ = running mean of the implicit
    rewards. The stage keeps δ: one :class:`RunningMean`, updated every training step with
    :func:`bco_batch_reward_mean` (all-reduced over ranks), whose ``.mean`` (after the update, as
    TRL) is passed as ``bco_delta``; evaluation passes the current mean without updating it, and
    the running mean is saved with the checkpoint."""
    _require_ref(batch, "bco_pair")
    h_w, h_l = _logratios(batch)
    return -F.logsigmoid(beta * h_w - bco_delta) - F.logsigmoid(-(beta * h_l - bco_delta))


@PREFERENCE_LOSSES.register("nca_pair", reference="required", options=set(), data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def nca_pair_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """NCA (pairwise): −log σ(β·h_w) − ½·log σ(−β·h_w) − ½·log σ(−β·h_l)."""
    _require_ref(batch, "nca_pair")
    h_w, h_l = _logratios(batch)
    return -F.logsigmoid(beta * h_w) - 0.5 * F.logsigmoid(-beta * h_w) - 0.5 * F.logsigmoid(-beta * h_l)


@PREFERENCE_LOSSES.register("sppo_hard", reference="required", options=set(), data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def sppo_hard_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """SPPO with hard labels (P = 1 for the winner, 0 for the loser): (h_w − 1/(2β))² + (h_l + 1/(2β))²."""
    _require_ref(batch, "sppo_hard")
    h_w, h_l = _logratios(batch)
    return (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2


@PREFERENCE_LOSSES.register("aot", reference="required", options={"label_smoothing"}, data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def aot_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float) -> Tensor:
    """AOT (paired): d = sort(logπ_w − logπ_l) − sort(logπ_ref,w − logπ_ref,l), sorted over the batch
    (first-order stochastic dominance of the margins via 1-D optimal transport), then the
    logistic loss of β·d with label smoothing. Entry i belongs to the i-th quantile, not to pair i."""
    _require_ref(batch, "aot")
    pi = torch.sort(batch.policy_chosen - batch.policy_rejected, dim=0).values
    ref = torch.sort(batch.ref_chosen - batch.ref_rejected, dim=0).values
    return logistic_nll(beta * (pi - ref), label_smoothing=label_smoothing)


@PREFERENCE_LOSSES.register("aot_pair", reference="required", options={"label_smoothing"}, data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def aot_pair_loss(batch: PreferenceLogps, *, beta: float, label_smoothing: float) -> Tensor:
    """AOT (unpaired; TRL's ``aot_pair``, called ``aot_unpaired`` in newer TRL): d = sort(h_w) − sort(h_l)
    over the batch (the chosen-reward distribution must dominate the rejected one), then the
    logistic loss of β·d with label smoothing. Entry i belongs to the i-th quantile."""
    _require_ref(batch, "aot_pair")
    h_w, h_l = _logratios(batch)
    d = torch.sort(h_w, dim=0).values - torch.sort(h_l, dim=0).values
    return logistic_nll(beta * d, label_smoothing=label_smoothing)


@PREFERENCE_LOSSES.register("apo_zero", reference="optional", options=set(), data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def apo_zero_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """APO-zero (eq. 7; chosen better than the model's own outputs): 1 − σ(β·h_w) + σ(β·h_l)."""
    h_w, h_l = _logratios(batch)
    return 1.0 - torch.sigmoid(beta * h_w) + torch.sigmoid(beta * h_l)


@PREFERENCE_LOSSES.register("apo_down", reference="optional", options=set(), data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def apo_down_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """APO-down (eq. 8; chosen worse than the model's outputs): σ(β·h_w) + 1 − σ(β·(h_w − h_l))."""
    h_w, h_l = _logratios(batch)
    return torch.sigmoid(beta * h_w) + 1.0 - torch.sigmoid(beta * (h_w - h_l))


@PREFERENCE_LOSSES.register("discopop", reference="required", options={"discopop_tau"}, data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def discopop_loss(batch: PreferenceLogps, *, beta: float, discopop_tau: float) -> Tensor:
    """DiscoPOP (eq. 5, log-ratio modulated loss): z = β·Δh, m = σ(z/τ),
    ℓ = (1 − m)·(−log σ(z)) + m·e^{−z}, τ = ``discopop_tau``."""
    _require_ref(batch, "discopop")
    z = beta * (batch.policy_chosen - batch.policy_rejected - (batch.ref_chosen - batch.ref_rejected))
    m = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1.0 - m) + _capped_exp(-z) * m


# --------------------------------------------------------------------------- NLL and reference-free losses


def _sft_per_example(logp: Tensor, length: Tensor) -> Tensor:
    """−logπ(y)·B/Σ_j |y_j|: per-example shares whose batch mean is the token-mean NLL
    −Σ_i logπ(y_i)/Σ_i |y_i| (TRL's cross-entropy over all chosen tokens)."""
    return -logp * (logp.shape[0] / length.sum().clamp(min=1))


@PREFERENCE_LOSSES.register("sft", reference="none", options=set(), data="any",
                            role="regularizer", lengths=True, margin=False, runtime=set())
def sft_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """NLL of the chosen (for lists: the best) response, length-normalised over the batch:
    ℓ_i = −logπ(y_w,i)·B/Σ_j |y_w,j|, so mean_i ℓ_i = −Σ logπ(y_w)/Σ |y_w| (TRL's token-mean
    cross-entropy). Mixed with ``sigmoid`` it is RPO (TRL ``rpo_alpha``); with a reference-free
    ``sigmoid`` it is CPO (``cpo_alpha``). ``beta`` is unused."""
    _require_lengths(batch, "sft")
    if batch.kind == "pair":
        return _sft_per_example(batch.policy_chosen, batch.chosen_len)
    first, _ = _first_last(batch.mask)
    rows = torch.arange(first.shape[0], device=first.device)
    return _sft_per_example(batch.policy_logps[rows, first], batch.lengths[rows, first])


@PREFERENCE_LOSSES.register("simpo", reference="none", options={"simpo_gamma", "label_smoothing"}, data="pair",
                            role="preference", lengths=True, margin=False, runtime=set())
def simpo_loss(batch: PreferenceLogps, *, beta: float, simpo_gamma: float, label_smoothing: float) -> Tensor:
    """SimPO (reference-free, length-normalised): z = β·(logπ(y_w)/|y_w| − logπ(y_l)/|y_l|) − γ,
    ℓ = −(1−ε)·log σ(z) − ε·log σ(−z) (TRL ``CPOTrainer`` with ``loss_type="simpo"``, cpo_alpha = 0)."""
    _require_lengths(batch, "simpo")
    z = beta * (batch.policy_chosen / batch.chosen_len - batch.policy_rejected / batch.rejected_len) - simpo_gamma
    return logistic_nll(z, label_smoothing=label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0, stable at both ends (Mächler)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@PREFERENCE_LOSSES.register("orpo", reference="none", options=set(), data="pair",
                            role="preference", lengths=True, margin=False, runtime=set())
def orpo_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """ORPO (reference-free): NLL + λ·odds-ratio term, λ = ``beta`` (TRL ``ORPOConfig.beta``).

    With the token-averaged log-probs a = logπ(y)/|y|:
    log-odds = (a_w − a_l) − (log(1 − e^{a_w}) − log(1 − e^{a_l})),
    ℓ_i = sft_i − λ·log σ(log-odds_i), sft_i as in ``sft`` (its mean is the token-mean NLL)."""
    _require_lengths(batch, "orpo")
    a_w, a_l = batch.policy_chosen / batch.chosen_len, batch.policy_rejected / batch.rejected_len
    log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
    return _sft_per_example(batch.policy_chosen, batch.chosen_len) - beta * F.logsigmoid(log_odds)


@PREFERENCE_LOSSES.register("cpl", reference="none", options={"cpl_lambda"}, data="pair",
                            role="preference", lengths=False, margin=False, runtime=set())
def cpl_loss(batch: PreferenceLogps, *, beta: float, cpl_lambda: float) -> Tensor:
    """CPL (Hejna et al.; ALGORITHMS.md B): S(y) = α·Σ_t logπ(a_t|s_t) = α·logπ(y) with α = ``beta``,
    ℓ = −log σ(S(y_w) − λ·S(y_l)), conservative bias λ = ``cpl_lambda`` ∈ (0, 1] (λ = 1 is the
    symmetric loss)."""
    return logistic_nll(beta * batch.policy_chosen - cpl_lambda * beta * batch.policy_rejected, label_smoothing=0.0)


# --------------------------------------------------------------------------- listwise losses


@PREFERENCE_LOSSES.register("plackett_luce", reference="optional", options=set(), data="list",
                            role="preference", lengths=False, margin=False, runtime=set())
def plackett_luce_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """DPO-PL (DPO paper appendix A.3): Plackett-Luce NLL of the given ranking with scores β·h_k,
    −Σ_k [β·h_k − log Σ_{j≥k} e^{β·h_j}] over real responses (best first). K = 2 is ``sigmoid``."""
    h = batch.policy_logps if batch.ref_logps is None else batch.policy_logps - batch.ref_logps
    return plackett_luce_nll(beta * h, batch.mask)


@PREFERENCE_LOSSES.register("rrhf", reference="none", options=set(), data="list",
                            role="preference", lengths=True, margin=False, runtime=set())
def rrhf_loss(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """RRHF: p_k = logπ(y_k)/|y_k|; ℓ = Σ_{i ranked above j} max(0, p_j − p_i) − p_best.

    The fine-tuning term is the token-averaged NLL of the best response, as in the authors' code
    (ALGORITHMS.md writes the summed −logπ(y_best)). ``beta`` is unused."""
    _require_lengths(batch, "rrhf")
    mask = batch.mask
    p = batch.policy_logps / batch.lengths.clamp(min=1)
    k = torch.arange(mask.shape[-1], device=mask.device)
    above = (k.unsqueeze(-1) < k.unsqueeze(0)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)  # [B, i, j]: i above j
    rank = torch.where(above, torch.relu(p.unsqueeze(-2) - p.unsqueeze(-1)), torch.zeros_like(above, dtype=p.dtype))
    first, _ = _first_last(mask)
    best = p[torch.arange(p.shape[0], device=p.device), first]
    return rank.sum((-1, -2)) - best


# --------------------------------------------------------------------------- BCO running mean


@torch.no_grad()
def bco_batch_reward_mean(batch: PreferenceLogps, *, beta: float) -> Tensor:
    """mean(concat(β·h_w, β·h_l)) over the batch, detached: the statistic BCO's δ averages."""
    h_w, h_l = _logratios(batch)
    return beta * torch.cat([h_w, h_l]).mean()


class RunningMean:
    """Cumulative mean of per-step statistics (TRL ``RunningMoments`` mean): after n updates
    with values v_i and counts c_i, ``mean`` = Σ c_i·v_i / Σ c_i. ``state_dict``/``load_state_dict``
    let a stage checkpoint it."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0.0

    def update(self, value: float | Tensor, count: float = 1.0) -> float:
        """Add ``value`` with weight ``count`` (e.g. the world size after an all-reduce mean); returns the new mean."""
        total = self.count + count
        self.mean += (float(value) - self.mean) * count / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


# --------------------------------------------------------------------------- validation


#: every config-facing option name (the schema's keys); ``beta`` is read by all losses,
#: ``reference_free`` and ``rpo_alpha`` by the combinator
OPTION_NAMES = frozenset(
    {"beta", "reference_free", "rpo_alpha"}
    | set().union(*(PREFERENCE_LOSSES.meta(n)["options"] for n in PREFERENCE_LOSSES))
)


def _check_option_values(options: Mapping[str, Any], key: str) -> None:
    def bad(name: str, msg: str, fix: str) -> ConfigError:
        return ConfigError(f"{name}={options[name]!r} {msg}", where=f"{key}.{name}", fix=fix)

    def number(name: str) -> float | None:
        v = options.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(name, "must be a finite number", f"set {key}.{name} to a number")
        return float(v)

    if "beta" in options and not (number("beta") or 0) > 0:
        raise bad("beta", "must be > 0", f"set {key}.beta to a positive value (TRL default 0.1)")
    ls = number("label_smoothing")
    if ls is not None and not 0.0 <= ls < 0.5:
        raise bad("label_smoothing", "must be in [0, 0.5)", f"set {key}.label_smoothing to the label-noise rate, below 0.5")
    if "f_divergence_type" in options and options["f_divergence_type"] not in F_DIVERGENCE_TYPES:
        near = closest(options["f_divergence_type"], F_DIVERGENCE_TYPES)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise bad("f_divergence_type", f"is not an f-divergence{hint}", f"choose one of: {', '.join(F_DIVERGENCE_TYPES)}")
    for name, cond, text in (
        ("f_alpha_divergence_coef", lambda v: v > 0, "must be > 0"),
        ("discopop_tau", lambda v: v > 0, "must be > 0"),
        ("cpl_lambda", lambda v: 0 < v <= 1, "must be in (0, 1] (conservative bias)"),
        ("simpo_gamma", lambda v: True, ""),
        ("rpo_alpha", lambda v: v >= 0, "must be >= 0 (or null to disable)"),
    ):
        v = number(name)
        if v is not None and not cond(v):
            raise bad(name, text, f"fix {key}.{name}")
    if "reference_free" in options and not isinstance(options["reference_free"], bool):
        raise bad("reference_free", "must be true or false", f"set {key}.reference_free to true or false")


def _uses(name: str, loss: str, options: Mapping[str, Any]) -> bool:
    """Does ``loss`` read config option ``name`` (given the other options)?"""
    used = name in PREFERENCE_LOSSES.meta(loss)["options"]
    if name == "f_alpha_divergence_coef":
        used = used and options.get("f_divergence_type") == "alpha_divergence"
    return used


def validate_loss_config(
    loss_types: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    options: Mapping[str, Any],
    *,
    key: str,
    defaults: Mapping[str, Any],
    data: str | None = None,
) -> tuple[list[str], list[float]]:
    """Check a preference-loss configuration; return the normalised ``(loss_types, loss_weights)``.

    ``key`` is the config group (errors name ``{key}.loss_type``, ``{key}.loss_weights`` or
    ``{key}.<option>``); ``options`` maps option names (module table) to values; ``defaults`` maps
    them to the schema's defaults (an option equal to its default counts as unset); ``data`` is
    the dataset's kind, ``"pair"`` or ``"list"`` (None: only check the mix is consistent).

    Raises :class:`ConfigError` for: an empty or unknown loss (with the closest name), a repeated
    loss, weights of the wrong length / negative / not finite / all zero, an unknown option,
    an out-of-range option value (β ≤ 0, label_smoothing ∉ [0, 0.5), ...), a non-default option no
    chosen loss reads (a silent no-op is an error), ``rpo_alpha`` together with ``sft``,
    ``reference_free=true`` with a loss that needs the reference or with only reference-free losses,
    a reference-free-by-construction loss (simpo/orpo/cpl/rrhf) mixed with reference-based ones
    without ``reference_free``, a mix without a preference loss (``sft`` alone), and listwise
    losses on pairwise data or vice versa.
    """
    lt_key, lw_key = f"{key}.loss_type", f"{key}.loss_weights"
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types or [])
    if not types:
        raise ConfigError("no preference loss given", where=lt_key, fix="set it to e.g. sigmoid or [sigmoid, sft]")
    metas = {t: PREFERENCE_LOSSES.meta(t, key=lt_key) for t in types}
    dupes = sorted({t for t in types if types.count(t) > 1})
    if dupes:
        raise ConfigError(f"{', '.join(dupes)} listed more than once", where=lt_key,
                          fix="list each loss once and put its total weight in loss_weights")

    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = list(loss_weights)
        if len(weights) != len(types):
            raise ConfigError(f"{len(weights)} weights for {len(types)} losses {types}", where=lw_key,
                              fix=f"give one weight per entry of {lt_key}, or null for all 1.0")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"weight {w!r} is not a finite number >= 0", where=lw_key,
                                  fix="use non-negative weights")
        if not any(w > 0 for w in weights):
            raise ConfigError("all weights are 0: there is no loss to train on", where=lw_key,
                              fix="give at least one loss a positive weight")
        weights = [float(w) for w in weights]

    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        near = closest(unknown[0], OPTION_NAMES)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise ConfigError(f"unknown preference-loss option {unknown[0]!r}{hint}", where=f"{key}.{unknown[0]}",
                          fix=f"options are: {', '.join(sorted(OPTION_NAMES))}")
    _check_option_values(options, key)

    def is_set(name: str) -> bool:
        return name in options and (name not in defaults or options[name] != defaults[name])

    for name in sorted(OPTION_NAMES - {"beta", "reference_free", "rpo_alpha"}):
        if is_set(name) and not any(_uses(name, t, options) for t in types):
            users = [t for t in PREFERENCE_LOSSES if name in PREFERENCE_LOSSES.meta(t)["options"]]
            extra = " with f_divergence_type=alpha_divergence" if name == "f_alpha_divergence_coef" else ""
            raise ConfigError(
                f"{name}={options[name]!r} has no effect with loss_type {types} (a silent no-op is an error)",
                where=f"{key}.{name}",
                fix=f"remove it, or use a loss that reads it{extra}: {', '.join(users)}",
            )
    if options.get("rpo_alpha") is not None and "sft" in types:
        raise ConfigError("rpo_alpha and loss_type 'sft' both add the NLL term", where=f"{key}.rpo_alpha",
                          fix=f"drop rpo_alpha and weight 'sft' in {lw_key}, or drop 'sft'")

    if not any(m["role"] == "preference" for m in metas.values()):
        raise ConfigError(f"{types} has no preference loss ('sft' alone is supervised fine-tuning)", where=lt_key,
                          fix="add a preference loss, e.g. [sigmoid, sft] (RPO), or use the sft stage")

    ref_free = bool(options.get("reference_free", False))
    required = [t for t, m in metas.items() if m["reference"] == "required"]
    using = [t for t, m in metas.items() if m["reference"] != "none"]
    builtin_free = [t for t, m in metas.items() if m["reference"] == "none" and m["role"] == "preference"]
    if ref_free and required:
        raise ConfigError(f"reference_free=true but {required} need the reference model", where=f"{key}.reference_free",
                          fix=f"set reference_free=false, or use losses that can run without one "
                              f"({', '.join(t for t in PREFERENCE_LOSSES if PREFERENCE_LOSSES.meta(t)['reference'] != 'required')})")
    if ref_free and not using:
        raise ConfigError(f"reference_free=true has no effect: {types} never use a reference model",
                          where=f"{key}.reference_free", fix="remove reference_free")
    if builtin_free and using and not ref_free:
        raise ConfigError(
            f"{builtin_free} are reference-free by construction but {using} use the reference model",
            where=lt_key,
            fix=f"set {key}.reference_free=true (then {using} use a uniform reference) or do not mix them",
        )

    kinds = {m["data"] for m in metas.values()} - {"any"}
    if len(kinds) > 1:
        lists = [t for t, m in metas.items() if m["data"] == "list"]
        raise ConfigError(f"listwise losses {lists} mixed with pairwise losses in {types}", where=lt_key,
                          fix="use only listwise or only pairwise losses")
    if data is not None:
        if data not in ("pair", "list"):
            raise ValueError(f"data must be 'pair' or 'list', got {data!r}")
        wrong = [t for t, m in metas.items() if m["data"] not in (data, "any")]
        if wrong:
            need = "ranked lists of K responses" if data == "pair" else "chosen/rejected pairs"
            fitting = [t for t in PREFERENCE_LOSSES if PREFERENCE_LOSSES.meta(t)["data"] == data]
            raise ConfigError(f"{wrong} need {need} but the dataset has {'pairs' if data == 'pair' else 'ranked lists'}",
                              where=lt_key, fix=f"use one of: {', '.join(fitting)}")
    return types, weights


# --------------------------------------------------------------------------- combinator


def loss_terms(loss_types: str | Sequence[str], loss_weights: Sequence[float] | None,
               options: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(name, weight) pairs of the mix, with ``rpo_alpha`` expanded to an ``sft`` term."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"{len(weights)} loss weights for {len(types)} losses")
    terms = list(zip(types, weights))
    if options.get("rpo_alpha") is not None:
        terms.append(("sft", float(options["rpo_alpha"])))
    return terms


@torch.no_grad()
def reward_metrics(batch: PreferenceLogps, *, beta: float) -> dict[str, Tensor]:
    """TRL's metrics: ``rewards/chosen``, ``rewards/rejected`` (implicit rewards β·h, logπ_ref ≡ 0
    when reference-free), ``rewards/margins``, ``rewards/accuracies`` (fraction chosen > rejected),
    ``logps/chosen``, ``logps/rejected`` (summed log-probs). For lists: best vs worst response."""
    pc, pr, rc, rr = batch.best_worst()
    r_c = beta * (pc if rc is None else pc - rc)
    r_r = beta * (pr if rr is None else pr - rr)
    return {
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "rewards/margins": (r_c - r_r).mean(),
        "rewards/accuracies": (r_c > r_r).to(r_c.dtype).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }


def preference_loss(
    batch: PreferenceLogps,
    loss_types: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    options: Mapping[str, Any],
    *,
    runtime: Mapping[str, Any] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted mix of registered losses: mean_i [w_i^batch·Σ_k w_k·ℓ_k(i)] and metrics.

    ``options`` holds the config options (``beta`` and each chosen loss's declared options;
    ``reference_free=true`` drops the batch's reference log-probs; ``rpo_alpha`` adds an ``sft``
    term); ``runtime`` holds per-step state the losses declare (``bco_delta``). Validate the
    configuration once with :func:`validate_loss_config`; here a missing option is a ``KeyError``.
    Metrics: :func:`reward_metrics` plus ``loss/<name>`` (unweighted batch mean of each term).
    """
    runtime = runtime or {}
    if options.get("reference_free", False):
        batch = batch.without_reference()
    terms = loss_terms(loss_types, loss_weights, options)
    metas = {name: PREFERENCE_LOSSES.meta(name) for name, _ in terms}
    if not options.get("reference_free", False) and not batch.has_reference:
        needing = [n for n, m in metas.items() if m["reference"] != "none"]
        if needing:
            raise ValueError(f"{needing} use reference log-probs but the batch has none (and reference_free is false)")
    if batch.margin is not None and not any(m["margin"] for m in metas.values()):
        takes = [n for n in PREFERENCE_LOSSES if PREFERENCE_LOSSES.meta(n)["margin"]]
        raise ValueError(f"the batch has per-pair margins but none of {list(metas)} uses them (only {takes} do)")
    beta = options["beta"]
    total: Tensor | float = 0.0
    metrics: dict[str, Tensor] = {}
    for name, weight in terms:
        meta = metas[name]
        kwargs = {opt: options[opt] for opt in meta["options"]}
        kwargs.update({r: runtime[r] for r in meta["runtime"]})
        per_example = PREFERENCE_LOSSES.get(name)(batch, beta=beta, **kwargs)
        metrics[f"loss/{name}"] = per_example.detach().mean()
        total = total + weight * per_example
    if batch.weight is not None:
        total = total * batch.weight
    metrics.update(reward_metrics(batch, beta=beta))
    return total.mean(), metrics
