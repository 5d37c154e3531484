"""Evaluation stage: policies against the gold reward, reward models against gold labels.

Inputs (all optional, at least one of ``policies`` / ``reward``): ``policies`` (policy
stages), ``reference`` (the policy the KL is measured against; usually ``sft``),
``reward`` (a reward stage: the proxy reward and its accuracy).

Per policy, on held-out prompts with ``eval.num_samples`` samples each: gold reward
(mean, std, 95% CI), proxy reward, KL(pi || pi_ref) (Monte-Carlo, summed over response
tokens), response length, EOS rate. For the reward model: pairwise accuracy on held-out
pairs labelled by the gold reward, overall and per subset. Everything goes to
``evaluation.json`` (see :mod:`pipeline.evaluation`); the metrics are its flat view.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.evaluation import SamplingSettings, evaluate_policy, flat_metrics, rm_accuracy, write_evaluation
from pipeline.models.loading import check_model_config
from pipeline.models.policy import policy_from_artifact
from pipeline.models.reward import RewardScorer
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    kind = "evaluate"
    produces = "evaluation"
    roles = {"policies": Role({"policy"}, required=False, many=True),
             "reference": Role({"policy"}, required=False),
             "reward": Role({"reward_model"}, required=False)}
    config_keys = ("task", "eval")
    ignored_task_fields = ("num_train_prompts", "num_pref_prompts", "label_noise", "bt_beta")
    headline = ("eval/rm_accuracy", "eval/rm_accuracy/")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        if "policies" not in spec.inputs and "reward" not in spec.inputs:
            raise ConfigError(f"stage {spec.name!r} has nothing to evaluate", where=f"pipeline.stages.{spec.name}.inputs",
                              fix="give it `policies: [...]` and/or `reward: <reward stage>`")
        if cfg.eval.include_base:
            check_model_config(cfg.model)

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        out["max_length"] = cfg.model.max_length
        return out

    def run(self, work_dir: Path) -> dict:
        ecfg = self.cfg.eval
        task = build_task(self.cfg.task)
        result: dict = {"reference": self.spec.inputs.get("reference"), "policies": {}, "reward_models": {}}
        scorer = None
        if "reward" in self.inputs:
            scorer = RewardScorer.from_artifact(self.inputs["reward"], aggregation=ecfg.reward_aggregation)
            result["reward_models"][self.spec.inputs["reward"]] = rm_accuracy(scorer, task.eval_pairs())
        names = list(self.spec.inputs.get("policies", []))
        candidates = [(n, lambda a=a: policy_from_artifact(a)) for n, a in zip(names, self.inputs.get("policies", []))]
        if candidates and ecfg.include_base:
            candidates.insert(0, ("base", lambda: self._base_policy(task)))
        ref_model = False  # no KL without a reference
        if "reference" in self.inputs:
            ref_model, _ = policy_from_artifact(self.inputs["reference"])
            ref_model.eval()
        prompts = [r["prompt"] for r in task.prompts("eval")] if candidates else []
        settings = SamplingSettings.from_config(ecfg)
        samples: list[dict] = []
        for name, load in candidates:
            model, tokenizer = load()
            res = evaluate_policy(model, tokenizer, prompts, settings, seed=self.cfg.seed, gold=task.gold_reward,
                                  proxy=scorer, reference=ref_model)
            result["policies"][name] = res.metrics
            samples += [{"policy": name, **s} for s in res.samples]
        with open(work_dir / "examples.jsonl", "w") as fh:
            for row in samples:
                fh.write(json.dumps(row) + "\n")
        result["examples"] = [s for s in samples if s["index"] < ecfg.num_examples]
        write_evaluation(work_dir, result)
        return flat_metrics(result)

    def _base_policy(self, task):
        """The SFT stage's starting point (same seed, same tokenizer recipe)."""
        import lightning as L

        from pipeline.models.policy import base_policy

        L.seed_everything(self.cfg.seed, verbose=False)
        return base_policy(self.cfg.model, task.corpus)
