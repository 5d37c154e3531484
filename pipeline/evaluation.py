"""Evaluation, in one place: sampling policies on held-out prompts, KL to a reference,
gold / proxy scoring, reward-model accuracy, and the structured result file.

The ``evaluate`` stage and the online-RL stage's periodic held-out curve both call
:func:`evaluate_policy`. An evaluate stage writes ``evaluation.json``::

    {"reference": "sft",
     "policies": {"sft": {"gold_reward": .., "gold_reward_std": .., "gold_reward_ci95": ..,
                          "proxy_reward": .., "kl": .., "response_length": .., "eos_rate": ..,
                          "num_samples": ..}, ...},
     "reward_models": {"rm": {"accuracy": .., "by_subset": {..}, "pairs": ..}},
     "examples": [{"policy", "index", "prompt", "completion", "gold_reward", "proxy_reward"}, ...]}

which the summary table and the reports read; :func:`flat_metrics` gives the same numbers
as ``eval/<policy>/<metric>`` keys (what sweeps optimise; the last policy's also as ``eval/<metric>``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipeline.data.records import PreferenceExample
from pipeline.rollout.engine import HFRolloutEngine, RolloutBatch, SamplingParams, reference_logprobs, sequence_logprobs

EVALUATION_FILE = "evaluation.json"
#: per-policy metrics, in the order tables show them
POLICY_METRICS = ("gold_reward", "proxy_reward", "kl", "response_length", "eos_rate")

GoldFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass
class SamplingSettings:
    """How policies are sampled for evaluation (defaults: ``eval.*`` in the config schema)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    num_samples: int
    batch_size: int

    @classmethod
    def from_config(cls, ecfg, **changes) -> "SamplingSettings":
        base = {f.name: getattr(ecfg, f.name) for f in fields(cls)}
        base.update(changes)
        return cls(**base)


@dataclass
class PolicyResult:
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: Sequence[str], settings: SamplingSettings, seed: int,
                  max_prompt_length: int | None = None) -> list[RolloutBatch]:
    """``settings.num_samples`` completions per prompt, in batches of ``settings.batch_size`` prompts."""
    engine = HFRolloutEngine(model, tokenizer, max_prompt_length=max_prompt_length, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, n=settings.num_samples)
    gen = torch.Generator().manual_seed(seed)
    return [engine.generate(list(prompts[i:i + settings.batch_size]), params, generator=gen)
            for i in range(0, len(prompts), settings.batch_size)]


@torch.no_grad()
def kl_to_reference(batch: RolloutBatch, model, ref_model, temperature: float) -> torch.Tensor:
    """[N] Monte-Carlo KL(pi || pi_ref) per sample: the sum over response tokens of
    log pi - log pi_ref on the sampled tokens. ``ref_model=None``: the reference is ``model``
    with its LoRA adapters disabled."""
    ids, mask, start = batch.input_ids, batch.attention_mask, batch.response_start
    lp = sequence_logprobs(model, ids, mask, start, temperature)
    lp_ref = reference_logprobs(model, ref_model, ids, mask, start, temperature)
    return ((lp - lp_ref) * batch.response_mask).sum(1)


