"""Evaluation stage: policies against the gold reward and the gold preference, reward and
preference models against gold labels.

Inputs (all optional, at least one of ``policies`` / ``reward`` / ``preference``):
``policies`` (policy stages), ``reference`` (the policy the KL and ``win_rate`` are measured
against; usually ``sft``), ``reward`` (a reward stage: the proxy reward and its accuracy),
``preference`` (a preference-model stage: its accuracy / calibration and win rates under it).

Per policy, on held-out prompts with ``eval.num_samples`` samples each (the same prompts for
every policy): gold reward (mean, std, 95% CI), proxy reward, KL(pi || pi_ref) (Monte-Carlo,
summed over response tokens), response length, EOS rate, gold win rate against the reference
(with a 95% CI) and, on tasks with a class game (``intransitive``), the class distribution and
the exploitability (plain and ``eval.exploitability_beta``-regularised). Between every two
policies: the win-rate matrix under the gold preference, under the preference model, and
(class game) exactly from the class distributions. For the reward / preference model:
pairwise accuracy on held-out gold-labelled pairs, overall and per subset (+ ECE for the
preference model). Everything goes to ``evaluation.json`` (see :mod:`pipeline.evaluation`);
the metrics are its flat view.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.evaluation import (
    SamplingSettings,
    class_distribution,
    evaluate_policy,
    flat_metrics,
    game_metrics,
    preference_accuracy,
    rm_accuracy,
    win_rate_matrix,
    write_evaluation,
)
from pipeline.models.loading import check_model_config
from pipeline.models.policy import policy_from_artifact
from pipeline.models.preference import PreferenceScorer
from pipeline.models.reward import RewardScorer
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task


def policy_seed(seed: int, name: str) -> int:
    """Each policy samples with its own stream: with one shared seed, inverse-CDF sampling would
    couple the policies' samples (common random numbers) and bias every win rate between them."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    kind = "evaluate"
    produces = "evaluation"
    roles = {"policies": Role({"policy"}, required=False, many=True),
             "reference": Role({"policy"}, required=False),
             "reward": Role({"reward_model"}, required=False),
             "preference": Role({"preference_model"}, required=False)}
    config_keys = ("task", "eval")
    # bt_beta defines the gold preference (win rates); label noise only touches training pairs
    ignored_task_fields = ("num_train_prompts", "num_pref_prompts", "label_noise")
    headline = ("eval/rm_accuracy", "eval/rm_accuracy/", "eval/pm_accuracy", "eval/pm_ece")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        if not {"policies", "reward", "preference"} & set(spec.inputs):
            raise ConfigError(f"stage {spec.name!r} has nothing to evaluate", where=f"pipeline.stages.{spec.name}.inputs",
                              fix="give it `policies: [...]`, `reward: <reward stage>` and/or "
                                  "`preference: <preference-model stage>`")
        if cfg.eval.include_base:
            check_model_config(cfg.model)
        if cfg.eval.exploitability_beta <= 0:
            raise ConfigError(f"must be > 0, got {cfg.eval.exploitability_beta}", where="eval.exploitability_beta")

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        out["max_length"] = cfg.model.max_length
        return out

    def run(self, work_dir: Path) -> dict:
        ecfg = self.cfg.eval
        task = build_task(self.cfg.task)
        reference = self.spec.inputs.get("reference")
        result: dict = {"reference": reference, "policies": {}, "win_rates": {}, "reward_models": {},
                        "preference_models": {}}
        scorer = pm = None
        if "reward" in self.inputs:
            scorer = RewardScorer.from_artifact(self.inputs["reward"], aggregation=ecfg.reward_aggregation)
            result["reward_models"][self.spec.inputs["reward"]] = rm_accuracy(scorer, task.eval_pairs())
        if "preference" in self.inputs:
            pm = PreferenceScorer.from_artifact(self.inputs["preference"])
            result["preference_models"][self.spec.inputs["preference"]] = preference_accuracy(
                pm, task.eval_pairs(), gold=task.gold_preference)
        names = list(self.spec.inputs.get("policies", []))
        candidates = [(n, lambda a=a: policy_from_artifact(a)) for n, a in zip(names, self.inputs.get("policies", []))]
        if candidates and ecfg.include_base:
            candidates.insert(0, ("base", lambda: self._base_policy(task)))
        ref_model, ref_tokenizer = False, None  # no KL without a reference
        if "reference" in self.inputs:
            ref_model, ref_tokenizer = policy_from_artifact(self.inputs["reference"])
            ref_model.eval()
        prompts = [r["prompt"] for r in task.prompts("eval")] if candidates else []
        settings = SamplingSettings.from_config(ecfg)
        samples: list[dict] = []
        completions: dict[str, list[str]] = {}
        for name, load in candidates:
            model, tokenizer = load()
            res = evaluate_policy(model, tokenizer, prompts, settings, seed=policy_seed(self.cfg.seed, name),
                                  gold=task.gold_reward, proxy=scorer, reference=ref_model)
            result["policies"][name] = res.metrics
            completions[name] = [s["completion"] for s in res.samples]
            samples += [{"policy": name, **s} for s in res.samples]
        if completions and ref_model is not False and reference not in completions:  # sample it for the comparisons
            res = evaluate_policy(ref_model, ref_tokenizer, prompts, settings, seed=policy_seed(self.cfg.seed, reference))
            completions[reference] = [s["completion"] for s in res.samples]
        if completions:
            self._compare(result, task, prompts, completions, settings.num_samples, reference, pm)
        with open(work_dir / "examples.jsonl", "w") as fh:
            for row in samples:
                fh.write(json.dumps(row) + "\n")
        result["examples"] = [s for s in samples if s["index"] < ecfg.num_examples]
        write_evaluation(work_dir, result)
        return flat_metrics(result)

    def _compare(self, result: dict, task, prompts: list[str], completions: dict[str, list[str]], n: int,
                 reference: str | None, pm) -> None:
        """Win rates between the policies (paired samples) and, on class-game tasks, exploitability."""
        flat_prompts = [p for p in prompts for _ in range(n)]  # sample i answers prompts[i // n]
        group = torch.arange(len(prompts)).repeat_interleave(n)
        evaluated = {k: v for k, v in completions.items() if k in result["policies"]}
        if self.cfg.eval.win_rates and len(completions) > 1:
            gold = win_rate_matrix(flat_prompts, completions, group, task.gold_preference)
            result["win_rates"]["gold_preference"] = {a: row for a, row in gold.items() if a in evaluated}
            if pm is not None:
                learned = win_rate_matrix(flat_prompts, completions, group, lambda p, a, b: pm.preference(p, a, b))
                result["win_rates"]["preference_model"] = {a: row for a, row in learned.items() if a in evaluated}
            if reference in completions:
                for name in evaluated:
                    if name != reference:
                        cell = gold[name][reference]
                        result["policies"][name].update(win_rate=cell["mean"], win_rate_ci95=cell["ci95"])
        game = task.class_game()
        if game is None:
            return
        k = len(game.names)
        dists = {name: class_distribution(game.classify(flat_prompts, c), k) for name, c in completions.items()}
        ref_dist = dists.get(reference, torch.full((k,), 1.0 / k, dtype=torch.float64))
        count = len(flat_prompts)
        for name in evaluated:
            result["policies"][name]["class_distribution"] = dict(zip(game.names, dists[name].tolist()))
            result["policies"][name].update(game_metrics(game.matrix, dists[name], ref_dist, count=count,
                                                         ref_count=count if reference in dists else 10 ** 9,
                                                         beta=self.cfg.eval.exploitability_beta))
        matrix = torch.tensor(game.matrix, dtype=torch.float64)
        result["win_rates"]["class_game"] = {
            a: {b: {"mean": float(dists[a] @ matrix @ dists[b])} for b in evaluated if b != a}
            for a in evaluated}

    def _base_policy(self, task):
        """The SFT stage's starting point (same seed, same tokenizer recipe)."""
        import lightning as L

        from pipeline.models.policy import base_policy

        L.seed_everything(self.cfg.seed, verbose=False)
        return base_policy(self.cfg.model, task.corpus)
