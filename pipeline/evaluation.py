"""Evaluation, in one place: sampling policies on held-out prompts, KL to a reference,
gold / proxy scoring, reward- and preference-model accuracy and calibration, win rates
between policies, exploitability, and the structured result file.

The ``evaluate`` stage and the online stages' periodic held-out curves call
:func:`evaluate_policy`. An evaluate stage writes ``evaluation.json``::

    {"reference": "sft",
     "policies": {"sft": {"gold_reward": .., "gold_reward_std": .., "gold_reward_ci95": ..,
                          "proxy_reward": .., "kl": .., "response_length": .., "eos_rate": ..,
                          "win_rate": .., "win_rate_ci95": ..,           # vs the reference policy
                          "exploitability": .., "regularized_exploitability": ..,
                          "class_distribution": {..}, "num_samples": ..}, ...},
     "win_rates": {"gold_preference": {"ppo": {"sft": {"mean": .., "ci95": ..}, ..}, ..},
                   "preference_model": {..},     # with a `preference` input
                   "class_game": {..}},          # exact from the class distributions
     "reward_models": {"rm": {"accuracy": .., "by_subset": {..}, "pairs": ..}},
     "preference_models": {"pm": {"accuracy": .., "by_subset": {..}, "ece": .., "gold_mae": .., "pairs": ..}},
     "examples": [{"policy", "index", "prompt", "completion", "gold_reward", "proxy_reward"}, ...],
     "data": {"prompts": "<where the prompts come from>", "pairs": "<where the labelled pairs come from>"}}

Gold metrics (``gold_reward``, gold win rates, exploitability) exist only on the built-in
tasks' prompts; on a user's prompts the policies are scored by the reward model
(``proxy_reward``), the preference model (win rates) and ``eval.reward_fn`` (``user_reward``).

which the summary table and the reports read; :func:`flat_metrics` gives the same numbers
as ``eval/<policy>/<metric>`` keys (what sweeps optimise; the last policy's also as
``eval/<metric>``), win rates as ``eval/<policy>/win_rate_vs_<other>`` (gold preference) and
``eval/<policy>/pm_win_rate_vs_<other>`` (learned preference).

Win rates are paired: every policy is sampled on the same prompts, the same number of times,
so sample i of policy A and sample i of policy B answer the same prompt; the win rate of A
over B is the mean of P(a_i ≻ b_i | x_i) and its 95% confidence half-width comes from the
per-prompt means (samples of one prompt are not independent).
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
#: held-out user data a training stage publishes with its artifact (what evaluation reads)
HELDOUT_FILE = "heldout.json"
#: per-policy metrics, in the order tables show them
POLICY_METRICS = ("gold_reward", "user_reward", "proxy_reward", "kl", "win_rate", "exploitability", "regularized_exploitability",
                  "response_length", "eos_rate")

GoldFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
#: P(a_i ≻ b_i | prompt_i) for lists of prompts and two lists of responses
PreferenceFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]


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
                    kl_temperature: float | None = None, user: GoldFn | None = None,
                    max_prompt_length: int | None = None) -> PolicyResult:
    """Sample ``model`` on ``prompts`` and score it.

    ``gold``: the task's gold reward ``fn(prompts, completions)`` (``user``: a user's reward
    function, the same way, as ``user_reward``); ``proxy``: a reward scorer
    (``.score(prompts, completions) -> Tensor``); ``reference``: a reference model for the KL,
    ``None`` for the adapters-off fallback (LoRA), ``False`` for no KL. Metrics: ``gold_reward``
    (+ ``_std``, ``_ci95`` half-width), ``proxy_reward``, ``kl``, ``response_length``, ``eos_rate``.
    """
    was_training = model.training
    model.eval()
    try:
        batches = sample_policy(model, tokenizer, prompts, settings, seed, max_prompt_length)
        all_prompts = [p for b in batches for p in b.prompts]
        completions = [c for b in batches for c in b.completions]
        m: dict[str, float] = {"num_samples": len(completions)}
        gold_t = proxy_t = user_t = None
        if gold is not None:
            gold_t = torch.tensor(list(gold(all_prompts, completions)), dtype=torch.float64)
            m["gold_reward"], m["gold_reward_std"], m["gold_reward_ci95"] = _mean_std_ci(gold_t)
        if user is not None:
            user_t = torch.as_tensor(user(all_prompts, completions), dtype=torch.float64)
            m["user_reward"], m["user_reward_std"], m["user_reward_ci95"] = _mean_std_ci(user_t)
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
        if user_t is not None:
            row["user_reward"] = float(user_t[i])
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
    # the Bradley-Terry reading of the scores: P(chosen > rejected) = sigmoid(r_c - r_r)
    calibration = reliability(torch.sigmoid((r_c - r_r).double()), torch.ones_like(correct))
    return {"accuracy": float(correct.mean()), "by_subset": by_subset, "ece": calibration["ece"],
            "calibration": calibration, "pairs": len(pairs)}


def reliability(p: torch.Tensor, first_wins: torch.Tensor, bins: int = 10) -> dict:
    """Reliability diagram of binary predictions P(first wins) = ``p``: the prediction is "first
    wins" when p > ½ with confidence max(p, 1 − p); per equal-width confidence bin of [½, 1] (empty
    bins left out) its mean confidence, accuracy and count, and the top-label expected calibration
    error ``ece`` = Σ_b (n_b / N)·|accuracy_b − mean confidence_b| (0 for a calibrated predictor)."""
    p = p.double()
    conf = torch.maximum(p, 1 - p)
    correct = ((p > 0.5) == first_wins.bool()).double()
    idx = ((conf - 0.5) * 2 * bins).long().clamp_(0, bins - 1)
    ece, out = 0.0, []
    for b in range(bins):
        m = idx == b
        if m.any():
            acc, c = float(correct[m].mean()), float(conf[m].mean())
            ece += float(m.double().mean()) * abs(acc - c)
            out.append({"low": 0.5 + b / (2 * bins), "high": 0.5 + (b + 1) / (2 * bins), "confidence": c,
                        "accuracy": acc, "count": int(m.sum())})
    return {"ece": ece, "bins": out}


def expected_calibration_error(p: torch.Tensor, first_wins: torch.Tensor, bins: int = 10) -> float:
    """Top-label expected calibration error of binary predictions (see :func:`reliability`)."""
    return reliability(p, first_wins, bins)["ece"]


def preference_accuracy(scorer, pairs: Sequence[PreferenceExample], *, bins: int = 10,
                        gold: PreferenceFn | None = None) -> dict:
    """A pairwise preference model on labelled pairs: accuracy (P(chosen ≻ rejected) > ½) overall and
    per ``subset``, expected calibration error (:func:`expected_calibration_error`) and, with the
    task's ``gold`` preference, ``gold_mae`` = mean |P − P*| (how far from the true probabilities)."""
    prompts = [p.prompt for p in pairs]
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
    prob = scorer.preference(prompts, chosen, rejected).double()
    correct = (prob > 0.5).double()
    by_subset = {}
    for subset in sorted({p.subset for p in pairs}):
        idx = torch.tensor([p.subset == subset for p in pairs])
        by_subset[subset] = float(correct[idx].mean())
    calibration = reliability(prob, torch.ones_like(prob), bins)
    out = {"accuracy": float(correct.mean()), "by_subset": by_subset, "ece": calibration["ece"],
           "calibration": calibration, "pairs": len(pairs)}
    if gold is not None:
        target = torch.tensor(list(gold(prompts, chosen, rejected)), dtype=torch.float64)
        out["gold_mae"] = float((prob - target).abs().mean())
    return out