def _mean_std_ci(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double()
    n = x.numel()
    std = float(x.std()) if n > 1 else 0.0
    return float(x.mean()), std, 1.96 * std / math.sqrt(n) if n > 1 else 0.0


@torch.no_grad()
def evaluate_policy(model, tokenizer, prompts: Sequence[str], settings: SamplingSettings, *, seed: int,
                    gold: GoldFn | None = None, proxy=None, reference: Any = False,
                    kl_temperature: float | None = None) -> PolicyResult:
    """Sample ``model`` on ``prompts`` and score it.

    ``gold``: the task's gold reward ``fn(prompts, completions)``; ``proxy``: a reward scorer
    (``.score(prompts, completions) -> Tensor``); ``reference``: a reference model for the KL,
    ``None`` for the adapters-off fallback (LoRA), ``False`` for no KL. Metrics: ``gold_reward``
    (+ ``_std``, ``_ci95`` half-width), ``proxy_reward``, ``kl``, ``response_length``, ``eos_rate``.
    """
    was_training = model.training
    model.eval()
    try:
        batches = sample_policy(model, tokenizer, prompts, settings, seed)
        all_prompts = [p for b in batches for p in b.prompts]
        completions = [c for b in batches for c in b.completions]
        m: dict[str, float] = {"num_samples": len(completions)}
        gold_t = proxy_t = None
        if gold is not None:
            gold_t = torch.tensor(list(gold(all_prompts, completions)), dtype=torch.float64)
            m["gold_reward"], m["gold_reward_std"], m["gold_reward_ci95"] = _mean_std_ci(gold_t)
        if proxy is not None:
            proxy_t = proxy.score(all_prompts, completions)
            m["proxy_reward"] = float(proxy_t.double().mean())
        if reference is not False:
            temp = settings.temperature if kl_temperature is None else kl_temperature
            kl = torch.cat([kl_to_reference(b, model, reference, temp) for b in batches])
            m["kl"] = float(kl.double().mean())
        m["response_length"] = float(torch.cat([b.response_lengths for b in batches]).double().mean())
        m["eos_rate"] = float(torch.cat([b.has_eos for b in batches]).double().mean())
    finally:
        model.train(was_training)
    samples = []
    for i, (p, c) in enumerate(zip(all_prompts, completions)):
        row = {"index": i, "prompt": p, "completion": c}
        if gold_t is not None:
            row["gold_reward"] = float(gold_t[i])
        if proxy_t is not None:
            row["proxy_reward"] = float(proxy_t[i])
        samples.append(row)
    return PolicyResult(m, samples)


def rm_accuracy(scorer, pairs: Sequence[PreferenceExample]) -> dict:
    """Pairwise accuracy of a reward scorer on labelled pairs, overall and per ``subset``."""
    prompts = [p.prompt for p in pairs]
    r_c = scorer.score(prompts, [p.chosen for p in pairs])
    r_r = scorer.score(prompts, [p.rejected for p in pairs])
    correct = (r_c > r_r).double()
    by_subset = {}
    for subset in sorted({p.subset for p in pairs}):
        idx = torch.tensor([p.subset == subset for p in pairs])
        by_subset[subset] = float(correct[idx].mean())
    return {"accuracy": float(correct.mean()), "by_subset": by_subset, "pairs": len(pairs)}


class HeldOutEvaluator:
    """The online-RL stage's periodic held-out evaluation (the over-optimisation curve):
    ``evaluator(policy) -> {"eval/gold_reward", "eval/proxy_reward", "eval/kl"}``.

    A class (not a closure) so spawned DDP workers can unpickle it."""

    def __init__(self, tokenizer, prompts: Sequence[str], *, gold: GoldFn | None, proxy, reference,
                 max_new_tokens: int, seed: int):
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.gold, self.proxy, self.reference, self.seed = gold, proxy, reference, seed
        # the curve: one sample per prompt from the policy's own distribution
        self.settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, num_samples=1,
                                         batch_size=64)

    def __call__(self, policy) -> dict:
        res = evaluate_policy(policy, self.tokenizer, self.prompts, self.settings, seed=self.seed, gold=self.gold,
                              proxy=self.proxy, reference=self.reference, kl_temperature=1.0)
        return {f"eval/{k}": res.metrics[k] for k in ("gold_reward", "proxy_reward", "kl") if k in res.metrics}


# ----------------------------------------------------------------------------- the result file
def flat_metrics(result: dict) -> dict[str, float]:
    """``evaluation.json`` as flat metric keys: ``eval/<policy>/<metric>``, the last policy's
    also as ``eval/<metric>``, ``eval/rm_accuracy`` (+ ``/<subset>``) of the first reward model."""
    out: dict[str, float] = {}
    policies = result.get("policies", {})
    for name, metrics in policies.items():
        for k, v in metrics.items():
            if k != "num_samples":
                out[f"eval/{name}/{k}"] = v
    if policies:
        last = list(policies)[-1]
        out.update({k.replace(f"eval/{last}/", "eval/"): v for k, v in list(out.items()) if k.startswith(f"eval/{last}/")})
    for rm in list(result.get("reward_models", {}).values())[:1]:
        out["eval/rm_accuracy"] = rm["accuracy"]
        out.update({f"eval/rm_accuracy/{s}": v for s, v in rm["by_subset"].items()})
    return out


def write_evaluation(work_dir: Path, result: dict) -> None:
    (Path(work_dir) / EVALUATION_FILE).write_text(json.dumps(result, indent=2, sort_keys=False))


def read_evaluation(artifact_dir: Path) -> dict | None:
    """The structured result of an evaluate stage's artifact (None when it has none)."""
    path = Path(artifact_dir) / EVALUATION_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
