"""Critic for PPO: a causal-LM backbone with a scalar head giving one value per token.

Initialised from the reward model (N+ recipe: backbone and head of a causal RM) or from
the policy (its transformer plus a fresh zero head).
"""
from __future__ import annotations

import copy

import torch

from pipeline.models.reward import _score_head


def _backbone(model):
    prefix = getattr(model, "base_model_prefix", None)
    inner = getattr(model, prefix, None) if prefix else None
    return inner if inner is not None else model.base_model


class ValueModel(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_reward_model(cls, rm) -> "ValueModel":
        head = _score_head(rm)
        if head is None:
            raise ValueError("reward model has no linear score head")
        return cls(copy.deepcopy(_backbone(rm)), copy.deepcopy(head))

    @classmethod
    def from_policy(cls, policy) -> "ValueModel":
        backbone = copy.deepcopy(_backbone(policy))
        hidden = policy.config.hidden_size if hasattr(policy.config, "hidden_size") else policy.config.n_embd
        head = torch.nn.Linear(hidden, 1, bias=True)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return cls(backbone, head)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """[N, T] values."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden).squeeze(-1).float()


def build_critic(policy, tokenizer, reward_scorer=None, init: str = "reward") -> ValueModel:
    """The PPO critic. ``init="reward"`` (N+ recipe): a copy of the reward model's first member,
    when it shares the policy's tokenizer and architecture; otherwise (and for ``init="policy"``)
    the policy's transformer with a zero head. A fallback from ``reward`` is logged."""
    import logging

    if init == "reward" and reward_scorer is not None:
        member = reward_scorer.ensemble.members[0]
        if reward_scorer.tokenizer.get_vocab() == tokenizer.get_vocab() and \
                member.config.model_type == policy.config.model_type:
            return ValueModel.from_reward_model(member)
        logging.getLogger("pipeline").warning(
            "critic: initialised from the policy, not the reward model (algorithm.value_init=reward), because the "
            "reward model's %s differs from the policy's", "tokenizer" if reward_scorer.tokenizer.get_vocab()
            != tokenizer.get_vocab() else f"architecture ({member.config.model_type} vs {policy.config.model_type})")
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    return ValueModel.from_policy(base)
