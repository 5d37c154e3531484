"""The LLM loop's objectives against the exact tabular backend: a one-token "language model" whose
single response token is one of n arms with logits θ. The Monte-Carlo gradient of each online
objective (sampled through the rollout engine, judged, and passed through the registered loss,
exactly as in training) must match the exact expected gradient that pipeline.algorithms.games
computes from the same registered loss on every arm pair. Also: the extragradient operator."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.algorithms import games as g
from pipeline.config.schema import NLHFAlgorithmConfig, NLHFConfig
from pipeline.models.tokenizer import train_tokenizer
from pipeline.modules.nlhf import OnlinePreferenceModule
from pipeline.modules.online_objectives import ONLINE_OBJECTIVES
from pipeline.scoring import Judge

ARMS = ["rock", "paper", "scissors", "lizard"]
D = torch.float64


class OneTokenLM(torch.nn.Module):
    """logits = θ on the arm tokens (everything else impossible), whatever the context."""

    def __init__(self, arm_ids: list[int], vocab: int, theta: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone().float())
        self.register_buffer("arm_ids", torch.tensor(arm_ids))
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, past_key_values=None,
                logits_to_keep=None):
        b, l = input_ids.shape
        logits = torch.full((b, l, self.vocab), -1e4, dtype=self.theta.dtype)
        logits[..., self.arm_ids] = self.theta
        cache = ((torch.zeros(b, 1), torch.zeros(b, 1)),)
        return SimpleNamespace(logits=logits, past_key_values=cache)


class MatrixJudge(Judge):
    def __init__(self, P: torch.Tensor):
        self.P = P

    def preference(self, prompts, a, b):
        ia = [ARMS.index(x.strip()) for x in a]
        ib = [ARMS.index(x.strip()) for x in b]
        return self.P[ia, ib].float()


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(["q : " + " ".join(ARMS)] * 4, vocab_size=300)
    for arm in ARMS:
        assert len(tok(" " + arm, add_special_tokens=False)["input_ids"]) == 1
    return tok


def make_module(tokenizer, P, theta, ref_theta, **algo):
    arm_ids = [tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in ARMS]
    lm = lambda t: OneTokenLM(arm_ids, len(tokenizer), t)
    acfg = OmegaConf.structured(NLHFAlgorithmConfig(max_new_tokens=1, **algo))
    module = OnlinePreferenceModule(lm(theta), tokenizer, MatrixJudge(P), acfg, OmegaConf.structured(NLHFConfig()),
                                    ref_policy=lm(ref_theta), loss_options={})
    module._generator = torch.Generator().manual_seed(0)
    return module, lm


def mc_gradient(module, objective: str, opponent, n_responses: int) -> torch.Tensor:
    """(G responses per prompt: tokenizing prompts is the slow part here)"""
    prompts = ["q :"] * (n_responses // module.acfg.num_generations)
    loss, _ = ONLINE_OBJECTIVES.get(objective)(module, prompts, opponent)
    (grad,) = torch.autograd.grad(loss, module.policy.theta)
    return grad.double()


GAME = g.random_preference(len(ARMS), seed=5)
THETA = torch.tensor([1.0, -0.5, 0.5, -1.0], dtype=D)
REF = torch.tensor([0.0, 0.8, -0.6, 0.1], dtype=D)
N = 16000  # responses per Monte-Carlo gradient: its error is a few % of the gradients below
G = 8  # per prompt (pairs within a prompt's group are each an i.i.d. pair: the expectations are unchanged)


def assert_close(mc: torch.Tensor, exact: torch.Tensor, rel: float = 0.15) -> None:
    """Relative error of the Monte-Carlo gradient; the exact one must be large enough to tell."""
    assert exact.norm() > 0.05, exact
    assert (mc - exact).norm() < rel * exact.norm(), (mc, exact)


def test_nash_md_gradient_is_the_exact_expected_gradient(tokenizer):
    beta, alpha = 0.2, 0.4
    module, _ = make_module(tokenizer, GAME, THETA, REF, loss="nash_md_pg", beta=beta, mixture_coef=alpha,
                            num_generations=G)
    mc = mc_gradient(module, "nash_md_pg", module.policy, N)
    mix = g.geometric_mixture(THETA, REF, weight=alpha)  # the engine's token-level mixture of logits
    exact = g.loss_gradient(lambda th: g.expected_nash_md_pg_loss(th, GAME, REF, beta=beta, opponent_logpi=mix), THETA)
    assert_close(mc, exact)


def test_nash_mp_gradient_is_the_exact_expected_gradient(tokenizer):
    beta, eta = 0.2, 0.4
    anchor, opp = torch.tensor([0.1, 0.2, 0.0, -0.4], dtype=D), torch.tensor([-0.5, 0.3, 0.2, 0.0], dtype=D)
    module, lm = make_module(tokenizer, GAME, THETA, REF, loss="nash_mp_pg", update_rule="extragradient", beta=beta,
                             eta=eta, num_generations=G)
    module.anchor.load_state_dict(lm(anchor).state_dict())
    mc = mc_gradient(module, "nash_mp_pg", lm(opp), N)
    exact = g.loss_gradient(lambda th: g.expected_nash_mp_pg_loss(th, GAME, REF, beta=beta, eta=eta, anchor_logpi=anchor,
                                                                  opponent_logpi=opp), THETA)
    assert_close(mc, exact)


def test_online_ipo_gradient_is_the_exact_expected_gradient(tokenizer):
    beta = 0.5
    module, _ = make_module(tokenizer, GAME, THETA, REF, loss="online_ipo", beta=beta, num_generations=G)
    mc = mc_gradient(module, "online_ipo", module.policy, N)
    pi = g.log_normalize(THETA).exp()
    # pairs and opponents both come from the (detached) policy: mu = opponent = π
    exact = g.loss_gradient(lambda th: g.expected_online_ipo_loss(th, GAME, REF, beta=beta, opponent_pi=pi, mu=pi),
                            THETA)
    assert_close(mc, exact)


def test_inpo_gradient_is_the_exact_expected_gradient(tokenizer):
    beta, eta = 0.2, 0.5
    module, _ = make_module(tokenizer, GAME, THETA, REF, loss="inpo", beta=beta, eta=eta, num_generations=G)
    mc = mc_gradient(module, "inpo", module.policy, N)
    # the loop weighs both orders of a sampled pair by the label probabilities (P_ij ℓ(i,j) + P_ji ℓ(j,i)); the
    # tabular expectation weighs each ordered (winner, loser) by π(w)π(l)P(w≻l): half of the loop's expectation
    exact = 2 * g.loss_gradient(lambda th: g.expected_inpo_loss(th, GAME, REF, beta=beta, eta=eta, prev_logpi=THETA),
                                THETA)
    assert_close(mc, exact)


def test_extragradient_operator_takes_the_second_gradient_at_the_first_point(tokenizer):
    """With SGD, one extragradient iteration is θ_{t+1} = θ_t − lr·∇L(θ_t; opponent θ_{t+½}) where
    θ_{t+½} = θ_t − lr·∇L(θ_t; opponent θ_t): the EGPO update (ALGORITHMS.md A8)."""
    lr = 0.3
    module, lm = make_module(tokenizer, GAME, THETA, REF, loss="online_ipo", update_rule="extragradient",
                             num_generations=2)
    calls = []

    def objective(ctx, prompts, opponent):  # a deterministic quadratic game standing in for a sampled loss
        theta, opp = ctx.policy.theta, opponent.theta.detach()
        calls.append((theta.detach().clone(), opp.clone()))
        return ((theta - 0.5 * opp.flip(0)) ** 2).sum(), {}

    module.objective = objective
    opt = torch.optim.SGD(module.policy.parameters(), lr=lr)
    wrapped = SimpleNamespace(optimizer=opt, zero_grad=opt.zero_grad, step=opt.step)
    module.manual_backward = lambda loss: loss.backward()
    module.grad_clip = None
    module._iteration(wrapped, ["q :"], {})
    t0 = THETA.float()
    half = t0 - lr * 2 * (t0 - 0.5 * t0.flip(0))
    expected = t0 - lr * 2 * (t0 - 0.5 * half.flip(0))
    assert torch.allclose(calls[0][0], t0) and torch.allclose(calls[1][0], t0)  # both gradients at θ_t
    assert torch.allclose(calls[1][1], half, atol=1e-6)  # the second opponent is θ_{t+½}
    assert torch.allclose(module.policy.theta.detach(), expected, atol=1e-6)
