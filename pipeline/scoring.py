"""Reward sources for online RL (registry ``REWARD_SOURCES``), picked by ``rl.reward_source``.

Every source builds a scorer ``fn(prompts, completions, rows) -> Tensor[N]`` where ``rows``
are the prompt rows (dataset columns) the completions were sampled for:

- ``reward_model``: the upstream reward stage (input role ``reward``), K-member ensembles
  aggregated by ``rl.reward_aggregation`` (mean | wco | uwo); the RM keeps its own
  tokenizer (text is re-tokenized), so it may differ from the policy's;
- ``gold``: the task's hidden gold reward (benchmarks, tests, verifiable tasks);
- ``callable``: ``rl.reward_fn = "package.module:function"``, called like TRL reward
  functions: ``fn(prompts=..., completions=..., **columns) -> list[float]``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Sequence

import torch

from pipeline.errors import ConfigError
from pipeline.registry import Registry

Scorer = Callable[[Sequence[str], Sequence[str], Sequence[dict]], torch.Tensor]
REWARD_SOURCES: Registry[Callable[..., Scorer]] = Registry("reward source")


class RewardModelScorer:
    """The upstream reward stage's model(s); the RM re-tokenizes the text itself."""

    def __init__(self, reward_scorer):
        self.reward_scorer = reward_scorer

    def __call__(self, prompts, completions, rows) -> torch.Tensor:
        return self.reward_scorer.score(list(prompts), list(completions))


class GoldScorer:
    """The task's hidden gold reward."""

    def __init__(self, task):
        self.task = task

    def __call__(self, prompts, completions, rows=None) -> torch.Tensor:
        return torch.tensor(self.task.gold_reward(list(prompts), list(completions)), dtype=torch.float32)


class CallableScorer:
    """A user function ``fn(prompts=, completions=, **columns) -> list[float]`` (imported lazily,
    so the scorer pickles by its import path for spawned DDP workers)."""

    def __init__(self, path: str):
        self.path = path
        import_callable(path, key="rl.reward_fn")  # fail fast

    def __call__(self, prompts, completions, rows) -> torch.Tensor:
        fn = import_callable(self.path, key="rl.reward_fn")
        # dataset columns only: keys starting with "_" are the pipeline's (e.g. a row's source line)
        columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k != "prompt" and not k.startswith("_")}
        out = fn(prompts=list(prompts), completions=list(completions), **columns)
        t = torch.as_tensor([float(x) for x in out], dtype=torch.float32)
        if t.shape[0] != len(completions):
            raise ConfigError(f"returned {t.shape[0]} rewards for {len(completions)} completions",
                              where="rl.reward_fn")
        return t


@REWARD_SOURCES.register("reward_model")
def reward_model_source(cfg, inputs, task) -> Scorer:
    from pipeline.models.reward import RewardScorer

    if "reward" not in inputs:
        raise ConfigError("reward_source=reward_model needs a reward stage as input `reward`",
                          where="rl.reward_source",
                          fix="add `reward: rm` to the rl stage's inputs, or use reward_source=gold")
    return RewardModelScorer(RewardScorer.from_artifact(inputs["reward"], aggregation=cfg.rl.reward_aggregation,
                                                        uwo_coef=cfg.rl.uwo_coef))


@REWARD_SOURCES.register("gold")
def gold_source(cfg, inputs, task) -> Scorer:
    return GoldScorer(task)


@REWARD_SOURCES.register("callable")
def callable_source(cfg, inputs, task) -> Scorer:
    return CallableScorer(cfg.rl.reward_fn)


@functools.lru_cache(maxsize=32)
def _import(mod_name: str):
    return importlib.import_module(mod_name)


def import_callable(path: str | None, *, key: str) -> Callable:
    if not path or ":" not in path:
        raise ConfigError(f"expected 'package.module:function', got {path!r}", where=key)
    mod_name, attr = path.split(":", 1)
    try:
        mod = _import(mod_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {mod_name!r}: {err}", where=key,
                          fix="make the module importable (installed or on PYTHONPATH)") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"{mod_name!r} has no callable {attr!r}", where=key)
    return fn


def build_scorer(cfg, inputs, task) -> Scorer:
    return REWARD_SOURCES.get(cfg.rl.reward_source, key="rl.reward_source")(cfg, inputs, task)