# ----------------------------------------------------------------------------- win rates / games
def paired_win_rate(pref: torch.Tensor, group_index: torch.Tensor) -> tuple[float, float]:
    """(mean, 95% half-width) of paired preferences ``pref[i]`` = P(a_i ≻ b_i), with the interval
    over the per-prompt means (``group_index[i]`` = the prompt of pair i)."""
    pref, group_index = pref.double(), group_index.long()
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, pref)
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(pref))
    per_prompt = sums[counts > 0] / counts[counts > 0]
    mean, _, ci = _mean_std_ci(per_prompt)
    return mean, ci


def win_rate_matrix(prompts: Sequence[str], completions: dict[str, list[str]], group_index: torch.Tensor,
                    preference: PreferenceFn) -> dict[str, dict[str, dict[str, float]]]:
    """{A: {B: {"mean", "ci95"}}} for every ordered pair of policies A ≠ B, from paired samples
    (``completions[A][i]`` and ``completions[B][i]`` answer ``prompts[i]``). The preference is
    antisymmetric, so each unordered pair is judged once and P(B ≻ A) = 1 − P(A ≻ B)."""
    names = list(completions)
    out: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pref = torch.tensor(list(preference(prompts, completions[a], completions[b])), dtype=torch.float64)
            mean, ci = paired_win_rate(pref, group_index)
            out[a][b] = {"mean": mean, "ci95": ci}
            out[b][a] = {"mean": 1.0 - mean, "ci95": ci}
    return out


