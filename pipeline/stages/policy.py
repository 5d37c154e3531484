"""Policy-optimisation stage: online RL from an SFT policy (PPO, GRPO, RLOO, ReMax, REINFORCE++).

Inputs: ``policy`` (the SFT stage: initial policy and reference) and, for
``policy.reward_source=reward_model``, ``reward`` (a reward stage; also the critic's
initialisation for PPO). Publishes the trained policy (HF format, LoRA merged),
``curve.jsonl`` (held-out gold / proxy reward and KL every ``policy.eval_every`` steps:
the over-optimisation curve) and ``completions.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.algorithms import requirements
from pipeline.data import seeded_generator
from pipeline.errors import ConfigError, DataError
from pipeline.models.loading import save_pretrained
from pipeline.models.policy import apply_lora, policy_from_artifact
from pipeline.models.value import ValueModel
from pipeline.modules.policy import OnlineRLModule
from pipeline.scoring import GoldScorer, build_scorer
from pipeline.stages.base import STAGES, Stage, plain
from pipeline.tasks import build_task
from pipeline.training import build_trainer

def validate_batch_sizes(cfg) -> None:
    """Fail before any training when the batch arithmetic does not work out."""
    a, p = cfg.algorithm, cfg.policy
    P, G, M = p.prompts_per_step, a.num_generations, a.num_mini_batches
    for key, v in (("policy.prompts_per_step", P), ("algorithm.num_generations", G),
                   ("algorithm.num_mini_batches", M), ("algorithm.ppo_epochs", a.ppo_epochs),
                   ("policy.total_steps", p.total_steps)):
        if v < 1:
            raise ConfigError(f"must be >= 1, got {v}", where=key)
    if (P * G) % M:
        raise ConfigError(
            f"algorithm.num_mini_batches={M} must divide the rollout batch "
            f"policy.prompts_per_step x algorithm.num_generations = {P} x {G} = {P * G}",
            where="algorithm.num_mini_batches", fix=f"use a divisor of {P * G}, or change prompts_per_step / num_generations")
    if "groups" in requirements(a.advantage_estimator) and G < 2:
        raise ConfigError(f"advantage_estimator={a.advantage_estimator} compares completions of the same prompt "
                          f"and needs algorithm.num_generations >= 2 (got {G})", where="algorithm.num_generations")
    if a.kl_penalty not in ("reward", "loss"):
        raise ConfigError(f"unknown value {a.kl_penalty!r}; choose reward or loss", where="algorithm.kl_penalty")
    if a.value_init not in ("reward", "policy"):
        raise ConfigError(f"unknown value {a.value_init!r}; choose reward or policy", where="algorithm.value_init")


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@STAGES.register("policy")
class PolicyStage(Stage):
    kind = "policy"
    config_keys = ("task", "algorithm", "policy", "trainer")
    ignored_task_fields = ("num_pref_prompts", "label_noise", "bt_beta", "num_eval_prompts")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        from pipeline.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES
        from pipeline.scoring import REWARD_SOURCES

        validate_batch_sizes(cfg)
        ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator, key="algorithm.advantage_estimator")
        POLICY_LOSSES.get(cfg.algorithm.policy_loss, key="algorithm.policy_loss")
        KL_ESTIMATORS.get(cfg.algorithm.kl_estimator, key="algorithm.kl_estimator")
        REWARD_SOURCES.get(cfg.policy.reward_source, key="policy.reward_source")
        if cfg.policy.reward_source == "reward_model" and "reward" not in spec.inputs:
            raise ConfigError(f"stage {spec.name!r} uses policy.reward_source=reward_model but has no `reward` input",
                              where=f"pipeline.stages.{spec.name}.inputs", fix="add `reward: rm` or set policy.reward_source=gold")

    def _prompt_rows(self, task) -> list[dict]:
        dcfg = self.cfg.policy.data
        if not dcfg.path:
            return task.prompts("rl")
        from pipeline.data.loading import read_rows

        rows = read_rows(dcfg.path, name=dcfg.name, split=dcfg.split, max_samples=dcfg.max_samples, key="policy.data")
        out = []
        for r in rows:
            values = {dcfg.columns.get(k, k): v for k, v in r.values.items()}
            if not isinstance(values.get("prompt"), str):
                raise DataError(f"row has no string 'prompt' column (columns: {', '.join(values)})", where=r.where,
                                fix="prompt datasets need a 'prompt' column; rename with policy.data.columns")
            out.append(values)
        return out

    def run(self, work_dir: Path) -> dict:
        cfg, acfg, pcfg = self.cfg, self.cfg.algorithm, self.cfg.policy
        task = build_task(cfg.task)
        sft = self.input("policy")
        policy, tokenizer = policy_from_artifact(sft)
        _no_dropout(policy)
        ref_policy = None
        if pcfg.lora.enabled:
            policy = apply_lora(policy, pcfg.lora)
        else:
            ref_policy, _ = policy_from_artifact(sft)
        needs = requirements(acfg.advantage_estimator)
        scorer = build_scorer(cfg, self.inputs, task)
        value_model = self._critic(policy, tokenizer, scorer) if "values" in needs else None
        gold_fn = None if pcfg.data.path else GoldScorer(task)  # gold is defined on the task's prompts
        rows = self._prompt_rows(task)
        gen = seeded_generator(cfg.seed)  # picklable: ddp_spawn ships the loader to workers
        loader = DataLoader(rows, batch_size=pcfg.prompts_per_step, shuffle=True, drop_last=len(rows) >= pcfg.prompts_per_step,
                            collate_fn=list, generator=gen)
        module = OnlineRLModule(policy, tokenizer, scorer, acfg, pcfg, ref_policy=ref_policy, value_model=value_model,
                                gold_fn=gold_fn, evaluate_fn=self._evaluator(task, tokenizer, scorer, ref_policy),
                                work_dir=work_dir, grad_clip=cfg.trainer.gradient_clip_val, seed=cfg.seed)
        optimizer_steps = pcfg.total_steps * acfg.ppo_epochs * acfg.num_mini_batches  # Lightning counts these
        trainer = build_trainer(cfg, stage=self.name, work_dir=work_dir, max_steps=optimizer_steps, max_epochs=-1,
                                hook=self.hook, gradient_clip=False)
        trainer.fit(module, loader)
        trained = module.policy
        if hasattr(trained, "merge_and_unload"):
            trained = trained.merge_and_unload()
        save_pretrained(trained, tokenizer, work_dir / "model")
        # callback_metrics also come back from ddp_spawn workers (module attributes do not)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics["train/steps"] = int(metrics.pop("train/rollout_step", module.rollout_step))
        metrics["train/optimizer_steps"] = int(trainer.global_step)
        curve = work_dir / "curve.jsonl"
        if curve.is_file():
            points = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
            if points:
                metrics.update({k: v for k, v in points[-1].items() if k != "step"})
        self.record["algorithm"] = plain(acfg)
        return metrics

    def _critic(self, policy, tokenizer, scorer):
        """N+ recipe: initialise the critic from the reward model when it shares the tokenizer."""
        if self.cfg.algorithm.value_init == "reward" and "reward" in self.inputs:
            from pipeline.models.reward import RewardScorer

            # the scorer's RM when it already loaded one (copied, not shared, by ValueModel)
            rm = getattr(scorer, "reward_scorer", None) or RewardScorer.from_artifact(self.inputs["reward"])
            member = rm.ensemble.members[0]
            if rm.tokenizer.get_vocab() == tokenizer.get_vocab() and member.config.model_type == policy.config.model_type:
                return ValueModel.from_reward_model(member)
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        return ValueModel.from_policy(base)

    def _evaluator(self, task, tokenizer, scorer, ref_policy):
        pcfg = self.cfg.policy
        if pcfg.eval_every <= 0 or pcfg.data.path:
            return None
        prompts = [r["prompt"] for r in task.prompts("eval", pcfg.eval_prompts)]
        return HeldOutEvaluator(task, tokenizer, prompts, getattr(scorer, "reward_scorer", None), ref_policy,
                                max_new_tokens=self.cfg.algorithm.max_new_tokens, seed=self.cfg.seed)


class HeldOutEvaluator:
    """Held-out gold / proxy reward and KL to the reference: the over-optimisation curve.

    A class (not a closure) so spawned DDP workers can unpickle it."""

    def __init__(self, task, tokenizer, prompts, reward_scorer, ref_policy, *, max_new_tokens: int, seed: int):
        from types import SimpleNamespace

        self.task, self.tokenizer, self.prompts = task, tokenizer, prompts
        self.reward_scorer, self.ref_policy, self.seed = reward_scorer, ref_policy, seed
        self.settings = SimpleNamespace(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, num_samples=1,
                                        batch_size=64)

    def __call__(self, policy) -> dict:
        from pipeline.stages.evaluate import kl_to_reference, sample_policy

        policy.eval()
        batches = sample_policy(policy, self.tokenizer, self.prompts, self.settings, seed=self.seed)
        ps = [p for b in batches for p in b.prompts]
        cs = [c for b in batches for c in b.completions]
        out = {"eval/gold_reward": sum(self.task.gold_reward(ps, cs)) / len(cs)}
        if self.reward_scorer is not None:
            out["eval/proxy_reward"] = float(self.reward_scorer.score(ps, cs).mean())
        if self.ref_policy is not None:
            kl = torch.cat([kl_to_reference(b, policy, self.ref_policy, 1.0) for b in batches])
        else:
            kl = torch.cat([_lora_kl(b, policy) for b in batches])
        out["eval/kl"] = float(kl.mean())
        return out


@torch.no_grad()
def _lora_kl(batch, policy):
    from pipeline.rollout.engine import sequence_logprobs

    ids, mask, start = batch.input_ids, batch.attention_mask, batch.response_start
    lp = sequence_logprobs(policy, ids, mask, start)
    with policy.disable_adapter():
        lp_ref = sequence_logprobs(policy, ids, mask, start)
    return ((lp - lp_ref) * batch.response_mask).sum(1)
