"""Offline preference losses (ALGORITHMS.md B, E.1, E.2): hand-computed values for every registered
loss, mixing and metrics, config validation, the shared BT core, and tabular population optima."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from pipeline.algorithms import games
from pipeline.algorithms import preference_losses as pl
from pipeline.algorithms.preference_losses import PREFERENCE_LOSSES, PreferenceLogps, preference_loss
from pipeline.algorithms.reward_losses import bradley_terry_loss
from pipeline.errors import ConfigError

D = torch.float64
BETA = 0.5

#: the schema's defaults (TRL's), as the config would pass them
DEFAULTS = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 1.0,
    "discopop_tau": 0.05,
    "simpo_gamma": 0.5,
    "cpl_lambda": 0.5,
    "reference_free": False,
    "rpo_alpha": None,
}


def lsig(x: float) -> float:
    """log σ(x)"""
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# tiny pair batch: logπ(y_w), logπ(y_l), logπ_ref(y_w), logπ_ref(y_l), |y_w|, |y_l|
PW, PL_, RW, RL = [-1.0, -2.0], [-1.5, -1.0], [-1.2, -1.8], [-1.1, -1.3]
LW, LL = [2.0, 4.0], [3.0, 1.0]
HW = [PW[i] - RW[i] for i in range(2)]  # [0.2, -0.2]
HL = [PL_[i] - RL[i] for i in range(2)]  # [-0.4, 0.3]
DH = [HW[i] - HL[i] for i in range(2)]  # [0.6, -0.5]


def pair_batch(**kw) -> PreferenceLogps:
    t = lambda x: torch.tensor(x, dtype=D)  # noqa: E731
    args = dict(policy_chosen=t(PW), policy_rejected=t(PL_), ref_chosen=t(RW), ref_rejected=t(RL),
                chosen_len=t(LW), rejected_len=t(LL))
    args.update(kw)
    return PreferenceLogps(**args)


# tiny list batch: K = 3, second row padded to 2 responses
LP = [[-2.0, -1.0, -3.0], [-0.5, -4.0, 0.0]]
LR = [[-1.5, -1.5, -1.5], [-1.0, -2.0, 0.0]]
LLEN = [[1.0, 1.0, 3.0], [2.0, 4.0, 1.0]]
LMASK = [[True, True, True], [True, True, False]]


def list_batch(ref=True) -> PreferenceLogps:
    return PreferenceLogps(policy_logps=torch.tensor(LP, dtype=D), ref_logps=torch.tensor(LR, dtype=D) if ref else None,
                           lengths=torch.tensor(LLEN, dtype=D), mask=torch.tensor(LMASK))


def _opts(**kw):
    o = dict(DEFAULTS, beta=BETA)
    o.update(kw)
    return o


def _call(name, batch, **opts):
    meta = PREFERENCE_LOSSES.meta(name)
    o = _opts(**opts)
    kwargs = {k: o[k] for k in meta["options"]}
    kwargs.update({k: o[k] for k in meta["runtime"]})
    return PREFERENCE_LOSSES.get(name)(batch, beta=o["beta"], **kwargs)


# --------------------------------------------------------------------------- hand-computed values

B = BETA


def _aot_expect(eps):
    d = [a - b for a, b in zip(sorted([PW[i] - PL_[i] for i in range(2)]), sorted([RW[i] - RL[i] for i in range(2)]))]
    return [-(1 - eps) * lsig(B * x) - eps * lsig(-B * x) for x in d]  # d = [-0.5, 0.6]


def _orpo_expect():
    out = []
    for i in range(2):
        aw, al = PW[i] / LW[i], PL_[i] / LL[i]
        log_odds = (aw - al) - (math.log(1 - math.exp(aw)) - math.log(1 - math.exp(al)))
        sft = -PW[i] * 2 / (LW[0] + LW[1])
        out.append(sft - B * lsig(log_odds))
    return out


def _pl_expect():
    out = []
    for r in range(2):
        s = [B * (LP[r][k] - LR[r][k]) for k in range(3) if LMASK[r][k]]
        out.append(-sum(s[k] - math.log(sum(math.exp(x) for x in s[k:])) for k in range(len(s))))
    return out


CASES = {
    # name: [(options, batch factory, expected per-example)]
    "sigmoid": [
        ({}, pair_batch, [-lsig(B * d) for d in DH]),
        ({"label_smoothing": 0.1}, pair_batch, [-0.9 * lsig(B * d) - 0.1 * lsig(-B * d) for d in DH]),
        ({}, lambda: pair_batch(margin=torch.tensor([0.2, -0.1], dtype=D)),
         [-lsig(B * DH[0] - 0.2), -lsig(B * DH[1] + 0.1)]),
        ({"f_divergence_type": "forward_kl"}, pair_batch,
         [-lsig(B * (math.exp(-HL[i]) - math.exp(-HW[i]))) for i in range(2)]),
        ({"f_divergence_type": "js_divergence"}, pair_batch,
         [-lsig(B * (lsig(HW[i]) - lsig(HL[i]))) for i in range(2)]),
        ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}, pair_batch,
         [-lsig(B * (math.exp(-0.5 * HL[i]) - math.exp(-0.5 * HW[i])) / 0.5) for i in range(2)]),
        ({}, lambda: pair_batch().without_reference(), [-lsig(B * (PW[i] - PL_[i])) for i in range(2)]),
    ],
    "robust": [
        ({"label_smoothing": 0.2}, pair_batch, [(-0.8 * lsig(B * d) + 0.2 * lsig(-B * d)) / 0.6 for d in DH]),
    ],
    "exo_pair": [
        ({"label_smoothing": 0.2}, pair_batch,
         [sig(B * d) * (lsig(B * d) - math.log(0.8)) + sig(-B * d) * (lsig(-B * d) - math.log(0.2)) for d in DH]),
        ({}, pair_batch,  # ε = 0 → 1e-3 (TRL)
         [sig(B * d) * (lsig(B * d) - math.log(1 - 1e-3)) + sig(-B * d) * (lsig(-B * d) - math.log(1e-3)) for d in DH]),
    ],
    "hinge": [({}, pair_batch, [max(0.0, 1 - B * d) for d in DH])],
    "ipo": [
        ({}, pair_batch, [(HW[i] / LW[i] - HL[i] / LL[i] - 1 / (2 * B)) ** 2 for i in range(2)]),
        ({}, lambda: pair_batch(chosen_len=torch.ones(2, dtype=D), rejected_len=torch.ones(2, dtype=D)),
         [(d - 1 / (2 * B)) ** 2 for d in DH]),  # one-token responses: the paper's form
    ],
    "bco_pair": [({}, pair_batch, [-lsig(B * HW[i] - 0.05) - lsig(-(B * HL[i] - 0.05)) for i in range(2)])],
    "nca_pair": [({}, pair_batch,
                  [-lsig(B * HW[i]) - 0.5 * lsig(-B * HW[i]) - 0.5 * lsig(-B * HL[i]) for i in range(2)])],
    "sppo_hard": [({}, pair_batch, [(HW[i] - 1 / (2 * B)) ** 2 + (HL[i] + 1 / (2 * B)) ** 2 for i in range(2)])],
    "aot": [({}, pair_batch, _aot_expect(0.0)), ({"label_smoothing": 0.1}, pair_batch, _aot_expect(0.1))],
    "aot_pair": [({}, pair_batch,  # sort(h_w) = [-0.2, 0.2], sort(h_l) = [-0.4, 0.3]
                  [-lsig(B * 0.2), -lsig(B * -0.1)])],
    "apo_zero": [({}, pair_batch, [1 - sig(B * HW[i]) + sig(B * HL[i]) for i in range(2)])],
    "apo_down": [({}, pair_batch, [sig(B * HW[i]) + 1 - sig(B * DH[i]) for i in range(2)])],
    "discopop": [({"discopop_tau": 0.05}, pair_batch,
                  [-lsig(B * d) * (1 - sig(B * d / 0.05)) + math.exp(-B * d) * sig(B * d / 0.05) for d in DH])],
    "sft": [
        ({}, pair_batch, [1.0 * 2 / 6, 2.0 * 2 / 6]),  # −logπ(y_w)·B/Σ|y_w|: mean = 3/6 token-mean NLL
        ({}, list_batch, [2.0 * 2 / 3, 0.5 * 2 / 3]),  # best of each list, lengths 1 and 2
    ],
    "simpo": [({"simpo_gamma": 0.3, "label_smoothing": 0.1}, pair_batch,
               [-0.9 * lsig(z) - 0.1 * lsig(-z) for z in (B * (-0.5 + 0.5) - 0.3, B * (-0.5 + 1.0) - 0.3)])],
    "orpo": [({}, pair_batch, _orpo_expect())],
    "cpl": [({"cpl_lambda": 0.5}, pair_batch, [-lsig(B * PW[i] - 0.5 * B * PL_[i]) for i in range(2)])],
    "plackett_luce": [({}, list_batch, _pl_expect())],
    "rrhf": [({}, list_batch,  # p = [-2, -1, -1]: violations (0,1), (0,2) of 1 each, + 2 for −p_best;
              [1.0 + 1.0 + 2.0, 0.0 + 0.25])],  # p = [-0.25, -1]: no violation, + 0.25
}


def test_every_registered_loss_has_a_hand_computed_case():
    assert set(CASES) == set(PREFERENCE_LOSSES.names())


@pytest.mark.parametrize("name,case", [(n, c) for n, cs in CASES.items() for c in cs],
                         ids=[f"{n}-{i}" for n, cs in CASES.items() for i in range(len(cs))])
def test_loss_matches_hand_computation(name, case):
    opts, make_batch, expect = case
    got = _call(name, make_batch(), bco_delta=0.05, **opts)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_f_divergence_special_cases():
    b = pair_batch()
    fwd = _call("sigmoid", b, f_divergence_type="forward_kl")
    alpha1 = _call("sigmoid", b, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert torch.allclose(fwd, alpha1, atol=1e-14)  # α = 1 is forward KL
    near0 = _call("sigmoid", b, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1e-7)
    assert torch.allclose(near0, _call("sigmoid", b), atol=1e-6)  # α → 0 is reverse KL (DPO)
    assert not torch.allclose(fwd, _call("sigmoid", b), atol=1e-3)


def test_plackett_luce_with_two_responses_is_dpo_and_rrhf_ignores_padding():
    b2 = PreferenceLogps(policy_logps=torch.tensor([PW, PL_], dtype=D).T, ref_logps=torch.tensor([RW, RL], dtype=D).T)
    assert torch.allclose(_call("plackett_luce", b2), _call("sigmoid", pair_batch()), atol=1e-14)
    lb = list_batch()
    padded = PreferenceLogps(policy_logps=lb.policy_logps.clone().index_fill_(1, torch.tensor([2]), 100.0) * 1,
                             ref_logps=lb.ref_logps, lengths=lb.lengths, mask=lb.mask)
    # row 1's padding entry must not matter; row 0's third response is real and changes
    assert _call("rrhf", padded)[1] == _call("rrhf", lb)[1]
    assert _call("plackett_luce", padded)[1] == _call("plackett_luce", lb)[1]


# --------------------------------------------------------------------------- mixing, metrics, state


def test_mix_with_weights_and_trl_metrics():
    b = pair_batch()
    loss, m = preference_loss(b, ["sigmoid", "sft"], [1.0, 0.2], _opts())
    per = [-lsig(B * DH[i]) + 0.2 * (-PW[i] * 2 / 6) for i in range(2)]
    assert loss.item() == pytest.approx(sum(per) / 2, rel=1e-12)
    # TRL metrics: implicit rewards β·h, accuracies, summed log-probs
    assert m["rewards/chosen"].item() == pytest.approx(B * (HW[0] + HW[1]) / 2, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(B * (HL[0] + HL[1]) / 2, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(B * (DH[0] + DH[1]) / 2, abs=1e-12)
    assert m["rewards/accuracies"].item() == 0.5  # Δh = [0.6, -0.5]
    assert m["logps/chosen"].item() == pytest.approx(-1.5)
    assert m["logps/rejected"].item() == pytest.approx(-1.25)
    assert m["loss/sft"].item() == pytest.approx(3 / 6)  # token-mean NLL: (1 + 2)/(2 + 4)
    # rpo_alpha is the same as appending sft with that weight
    loss_rpo, _ = preference_loss(b, "sigmoid", None, _opts(rpo_alpha=0.2))
    assert loss_rpo.item() == pytest.approx(loss.item(), rel=1e-14)
    # per-example weights (WPO) multiply the mixed per-example loss
    w = torch.tensor([1.0, 0.0], dtype=D)
    loss_w, _ = preference_loss(pair_batch(weight=w), ["sigmoid", "sft"], [1.0, 0.2], _opts())
    assert loss_w.item() == pytest.approx(per[0] / 2, rel=1e-12)


def test_reference_free_option_drops_the_reference():
    loss, m = preference_loss(pair_batch(), "sigmoid", None, _opts(reference_free=True))
    expect = sum(-lsig(B * (PW[i] - PL_[i])) for i in range(2)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(B * sum(PW) / 2)
    with pytest.raises(ValueError, match="batch has none"):
        preference_loss(pair_batch().without_reference(), "sigmoid", None, _opts())
    with pytest.raises(ValueError, match="needs reference log-probs"):
        _call("nca_pair", pair_batch().without_reference())
    # a reference-free loss alone runs without reference log-probs
    preference_loss(pair_batch().without_reference(), "simpo", None, _opts())


def test_listwise_mix_and_metrics_use_best_and_worst():
    loss, m = preference_loss(list_batch(), ["plackett_luce", "sft"], [1.0, 0.5], _opts())
    pl_ = _pl_expect()
    sft = [2.0 * 2 / 3, 0.5 * 2 / 3]
    assert loss.item() == pytest.approx(sum(pl_[i] + 0.5 * sft[i] for i in range(2)) / 2, rel=1e-12)
    # best = column 0; worst = last real response (column 2, then column 1 for the padded row)
    assert m["rewards/chosen"].item() == pytest.approx(B * ((-2.0 + 1.5) + (-0.5 + 1.0)) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(B * ((-3.0 + 1.5) + (-4.0 + 2.0)) / 2)
    assert m["rewards/accuracies"].item() == 1.0


def test_margin_must_be_consumed():
    with pytest.raises(ValueError, match="margins"):
        preference_loss(pair_batch(margin=torch.zeros(2, dtype=D)), "ipo", None, _opts())


def test_bco_running_delta():
    rm = pl.RunningMean()
    assert rm.update(1.0) == 1.0
    assert rm.update(4.0, count=2) == pytest.approx(3.0)  # (1 + 2·4)/3
    state = rm.state_dict()
    rm2 = pl.RunningMean()
    rm2.load_state_dict(state)
    assert rm2.mean == pytest.approx(3.0) and rm2.count == 3
    stat = pl.bco_batch_reward_mean(pair_batch(), beta=B)
    assert stat.item() == pytest.approx(B * (sum(HW) + sum(HL)) / 4)
    loss, _ = preference_loss(pair_batch(), "bco_pair", None, _opts(), runtime={"bco_delta": 0.05})
    assert loss.item() == pytest.approx(sum(CASES["bco_pair"][0][2]) / 2, rel=1e-12)
    with pytest.raises(KeyError):
        preference_loss(pair_batch(), "bco_pair", None, _opts())


def test_batch_contract_errors():
    t = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="either"):
        PreferenceLogps()
    with pytest.raises(ValueError, match="shape"):
        PreferenceLogps(policy_chosen=t, policy_rejected=torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="both ref"):
        PreferenceLogps(policy_chosen=t, policy_rejected=t, ref_chosen=t)
    with pytest.raises(ValueError, match="at least 2"):
        PreferenceLogps(policy_logps=torch.zeros(1, 3, dtype=D), mask=torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="token counts"):
        _call("ipo", PreferenceLogps(policy_chosen=t, policy_rejected=t, ref_chosen=t, ref_rejected=t))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "simpo", "orpo", "cpl", "nca_pair", "discopop"])
def test_loss_decreases_when_chosen_logprob_rises(name):
    pc = torch.tensor([-1.0, -2.0], dtype=D, requires_grad=True)
    b = pair_batch(policy_chosen=pc)
    loss = _call(name, b, bco_delta=0.0).sum()
    (g,) = torch.autograd.grad(loss, pc)
    assert bool((g < 0).all()), g
    with torch.no_grad():
        up = _call(name, pair_batch(policy_chosen=pc.detach() + 0.1)).sum()
    assert up < loss


def test_dpo_gradient_matches_closed_form():
    """∂/∂logπ(y_w) of −log σ(βΔh) is −β·σ(−βΔh)."""
    pc = torch.tensor(PW, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(_call("sigmoid", pair_batch(policy_chosen=pc)).sum(), pc)
    assert g.tolist() == pytest.approx([-B * sig(-B * d) for d in DH], rel=1e-12)


# --------------------------------------------------------------------------- validation


def _validate(types, weights=None, data=None, **opts):
    return pl.validate_loss_config(types, weights, dict(DEFAULTS, **opts), key="dpo", defaults=DEFAULTS, data=data)


@pytest.mark.parametrize("types,weights,data,opts,where,text", [
    ("sigmod", None, None, {}, "dpo.loss_type", "did you mean 'sigmoid'"),
    ([], None, None, {}, "dpo.loss_type", "no preference loss"),
    (["sigmoid", "sft"], [1.0], None, {}, "dpo.loss_weights", "1 weights for 2 losses"),
    (["sigmoid", "sft"], [1.0, -0.1], None, {}, "dpo.loss_weights", ">= 0"),
    (["sigmoid", "sft"], [0.0, 0.0], None, {}, "dpo.loss_weights", "all weights are 0"),
    (["sigmoid", "sigmoid"], None, None, {}, "dpo.loss_type", "more than once"),
    ("ipo", None, None, {"label_smoothing": 0.1}, "dpo.label_smoothing", "no effect"),
    ("sigmoid", None, None, {"simpo_gamma": 1.0}, "dpo.simpo_gamma", "no effect"),
    ("sigmoid", None, None, {"discopop_tau": 0.1}, "dpo.discopop_tau", "no effect"),
    ("sigmoid", None, None, {"f_alpha_divergence_coef": 0.5}, "dpo.f_alpha_divergence_coef", "no effect"),
    ("nca_pair", None, None, {"f_divergence_type": "js_divergence"}, "dpo.f_divergence_type", "no effect"),
    ("sigmoid", None, None, {"cpl_lambda": 0.8}, "dpo.cpl_lambda", "no effect"),
    ("sigmoid", None, None, {"label_smoothing": 0.5}, "dpo.label_smoothing", r"\[0, 0.5\)"),
    ("sigmoid", None, None, {"label_smoothing": -0.1}, "dpo.label_smoothing", r"\[0, 0.5\)"),
    ("sigmoid", None, None, {"beta": 0.0}, "dpo.beta", "> 0"),
    ("sigmoid", None, None, {"f_divergence_type": "js_divergance"}, "dpo.f_divergence_type", "did you mean 'js_divergence'"),
    ("cpl", None, None, {"cpl_lambda": 1.5}, "dpo.cpl_lambda", r"\(0, 1\]"),
    ("sigmoid", None, None, {"label_smothing": 0.1}, "dpo.label_smothing", "did you mean 'label_smoothing'"),
    ("nca_pair", None, None, {"reference_free": True}, "dpo.reference_free", "need the reference"),
    ("simpo", None, None, {"reference_free": True}, "dpo.reference_free", "no effect"),
    (["simpo", "sigmoid"], None, None, {}, "dpo.loss_type", "reference-free by construction"),
    ("sft", None, None, {}, "dpo.loss_type", "no preference loss"),
    (["sigmoid", "sft"], None, None, {"rpo_alpha": 0.5}, "dpo.rpo_alpha", "both add the NLL"),
    ("sigmoid", None, None, {"rpo_alpha": -1.0}, "dpo.rpo_alpha", ">= 0"),
    ("plackett_luce", None, "pair", {}, "dpo.loss_type", "ranked lists"),
    ("sigmoid", None, "list", {}, "dpo.loss_type", "chosen/rejected pairs"),
    (["plackett_luce", "sigmoid"], None, None, {}, "dpo.loss_type", "mixed with pairwise"),
])
def test_invalid_loss_configs_raise_config_error_naming_the_key(types, weights, data, opts, where, text):
    with pytest.raises(ConfigError, match=text) as err:
        _validate(types, weights, data, **opts)
    assert err.value.where == where
    assert str(err.value).startswith(f"{where}: ")
    assert err.value.fix or "choose one of" in err.value.message  # says how to fix it


@pytest.mark.parametrize("types,weights,data,opts", [
    (["sigmoid", "sft"], [1.0, 0.2], "pair", {}),
    ("sigmoid", None, "pair", {"label_smoothing": 0.1, "f_divergence_type": "alpha_divergence",
                               "f_alpha_divergence_coef": 0.5}),
    (["simpo", "sigmoid"], None, "pair", {"reference_free": True}),
    ("ipo", None, "pair", {}),
    ("exo_pair", None, "pair", {"label_smoothing": 0.1}),
    ("sigmoid", None, "pair", {"rpo_alpha": 1.0}),
    (["plackett_luce", "sft"], [1.0, 0.1], "list", {}),
    ("rrhf", None, "list", {}),
    ("discopop", None, None, {"discopop_tau": 0.1}),
])
def test_valid_loss_configs_pass(types, weights, data, opts):
    got_types, got_weights = _validate(types, weights, data, **opts)
    assert got_types == ([types] if isinstance(types, str) else types)
    assert got_weights == (weights or [1.0] * len(got_types))


def test_metadata_schema_is_complete():
    allowed = {"reference": {"required", "optional", "none"}, "data": {"pair", "list", "any"},
               "role": {"preference", "regularizer"}}
    for name in PREFERENCE_LOSSES:
        meta = PREFERENCE_LOSSES.meta(name)
        assert set(meta) == {"reference", "options", "data", "role", "lengths", "margin", "runtime"}, name
        for k, vals in allowed.items():
            assert meta[k] in vals, (name, k)
        assert meta["options"] <= pl.OPTION_NAMES and isinstance(meta["lengths"], bool)
    assert pl.OPTION_NAMES == set(DEFAULTS)


def test_algorithms_package_does_not_import_stages_modules_or_run():
    root = Path(pl.__file__).parent
    for src in root.glob("*.py"):
        text = src.read_text()
        assert not re.search(r"pipeline\.(stages|modules|run)\b", text), src.name


# --------------------------------------------------------------------------- shared BT core


def test_bradley_terry_uses_the_shared_core_unchanged():
    g = torch.Generator().manual_seed(0)
    rc, rr, m, w = (torch.randn(7, generator=g, dtype=D) for _ in range(4))
    w = w.abs()
    old = -torch.nn.functional.logsigmoid(rc - rr - m) + 0.3 * (rc + rr) ** 2
    assert bradley_terry_loss(rc, rr, m, 0.3).item() == pytest.approx(old.mean().item(), rel=1e-14)
    assert bradley_terry_loss(rc, rr, m, 0.3, weights=w).item() == pytest.approx(
        ((old * w).sum() / w.sum()).item(), rel=1e-14)
    assert torch.allclose(pl.logistic_nll(rc - rr, label_smoothing=0.0), -torch.nn.functional.logsigmoid(rc - rr))


# --------------------------------------------------------------------------- tabular population optima (E.1, E.2)


def _one_token_pairs(n, pi_ref_logp, theta):
    """Batch of all ordered arm pairs (chosen y, rejected y') of one-token responses."""
    y, yp = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    y, yp = y.reshape(-1), yp.reshape(-1)
    logp = torch.log_softmax(theta, -1)
    one = torch.ones(n * n, dtype=D)
    return y, yp, PreferenceLogps(policy_chosen=logp[y], policy_rejected=logp[yp], ref_chosen=pi_ref_logp[y],
                                  ref_rejected=pi_ref_logp[yp], chosen_len=one, rejected_len=one)


def test_dpo_population_minimiser_is_kl_regularized_optimum():
    """E.1: BT labels from r on all π_ref×π_ref pairs; the expected registered ``sigmoid`` loss is minimised
    at π* = π_ref·e^{r/β}/Z."""
    g = torch.Generator().manual_seed(0)
    n, beta = 6, 0.5
    ref = torch.log_softmax(0.5 * torch.randn(n, generator=g, dtype=D), -1)
    r = torch.rand(n, generator=g, dtype=D)

    def expected_loss(theta):
        y, yp, batch = _one_token_pairs(n, ref, theta)
        w = ref.exp()[y] * ref.exp()[yp] * torch.sigmoid(r[y] - r[yp])  # P(y labelled chosen over y')
        return (w * _call("sigmoid", batch, beta=beta)).sum()

    theta = games.newton_minimize(expected_loss, ref.clone())
    pi_star = torch.softmax(ref + r / beta, -1)
    assert (torch.softmax(theta, -1) - pi_star).abs().max().item() < 1e-8
    assert (torch.softmax(ref, -1) - pi_star).abs().max().item() > 1e-2  # the test can fail


def test_ipo_population_optimum():
    """E.2: pairs from μ×μ labelled by P; the expected registered ``ipo`` loss (τ = β, one-token responses so TRL's
    length normalisation is the identity) is minimised where h(y) − h(y') = (P(y≻μ) − P(y'≻μ))/τ."""
    n, tau = 5, 0.3
    P = games.random_preference(n, seed=3)
    g = torch.Generator().manual_seed(1)
    mu = torch.softmax(torch.randn(n, generator=g, dtype=D), -1)
    ref = torch.log_softmax(torch.randn(n, generator=g, dtype=D), -1)

    def expected_loss(theta):
        y, yp, batch = _one_token_pairs(n, ref, theta)
        return (mu[y] * mu[yp] * P[y, yp] * _call("ipo", batch, beta=tau)).sum()

    theta = games.newton_minimize(expected_loss, torch.zeros(n, dtype=D))
    h = torch.log_softmax(theta, -1) - ref
    target = (P @ mu) / tau
    assert ((h - h.mean()) - (target - target.mean())).abs().max().item() < 1e-10
    assert (target - target.mean()).abs().max().item() > 0.1