def class_distribution(classes: Sequence[int], n_classes: int) -> torch.Tensor:
    """Empirical distribution of class indices (float64)."""
    counts = torch.bincount(torch.as_tensor(list(classes), dtype=torch.long), minlength=n_classes).double()
    return counts / counts.sum().clamp_min(1)


def smoothed(dist: torch.Tensor, count: int) -> torch.Tensor:
    """Add-½ (Jeffreys) smoothing of an empirical distribution of ``count`` samples, so the KL terms
    of the regularised game stay finite when a class was never sampled."""
    return (dist * count + 0.5) / (count + 0.5 * dist.numel())


def game_metrics(matrix, dist: torch.Tensor, ref_dist: torch.Tensor, *, beta: float, count: int,
                 ref_count: int) -> dict[str, float]:
    """Exploitability of a policy's class distribution in the task's class game (ALGORITHMS.md D):
    ``exploitability`` = max_c P(c ≻ π) − ½ (0 at a Nash equilibrium) and
    ``regularized_exploitability`` = β·log Σ_c π_ref(c)·e^{P(c ≻ π)/β} + β·KL(π‖π_ref) − ½ (0 at the
    β-regularised equilibrium), with the reference's class distribution as π_ref (both smoothed,
    :func:`smoothed`)."""
    from pipeline.algorithms import games

    P = games.check_preference(torch.as_tensor(matrix, dtype=torch.float64))
    pi, ref = smoothed(dist, count), smoothed(ref_dist, ref_count)
    return {"exploitability": games.exploitability(P, dist),
            "regularized_exploitability": games.regularized_exploitability(P, pi, ref, beta=beta)}


class HeldOutEvaluator:
    """The online stages' periodic held-out evaluation (the over-optimisation curve):
    ``evaluator(policy) -> {"eval/gold_reward", "eval/proxy_reward", "eval/kl"}`` and, with a
    ``preference`` (the task's gold preference) after :meth:`set_baseline`, ``eval/win_rate``: the
    gold win rate against the baseline policy's samples on the same prompts.

    A class (not a closure) so spawned DDP workers can unpickle it."""

    def __init__(self, tokenizer, prompts: Sequence[str], *, gold: GoldFn | None, proxy, reference,
                 max_new_tokens: int, seed: int, preference: PreferenceFn | None = None):
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.gold, self.proxy, self.reference, self.seed = gold, proxy, reference, seed
        self.preference = preference
        self.baseline: list[str] | None = None
        # the curve: one sample per prompt from the policy's own distribution
        self.settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, num_samples=1,
                                         batch_size=64)

    def set_baseline(self, policy) -> None:
        """Sample the baseline (e.g. the starting policy) once; later calls report the win rate against it."""
        if self.preference is not None:
            res = evaluate_policy(policy, self.tokenizer, self.prompts, self.settings, seed=self.seed + 1)
            self.baseline = [s["completion"] for s in res.samples]

    def __call__(self, policy) -> dict:
        res = evaluate_policy(policy, self.tokenizer, self.prompts, self.settings, seed=self.seed, gold=self.gold,
                              proxy=self.proxy, reference=self.reference, kl_temperature=1.0)
        out = {f"eval/{k}": res.metrics[k] for k in ("gold_reward", "proxy_reward", "kl") if k in res.metrics}
        if self.baseline is not None:
            mine = [s["completion"] for s in res.samples]
            pref = torch.tensor(list(self.preference(self.prompts, mine, self.baseline)), dtype=torch.float64)
            out["eval/win_rate"] = float(pref.mean())
        return out


