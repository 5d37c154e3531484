"""Built-in task interface: prompts, a demonstration policy, a gold reward, synthetic labels.

A task generates everything from seeds, so nothing is downloaded:

- ``prompts(split, n)``: rows (dicts with at least ``prompt``) per split
  (``sft``, ``pref``, ``rl``, ``eval``), each split from its own seed stream;
- ``demonstrate(row, rng)``: a *mediocre* demonstration (leaves headroom for RL);
- ``gold_reward(prompts, completions)``: the hidden ground truth, computed from text only,
  so it also scores prompts/completions from user data or from any policy;
- ``gold_preference(prompts, a, b)``: the hidden P*(a ≻ b | x); by default the Bradley-Terry
  preference of the gold reward, σ(``bt_beta`` · (gold(a) − gold(b))); a task whose
  preferences no reward can represent (``intransitive``) overrides it;
- preference pairs: two demonstrations per prompt, labelled by sampling the gold
  preference, then flipped with probability ``label_noise`` (the synthetic-annotator
  setup of Gao et al.);
- ``eval_pairs()``: held-out pairs labelled by the gold preference (no noise), with a
  ``subset`` per pair for RewardBench-style per-subset accuracy;
- ``class_game()``: for tasks whose gold preference is decided by a known class map
  (:class:`ClassGame`), the exact class-level game the evaluation computes win rates and
  exploitability in; ``None`` otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from typing import Any, Callable, Sequence

from pipeline.data.records import PreferenceExample, SFTExample
from pipeline.registry import Registry

TASKS: Registry[type["Task"]] = Registry("task")

SPLITS = ("sft", "pref", "rl", "eval")


def split_seed(seed: int, split: str) -> int:
    """Independent, stable seed per (task seed, split)."""
    return int(hashlib.sha256(f"{seed}:{split}".encode()).hexdigest()[:8], 16)


@dataclasses.dataclass
class ClassGame:
    """The class-level game of a task whose gold preference is decided by a known class map.

    ``names[c]`` labels class c; ``matrix[c][c']`` = P*(a ≻ b) for a in class c, b in class c' ≠ c
    (``matrix[c][c] = ½``: inside a class only a within-class term decides, which the class game
    treats as a tie); ``classify(prompts, completions)`` gives each completion's class index.
    """

    names: list[str]
    matrix: list[list[float]]
    classify: Callable[[Sequence[str], Sequence[str]], list[int]]


@dataclasses.dataclass
class NoOptions:
    """A task without options."""


def task_options(options_cls: type, given: Any, task: str):
    """``options_cls`` filled from ``given`` (a mapping, a config node or an instance);
    an unknown option is a ConfigError naming ``task.options.<key>`` and the closest option."""
    from omegaconf import OmegaConf

    from pipeline.errors import ConfigError
    from pipeline.registry import closest

    if isinstance(given, options_cls):
        return given
    if given is None:
        given = {}
    elif OmegaConf.is_config(given):
        given = OmegaConf.to_container(given, resolve=True)
    elif dataclasses.is_dataclass(given):
        given = dataclasses.asdict(given)
    valid = [f.name for f in dataclasses.fields(options_cls)]
    for key in given:
        if key not in valid:
            near = closest(key, valid)
            raise ConfigError(f"task {task!r} has no option {key!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + f"; its options: {', '.join(valid) or '(none)'}", where=f"task.options.{key}")
    return options_cls(**dict(given))


class Task:
    name: str = "base"
    #: the task's options (``task.options.*``): defaults live here, once
    Options: type = NoOptions

    def __init__(self, cfg):
        self.cfg = cfg
        self.options = task_options(self.Options, getattr(cfg, "options", None), self.name)

    # ----- to implement -------------------------------------------------------------
    def make_prompt(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def demonstrate(self, row: dict, rng: random.Random) -> str:
        raise NotImplementedError

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def corpus(self) -> list[str]:
        """Text the built-in tokenizer is trained on."""
        raise NotImplementedError

    def gold_preference(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """P*(a_i ≻ b_i | prompt_i): the Bradley-Terry preference of the gold reward,
        σ(``task.bt_beta`` · (gold(a) − gold(b))). Antisymmetric: P(a ≻ b) + P(b ≻ a) = 1."""
        ga, gb = self.gold_reward(prompts, a), self.gold_reward(prompts, b)
        return [_sigmoid(self.cfg.bt_beta * (x - y)) for x, y in zip(ga, gb)]

    def annotation_candidate(self, row: dict, rng: random.Random) -> str:
        """A response shown to the synthetic annotator (preference pairs): a demonstration by default."""
        return self.demonstrate(row, rng)

    def class_game(self) -> ClassGame | None:
        """The exact class-level game when the gold preference is decided by a class map (else None)."""
        return None

    def eval_subset(self, prompt: str, a: str, b: str) -> str:
        """Subset name of a held-out demonstration pair (RewardBench-style per-subset accuracy)."""
        return "demonstrations"

    def eval_pairs(self) -> list[PreferenceExample]:
        """Held-out pairs of demonstrations labelled by the gold preference (no noise): the
        response with P* > ½ is chosen; ties (P* = ½) are dropped."""
        rng = random.Random(split_seed(self.cfg.seed, "eval_pairs"))
        out = []
        for row in self.prompts("eval", self.cfg.num_eval_prompts * 4):
            a, b = self.demonstrate(row, rng), self.demonstrate(row, rng)
            p_a = self.gold_preference([row["prompt"]], [a], [b])[0]
            if abs(p_a - 0.5) < 1e-9:
                continue
            chosen, rejected = (a, b) if p_a > 0.5 else (b, a)
            out.append(PreferenceExample(row["prompt"], chosen, rejected, subset=self.eval_subset(row["prompt"], a, b)))
        return out

    # ----- shared ------------------------------------------------------------------
    def prompts(self, split: str, n: int | None = None) -> list[dict]:
        n = n if n is not None else self._default_n(split)
        rng = random.Random(split_seed(self.cfg.seed, split))
        return [self.make_prompt(rng) for _ in range(n)]

    def _default_n(self, split: str) -> int:
        return {
            "sft": self.cfg.num_train_prompts,
            "pref": self.cfg.num_pref_prompts,
            "rl": self.cfg.num_train_prompts,
            "eval": self.cfg.num_eval_prompts,
        }[split]

    def sft_examples(self, split: str = "sft") -> list[SFTExample]:
        rng = random.Random(split_seed(self.cfg.seed, split + ":demo"))
        return [SFTExample(r["prompt"], self.demonstrate(r, rng)) for r in self.prompts(split)]

    def preference_examples(self, split: str = "pref") -> list[PreferenceExample]:
        """Two demonstrations per prompt labelled by a noisy annotator sampling the gold preference."""
        rng = random.Random(split_seed(self.cfg.seed, split + ":labels"))
        out = []
        for row in self.prompts(split):
            a = self.annotation_candidate(row, rng)
            b = self.annotation_candidate(row, rng)
            for _ in range(4):  # prefer distinct responses
                if b != a:
                    break
                b = self.annotation_candidate(row, rng)
            p_a = self.gold_preference([row["prompt"]], [a], [b])[0]
            a_wins = rng.random() < p_a
            if rng.random() < self.cfg.label_noise:
                a_wins = not a_wins
            chosen, rejected = (a, b) if a_wins else (b, a)
            out.append(PreferenceExample(row["prompt"], chosen, rejected))
        return out


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(min(-z, 700.0)))  # clamped: exp overflows past ~709


def build_task(cfg) -> Task:
    import pipeline.tasks  # noqa: F401  (registers the built-in tasks)

    return TASKS.get(cfg.name, key="task.name")(cfg)
