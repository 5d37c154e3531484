"""Unit tests for pipeline.algorithms: masked ops, KL, reward shaping, advantages, losses."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    agg_loss,
    apply_missing_eos_penalty,
    build_kl_controller,
    clip_rewards,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    masked_var,
    masked_whiten,
    token_level_rewards,
    value_loss,
)
from pipeline.errors import ConfigError

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def ragged_mask(lengths, T):
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(D)


# --------------------------------------------------------------------------- masked ops


def test_masked_ops_ignore_padding_and_handle_empty_mask():
    x = t([[1.0, 2.0, float("nan")], [3.0, float("-inf"), 0.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert torch.allclose(masked_mean(x, m, dim=1), t([1.5, 3.0]))
    assert masked_var(x, m).item() == pytest.approx(1.0)  # unbiased var of 1,2,3
    empty = torch.zeros_like(m)
    assert masked_mean(x, empty).item() == 0.0
    assert masked_var(x, empty).item() == 0.0
    w = masked_whiten(x, m)
    assert torch.isfinite(w).all()
    assert w[m == 0].abs().max() == 0
    assert masked_mean(w, m).abs().item() < 1e-12
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(masked_whiten(x, empty)).all()


# --------------------------------------------------------------------------- KL


def _categorical(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    pi = torch.softmax(torch.randn(n, generator=g, dtype=D), -1)
    ref = torch.softmax(torch.randn(n, generator=g, dtype=D), -1)
    return pi, ref


def test_k1_and_k3_unbiased_by_exact_enumeration_k2_not():
    for seed in range(5):
        pi, ref = _categorical(seed)
        kl = (pi * (pi.log() - ref.log())).sum()
        e = {name: (pi * KL_ESTIMATORS.get(name)(pi.log(), ref.log())).sum() for name in ("k1", "k2", "k3")}
        assert e["k1"].item() == pytest.approx(kl.item(), abs=1e-14)
        assert e["k3"].item() == pytest.approx(kl.item(), abs=1e-14)
        assert abs(e["k2"].item() - kl.item()) > 1e-6


def test_k1_sample_mean_approximates_kl_and_k3_nonnegative():
    pi, ref = _categorical(11)
    kl = (pi * (pi.log() - ref.log())).sum().item()
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    k1 = KL_ESTIMATORS.get("k1")(pi.log()[idx], ref.log()[idx])
    assert abs(k1.mean().item() - kl) < 4 * k1.std().item() / math.sqrt(idx.numel())
    d = torch.linspace(-8, 8, 1001, dtype=D)
    assert (KL_ESTIMATORS.get("k3")(d, torch.zeros_like(d)) >= 0).all()
    assert KL_ESTIMATORS.get("k3")(d, torch.zeros_like(d), clamp=10.0).max() <= 10.0


def test_kl_controllers():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    up = ctl.value
    ctl.update(torch.tensor(3.0), n_steps=256)  # error −0.5 → clipped −0.2
    assert ctl.value < up
    ctl2 = build_kl_controller("adaptive", 0.1, target=6.0, horizon=1000)
    ctl2.update(6.6, n_steps=100)
    assert ctl2.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 1000))
    fixed = build_kl_controller("fixed", 0.05)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    with pytest.raises(ConfigError, match="adaptive"):
        build_kl_controller("nope", 0.1)
    with pytest.raises(ConfigError):
        build_kl_controller("adaptive", 0.1)


# --------------------------------------------------------------------------- rewards


def test_token_level_rewards_score_on_last_valid_token():
    scores = t([1.0, 2.0, 3.0, 4.0])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    kl = torch.full((4, 4), 0.5, dtype=D)
    r = token_level_rewards(scores, kl, mask, kl_coef=0.1)
    expected = -0.05 * mask
    expected[0, 2] += 1.0
    expected[1, 0] += 2.0
    expected[2, 2] += 3.0
    assert torch.allclose(r, expected)


def test_eos_penalty_and_clip():
    s = t([1.0, 2.0, -3.0])
    has_eos = torch.tensor([True, False, False])
    assert torch.equal(apply_missing_eos_penalty(s, has_eos, None), s)
    assert torch.allclose(apply_missing_eos_penalty(s, has_eos, 1.0), t([1.0, 1.0, -4.0]))
    assert torch.allclose(clip_rewards(s, 2.5), t([1.0, 2.0, -2.5]))
    assert torch.equal(clip_rewards(s, None), s)


# --------------------------------------------------------------------------- advantages


def est(name, **kw):
    return ADVANTAGE_ESTIMATORS.get(name)(**kw)


def test_gae_hand_example():
    gamma, lam = 0.9, 0.8
    rewards = t([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    values = t([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = est("gae", token_rewards=rewards, response_mask=mask, values=values, gamma=gamma, lam=lam)
    raw = t([[0.06736, 0.538, 0.9], [0.992, 0.6, 0.0]])
    assert torch.allclose(ret, (raw + values) * mask, atol=1e-12)
    valid = raw[mask.bool()]
    whitened = (raw - valid.mean()) / valid.std() * mask
    assert torch.allclose(adv, whitened, atol=1e-7)
    adv_c, _ = est("gae", token_rewards=rewards, response_mask=mask, values=values, gamma=gamma, lam=lam,
                   norm_adv_by_std=False)
    assert torch.allclose(adv_c, (raw - valid.mean()) * mask, atol=1e-12)


def _brute_gae(r, v, m, gamma, lam):
    B, T = r.shape
    A = torch.zeros_like(r)
    for b in range(B):
        idx = [i for i in range(T) if m[b, i] > 0]
        for k, i in enumerate(idx):
            total = 0.0
            for l, j in enumerate(idx[k:]):
                nxt = v[b, idx[k + l + 1]] if k + l + 1 < len(idx) else 0.0
                total += (gamma * lam) ** l * (r[b, j] + gamma * nxt - v[b, j])
            A[b, i] = total
    return A


def test_gae_matches_brute_force_on_ragged_masks():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    r = torch.randn(B, T, generator=g, dtype=D)
    v = torch.randn(B, T, generator=g, dtype=D)
    m = ragged_mask([7, 1, 4, 0, 5, 7], T)
    m[5, 2] = 0  # a hole inside a row is skipped
    A = _brute_gae(r, v, m, 0.97, 0.9)
    adv, ret = est("gae", token_rewards=r, response_mask=m, values=v, gamma=0.97, lam=0.9)
    assert torch.allclose(ret, (A + v) * m, atol=1e-12)
    assert torch.allclose(adv, masked_whiten(A, m), atol=1e-12)


def test_gae_gamma_lam_one_gives_reward_to_go():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 5, generator=g, dtype=D)
    v = torch.randn(4, 5, generator=g, dtype=D)
    m = ragged_mask([5, 3, 1, 4], 5)
    _, ret = est("gae", token_rewards=r, response_mask=m, values=v, gamma=1.0, lam=1.0)
    rtg = (r * m).flip(-1).cumsum(-1).flip(-1) * m
    assert torch.allclose(ret, rtg, atol=1e-12)


@pytest.fixture
def grouped():
    g = torch.Generator().manual_seed(3)
    group_index = torch.tensor([7, 3, 7, 5, 3, 7, 5, 3, 3])  # sizes 3, 4, 2; ids not contiguous
    B, T = group_index.numel(), 5
    mask = ragged_mask(torch.randint(1, T + 1, (B,), generator=g).tolist(), T)
    rewards = torch.randn(B, T, generator=g, dtype=D) * mask
    R = rewards.sum(-1)
    return rewards, mask, group_index, R


def test_grpo_group_zero_mean_unit_std_and_dr_grpo(grouped):
    rewards, mask, gi, R = grouped
    adv, ret = est("grpo", token_rewards=rewards, response_mask=mask, group_index=gi)
    assert torch.equal(adv, ret)
    seq = adv[:, 0]
    assert torch.allclose(adv, seq.unsqueeze(-1) * mask)
    for gid in gi.unique():
        a = seq[gi == gid]
        assert abs(a.mean().item()) < 1e-12
        assert a.std().item() == pytest.approx(1.0, abs=1e-5)
    for name, kw in (("grpo", {"norm_adv_by_std": False}), ("dr_grpo", {})):
        adv_dr, _ = est(name, token_rewards=rewards, response_mask=mask, group_index=gi, **kw)
        means = {int(k): R[gi == k].mean() for k in gi.unique()}
        expected = torch.stack([R[i] - means[int(gi[i])] for i in range(len(R))])
        assert torch.allclose(adv_dr, expected.unsqueeze(-1) * mask, atol=1e-12)


def test_rloo_equals_explicit_leave_one_out(grouped):
    rewards, mask, gi, R = grouped
    adv, _ = est("rloo", token_rewards=rewards, response_mask=mask, group_index=gi)
    for i in range(len(R)):
        others = [j for j in range(len(R)) if j != i and gi[j] == gi[i]]
        expected = R[i] - R[others].mean()
        assert torch.allclose(adv[i], expected * mask[i], atol=1e-12)
    with pytest.raises(ConfigError, match="at least 2"):
        est("rloo", token_rewards=rewards, response_mask=mask, group_index=torch.arange(len(R)))


def test_reinforce_pp_returns_and_global_whitening(grouped):
    rewards, mask, gi, R = grouped
    gamma = 0.9
    adv, ret = est("reinforce_pp", token_rewards=rewards, response_mask=mask, gamma=gamma)
    G = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            G[b, i] = sum(gamma ** (s - i) * rewards[b, s] for s in range(i, rewards.shape[1])) * mask[b, i]
    assert torch.allclose(ret, G, atol=1e-12)
    valid = adv[mask.bool()]
    assert abs(valid.mean().item()) < 1e-12
    assert valid.std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(adv, (G - G[mask.bool()].mean()) / G[mask.bool()].std() * mask, atol=1e-7)


def test_reinforce_pp_baseline_subtracts_group_mean(grouped):
    rewards, mask, gi, R = grouped
    adv, ret = est("reinforce_pp_baseline", token_rewards=rewards, response_mask=mask, group_index=gi)
    means = torch.stack([R[gi == gi[i]].mean() for i in range(len(R))])
    rtg = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(ret, (rtg - means.unsqueeze(-1)) * mask, atol=1e-12)
    assert torch.allclose(adv, masked_whiten(ret, mask), atol=1e-12)


def test_remax_is_return_minus_greedy_baseline(grouped):
    rewards, mask, gi, R = grouped
    b = torch.linspace(-1, 1, len(R), dtype=D)
    adv, ret = est("remax", token_rewards=rewards, response_mask=mask, baseline_scores=b)
    assert torch.allclose(adv[:, 0], R - b, atol=1e-12)  # first token carries R − b
    rtg = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(ret, (rtg - b.unsqueeze(-1)) * mask, atol=1e-12)
    # terminal-only rewards: every valid token gets R − b
    scores = torch.randn(len(R), dtype=D)
    term = token_level_rewards(scores, torch.zeros_like(rewards), mask, kl_coef=0.0)
    adv_t, _ = est("remax", token_rewards=term, response_mask=mask, baseline_scores=b)
    assert torch.allclose(adv_t, (scores - b).unsqueeze(-1) * mask, atol=1e-12)
    with pytest.raises(ConfigError):
        est("remax", token_rewards=rewards, response_mask=mask)


def test_estimator_registry_errors():
    with pytest.raises(ConfigError, match="rloo"):
        ADVANTAGE_ESTIMATORS.get("ppo2")
    with pytest.raises(ConfigError, match="critic"):
        est("gae", token_rewards=torch.zeros(1, 2), response_mask=torch.ones(1, 2))


# --------------------------------------------------------------------------- losses


def test_agg_modes_on_ragged_mask():
    loss = t([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")], [9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(2.5)  # (6 + 4)/4
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(5.0)  # (6 + 4)/2
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)  # (2 + 4)/2
    with pytest.raises(ConfigError, match="token-mean"):
        agg_loss(loss, mask, "mean")


def test_ppo_clip_zero_gradient_on_clipped_tokens():
    # tokens: (A>0, ρ=1.5) clipped; (A<0, ρ=0.5) clipped; (A>0, ρ=0.5) active; (A<0, ρ=1.5) active;
    # (A>0, ρ=1.1) inside the range; last one masked out
    ratio = t([[1.5, 0.5, 0.5, 1.5, 1.1, 3.0]])
    A = t([[1.0, -1.0, 1.0, -1.0, 2.0, 1.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    old = torch.zeros_like(ratio)
    logp = ratio.log().clone().requires_grad_(True)
    loss, metrics = POLICY_LOSSES.get("ppo_clip")(logp=logp, old_logp=old, advantages=A, response_mask=mask,
                                                  cliprange=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, t([[0.0, 0.0, -0.5 / 5, 1.5 / 5, -2.2 / 5, 0.0]]), atol=1e-12)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 5)
    expected_loss = (-1.2 + 0.8 - 0.5 + 1.5 - 2.2) / 5
    assert loss.item() == pytest.approx(expected_loss)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * (ratio.log()[mask.bool()] ** 2).mean().item())
    assert metrics["ratio_mean"].item() == pytest.approx(ratio[mask.bool()].mean().item())


def test_ppo_dual_clip_bounds_negative_advantage_loss():
    logp = t([[math.log(5.0)]]).requires_grad_(True)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(logp=logp, old_logp=torch.zeros(1, 1, dtype=D), advantages=t([[-1.0]]),
                                           response_mask=t([[1.0]]), clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.item() == 0.0


def test_ppo_equals_vanilla_pg_on_policy():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g, dtype=D)
    A = torch.randn(3, 4, generator=g, dtype=D)
    mask = ragged_mask([4, 2, 3], 4)
    grads, clipfracs = [], []
    for name in ("ppo_clip", "vanilla_pg"):
        logp = x.clone().requires_grad_(True)
        loss, m = POLICY_LOSSES.get(name)(logp=logp, old_logp=x.detach(), advantages=A, response_mask=mask,
                                          agg_mode="seq-mean-token-mean")
        grads.append(torch.autograd.grad(loss, logp)[0])
        clipfracs.append(m["clipfrac"].item())
        assert m["approx_kl"].item() == 0.0 and m["ratio_mean"].item() == pytest.approx(1.0)
    assert torch.allclose(grads[0], grads[1], atol=1e-14)
    assert clipfracs == [0.0, 0.0]


def test_value_loss_clipping():
    old = t([[0.0, 0.0, 0.0]])
    R = t([[2.0, 0.0, 5.0]])
    mask = t([[1, 1, 0]])
    V = t([[1.0, 1.0, 1.0]]).requires_grad_(True)
    loss, m = value_loss(V, old, R, mask, cliprange_value=0.2)
    # token 0: max((1−2)², (0.2−2)²) = 3.24 (clipped, no grad); token 1: max(1, 0.04) = 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, V)
    assert torch.allclose(grad, t([[0.0, 0.5, 0.0]]))
    loss_plain, m2 = value_loss(V, old, R, mask, cliprange_value=None)
    assert loss_plain.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert m2["vf_clipfrac"].item() == 0.0


def test_explained_variance():
    g = torch.Generator().manual_seed(2)
    R = torch.randn(3, 5, generator=g, dtype=D)
    mask = ragged_mask([5, 2, 4], 5)
    assert explained_variance(R, R, mask).item() == pytest.approx(1.0)
    const = torch.full_like(R, R[mask.bool()].mean().item())
    assert explained_variance(const, R, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(explained_variance(R, torch.ones_like(R), mask).item())


def test_entropy_from_logits_stable():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=g, dtype=D)
    p = logits.softmax(-1)
    assert torch.allclose(entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-12)
    assert torch.allclose(entropy_from_logits(logits * 1e4 + 1e6).float(), entropy_from_logits(logits * 1e4).float())
    banned = logits.clone().requires_grad_(True)
    z = torch.where(torch.arange(7) < 3, torch.tensor(float("-inf"), dtype=D), banned)
    h = entropy_from_logits(z)
    q = logits[..., 3:].softmax(-1)
    assert torch.allclose(h, -(q * q.log()).sum(-1), atol=1e-12)
    h.sum().backward()
    assert torch.isfinite(banned.grad).all()


def test_every_registered_estimator_declares_its_requirements():
    from pipeline.algorithms.advantages import ADVANTAGE_ESTIMATORS, requirements

    known = {"values", "groups", "baseline_scores"}
    for name in ADVANTAGE_ESTIMATORS.names():
        assert "needs" in ADVANTAGE_ESTIMATORS.meta(name), name  # declared at registration
        assert requirements(name) <= known
    assert requirements("gae") == {"values"} and requirements("remax") == {"baseline_scores"}
    assert requirements("reinforce_pp") == frozenset()