# ----------------------------------------------------------------------------- the result file
def flat_metrics(result: dict) -> dict[str, float]:
    """``evaluation.json`` as flat metric keys: ``eval/<policy>/<metric>``, the last policy's
    also as ``eval/<metric>``, ``eval/<policy>/win_rate_vs_<other>`` (gold preference) and
    ``eval/<policy>/pm_win_rate_vs_<other>`` (learned preference model), ``eval/rm_accuracy``
    (+ ``/<subset>``) and ``eval/rm_ece`` (calibration of its Bradley-Terry probabilities) of the first
    reward model, ``eval/pm_accuracy`` (+ ``/<subset>``) and ``eval/pm_ece`` of the first preference model."""
    out: dict[str, float] = {}
    policies = result.get("policies", {})
    for name, metrics in policies.items():
        for k, v in metrics.items():
            if k != "num_samples" and isinstance(v, (int, float)):
                out[f"eval/{name}/{k}"] = v
    for judge, prefix in (("gold_preference", "win_rate_vs_"), ("preference_model", "pm_win_rate_vs_")):
        for a, row in (result.get("win_rates", {}).get(judge) or {}).items():
            for b, cell in row.items():
                out[f"eval/{a}/{prefix}{b}"] = cell["mean"]
    if policies:
        last = list(policies)[-1]
        out.update({k.replace(f"eval/{last}/", "eval/"): v for k, v in list(out.items()) if k.startswith(f"eval/{last}/")})
    for rm in list(result.get("reward_models", {}).values())[:1]:
        out["eval/rm_accuracy"] = rm["accuracy"]
        if "ece" in rm:
            out["eval/rm_ece"] = rm["ece"]
        out.update({f"eval/rm_accuracy/{s}": v for s, v in rm["by_subset"].items()})
    for pm in list(result.get("preference_models", {}).values())[:1]:
        out["eval/pm_accuracy"] = pm["accuracy"]
        out["eval/pm_ece"] = pm["ece"]
        out.update({f"eval/pm_accuracy/{s}": v for s, v in pm["by_subset"].items()})
    return out


def write_heldout(work_dir: Path, *, source: str, prompts: Sequence[dict] = (),
                  pairs: Sequence[PreferenceExample] = ()) -> None:
    """Publish the held-out part of a user's data with a training stage's artifact (``heldout.json``):
    prompt rows (all their columns: user reward functions read them) and/or preference pairs, and
    ``source``, a description of where they come from (file and fraction), shown with every number
    computed on them."""
    rows = [{k: v for k, v in r.items()} for r in prompts]
    pair_rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "margin": p.margin,
                  "subset": p.subset} for p in pairs]
    (Path(work_dir) / HELDOUT_FILE).write_text(json.dumps({"source": source, "prompts": rows, "pairs": pair_rows},
                                                          default=str))


@dataclass
class HeldOut:
    source: str
    prompts: list[dict]
    pairs: list[PreferenceExample]


def read_heldout(artifact_dir: Path) -> HeldOut | None:
    """What :func:`write_heldout` published with an artifact (None: the stage trained on built-in data)."""
    path = Path(artifact_dir) / HELDOUT_FILE
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    pairs = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], margin=r.get("margin"),
                               subset=r.get("subset") or "default") for r in d.get("pairs", [])]
    return HeldOut(d["source"], list(d.get("prompts", [])), pairs)


def heldout_source(path: str, fraction: float, n: int) -> str:
    return f"{path} (held out: {n} rows, {fraction:.0%})"


def write_evaluation(work_dir: Path, result: dict) -> None:
    (Path(work_dir) / EVALUATION_FILE).write_text(json.dumps(result, indent=2, sort_keys=False))


def read_evaluation(artifact_dir: Path) -> dict | None:
    """The structured result of an evaluate stage's artifact (None when it has none)."""
    path = Path(artifact_dir) / EVALUATION_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
