"""Reward sources for online RL (registry ``REWARD_SOURCES``), picked by ``policy.reward_source``.

Every source builds a scorer ``fn(prompts, completions, rows) -> Tensor[N]`` where ``rows``
are the prompt rows (dataset columns) the completions were sampled for:

- ``reward_model``: the upstream reward stage (input role ``reward``), K-member ensembles
  aggregated by ``policy.reward_aggregation`` (mean | wco | uwo); the RM keeps its own
  tokenizer (text is re-tokenized), so it may differ from the policy's;
- ``gold``: the task's hidden gold reward (benchmarks, tests, verifiable tasks);
- ``callable``: ``policy.reward_fn = "package.module:function"``, called like TRL reward
  functions: ``fn(prompts=..., completions=..., **columns) -> list[float]``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch

from pipeline.errors import ConfigError
from pipeline.registry import Registry

Scorer = Callable[[Sequence[str], Sequence[str], Sequence[dict]], torch.Tensor]
REWARD_SOURCES: Registry[Callable[..., Scorer]] = Registry("reward source")


@REWARD_SOURCES.register("reward_model")
def reward_model_source(cfg, inputs, task) -> Scorer:
    from pipeline.models.reward import RewardScorer

    if "reward" not in inputs:
        raise ConfigError("reward_source=reward_model needs a reward stage as input `reward`",
                          where="policy.reward_source", fix="add `reward: rm` to the policy stage's inputs, or use reward_source=gold")
    scorer = RewardScorer.from_artifact(inputs["reward"], aggregation=cfg.policy.reward_aggregation,
                                        uwo_coef=cfg.policy.uwo_coef)

    def score(prompts, completions, rows):
        return scorer.score(list(prompts), list(completions))

    score.reward_scorer = scorer  # type: ignore[attr-defined]
    return score


@REWARD_SOURCES.register("gold")
def gold_source(cfg, inputs, task) -> Scorer:
    def score(prompts, completions, rows):
        return torch.tensor(task.gold_reward(list(prompts), list(completions)), dtype=torch.float32)

    return score


@REWARD_SOURCES.register("callable")
def callable_source(cfg, inputs, task) -> Scorer:
    fn = import_callable(cfg.policy.reward_fn, key="policy.reward_fn")

    def score(prompts, completions, rows):
        columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k != "prompt"}
        out = fn(prompts=list(prompts), completions=list(completions), **columns)
        t = torch.as_tensor([float(x) for x in out], dtype=torch.float32)
        if t.shape[0] != len(completions):
            raise ConfigError(f"returned {t.shape[0]} rewards for {len(completions)} completions",
                              where="policy.reward_fn")
        return t

    return score


def import_callable(path: str | None, *, key: str) -> Callable:
    if not path or ":" not in path:
        raise ConfigError(f"expected 'package.module:function', got {path!r}", where=key)
    mod_name, attr = path.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {mod_name!r}: {err}", where=key,
                          fix="make the module importable (installed or on PYTHONPATH)") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"{mod_name!r} has no callable {attr!r}", where=key)
    return fn


def build_scorer(cfg, inputs, task) -> Scorer:
    return REWARD_SOURCES.get(cfg.policy.reward_source, key="policy.reward_source")(cfg, inputs, task)
