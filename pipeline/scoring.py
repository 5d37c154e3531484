"""Reward sources for online RL (registry ``REWARD_SOURCES``), picked by ``rl.reward_source``,
and judges for online preference optimisation (registry ``JUDGES``), picked by ``nlhf.judge``.

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

    def __init__(self, path: str, key: str = "rl.reward_fn"):
        self.path, self.key = path, key
        import_callable(path, key=key)  # fail fast

    def __call__(self, prompts, completions, rows) -> torch.Tensor:
        fn = import_callable(self.path, key=self.key)
        # dataset columns only: keys starting with "_" are the pipeline's (e.g. a row's source line)
        columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k != "prompt" and not k.startswith("_")}
        out = fn(prompts=list(prompts), completions=list(completions), **columns)
        t = torch.as_tensor([float(x) for x in out], dtype=torch.float32)
        if t.shape[0] != len(completions):
            raise ConfigError(f"returned {t.shape[0]} rewards for {len(completions)} completions",
                              where=self.key)
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


# ----------------------------------------------------------------------------- judges
class Judge:
    """Who says which of two responses is better: ``preference(prompts, a, b) -> Tensor[N]`` gives
    P(a_i ≻ b_i | prompt_i) (antisymmetric: P(a ≻ b) + P(b ≻ a) = 1). Reward judges also give a
    score per response (``rewards``), used to rank samples without pairwise comparisons."""

    def preference(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor | None:
        """[N] a score per response when the judge has one (reward models, gold reward), else None."""
        return None


class RewardJudge(Judge):
    """A reward through the Bradley-Terry link: P(a ≻ b) = σ(scale · (r(a) − r(b))) (TRL: scale 1 for a
    reward model; the task's ``bt_beta`` for the gold reward, which makes it the task's BT gold preference)."""

    def __init__(self, reward: Callable[[Sequence[str], Sequence[str]], torch.Tensor], scale: float = 1.0):
        self.reward, self.scale = reward, scale

    def rewards(self, prompts, completions) -> torch.Tensor:
        return torch.as_tensor(self.reward(list(prompts), list(completions)), dtype=torch.float32)

    def preference(self, prompts, a, b) -> torch.Tensor:
        prompts = list(prompts)
        r = self.rewards(prompts + prompts, list(a) + list(b))
        n = len(prompts)
        return torch.sigmoid(self.scale * (r[:n] - r[n:]))


class PreferenceModelJudge(Judge):
    """A pairwise preference model (:class:`pipeline.models.preference.PreferenceScorer`)."""

    def __init__(self, scorer):
        self.scorer = scorer

    def preference(self, prompts, a, b) -> torch.Tensor:
        return self.scorer.preference(list(prompts), list(a), list(b)).float()


class GoldPreferenceJudge(Judge):
    """The task's gold preference P*(a ≻ b | x) (cyclic on the intransitive task)."""

    def __init__(self, task):
        self.task = task

    def preference(self, prompts, a, b) -> torch.Tensor:
        return torch.tensor(self.task.gold_preference(list(prompts), list(a), list(b)), dtype=torch.float32)


#: judges by name: fn(model, task, cfg) -> Judge, where ``model`` is the loaded judge artifact
#: (a RewardScorer / PreferenceScorer) or None for the task's gold judges; ``needs`` = the artifact
#: type the judge reads (None: none)
JUDGES: Registry[Callable[..., Judge]] = Registry("judge")


@JUDGES.register("reward_model", needs="reward_model")
def reward_model_judge(model, task, cfg) -> Judge:
    return RewardJudge(model.score)


@JUDGES.register("preference_model", needs="preference_model")
def preference_model_judge(model, task, cfg) -> Judge:
    return PreferenceModelJudge(model)


@JUDGES.register("gold_reward", needs=None)
def gold_reward_judge(model, task, cfg) -> Judge:
    return RewardJudge(GoldScorer(task), scale=float(task.cfg.bt_beta))


@JUDGES.register("gold_preference", needs=None)
def gold_preference_judge(model, task, cfg) -> Judge:
    return GoldPreferenceJudge(task)


def round_robin_scores(pair_preference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int,
                       group_size: int) -> torch.Tensor:
    """[n] round-robin win rates of ``n`` responses in groups of ``group_size`` consecutive ones (one
    prompt each): the mean of P(y_i ≻ y_j) over the other responses j of i's group (DNO's oracle win
    rate), for ranking candidates with a pairwise judge. ``pair_preference(ia, ib)`` returns
    P(y_ia ≻ y_ib); each unordered pair is judged once (P(y_j ≻ y_i) = 1 − P(y_i ≻ y_j))."""
    g = group_size
    ii, jj = torch.triu_indices(g, g, offset=1)
    base = torch.arange(0, n, g).repeat_interleave(len(ii))
    a_idx, b_idx = base + ii.repeat(n // g), base + jj.repeat(n // g)
    p = torch.as_tensor(pair_preference(a_idx, b_idx), dtype=torch.float32).cpu()
    wins = torch.zeros(n).index_add_(0, a_idx, p).index_add_(0, b_idx, 1.0 - p)
    return wins / max(g - 1, 1)
