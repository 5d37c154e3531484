"""Online-RL stage (kind ``rl``): policy optimisation from an SFT policy with any registered
algorithm (PPO, GRPO, RLOO, ReMax, REINFORCE++: ``algorithm=...``), settings in ``rl.*``.

Inputs: ``policy`` (the initial policy and the KL reference) and, for
``rl.reward_source=reward_model``, ``reward`` (a reward stage; also the critic's
initialisation for PPO). Publishes the trained policy (HF format, LoRA merged),
``curve.jsonl`` (held-out gold / proxy reward and KL every ``rl.eval_every`` steps:
the over-optimisation curve) and ``completions.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, requirements
from pipeline.config import plain
from pipeline.config.schema import AlgorithmConfig
from pipeline.data import ResumableLoader, load_prompt_rows, seeded_generator
from pipeline.errors import ConfigError
from pipeline.evaluation import HeldOutEvaluator
from pipeline.models.loading import save_pretrained
from pipeline.models.policy import trainable_policy
from pipeline.models.reward import RewardScorer
from pipeline.models.value import build_critic
from pipeline.modules.rl import OnlineRLModule
from pipeline.modules.schedule import SCHEDULABLE, parse_schedule
from pipeline.scoring import REWARD_SOURCES, GoldScorer, build_scorer
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task
from pipeline.training import build_trainer, fit


def validate_batch_sizes(cfg) -> None:
    """Fail before any training when the batch arithmetic does not work out."""
    a, r = cfg.algorithm, cfg.rl
    P, G, M = r.prompts_per_step, a.num_generations, a.num_mini_batches
    for key, v in (("rl.prompts_per_step", P), ("algorithm.num_generations", G),
                   ("algorithm.num_mini_batches", M), ("algorithm.ppo_epochs", a.ppo_epochs),
                   ("rl.total_steps", r.total_steps)):
        if v < 1:
            raise ConfigError(f"must be >= 1, got {v}", where=key)
    if (P * G) % M:
        raise ConfigError(
            f"algorithm.num_mini_batches={M} must divide the rollout batch "
            f"rl.prompts_per_step x algorithm.num_generations = {P} x {G} = {P * G}",
            where="algorithm.num_mini_batches", fix=f"use a divisor of {P * G}, or change prompts_per_step / num_generations")
    if "groups" in requirements(a.advantage_estimator) and G < 2:
        raise ConfigError(f"advantage_estimator={a.advantage_estimator} compares completions of the same prompt "
                          f"and needs algorithm.num_generations >= 2 (got {G})", where="algorithm.num_generations")
    if a.kl_penalty not in ("reward", "loss"):
        raise ConfigError(f"unknown value {a.kl_penalty!r}; choose reward or loss", where="algorithm.kl_penalty")
    if a.value_init not in ("reward", "policy"):
        raise ConfigError(f"unknown value {a.value_init!r}; choose reward or policy", where="algorithm.value_init")


@STAGES.register("rl")
class RLStage(Stage):
    kind = "rl"
    produces = "policy"
    roles = {"policy": Role({"policy"}), "reward": Role({"reward_model"}, required=False)}
    config_keys = ("task", "algorithm", "rl", "trainer")
    ignored_task_fields = ("num_pref_prompts", "label_noise", "bt_beta", "num_eval_prompts")
    headline = ("rollout/reward_mean", "rollout/gold_reward", "policy/kl", "eval/gold_reward", "eval/proxy_reward",
                "eval/kl", "train/steps")
    algorithm_schema = AlgorithmConfig
    schedule_key = "rl.schedule"
    schedulable = tuple(SCHEDULABLE)

    @classmethod
    def total_steps(cls, cfg) -> int:
        return int(cfg.rl.total_steps)

    @classmethod
    def validate(cls, cfg, spec) -> None:
        validate_batch_sizes(cfg)
        parse_schedule(cfg.rl.schedule, cfg.rl.total_steps)
        ADVANTAGE_ESTIMATORS.get(cfg.algorithm.advantage_estimator, key="algorithm.advantage_estimator")
        POLICY_LOSSES.get(cfg.algorithm.policy_loss, key="algorithm.policy_loss")
        KL_ESTIMATORS.get(cfg.algorithm.kl_estimator, key="algorithm.kl_estimator")
        REWARD_SOURCES.get(cfg.rl.reward_source, key="rl.reward_source")
        if cfg.rl.reward_source == "reward_model" and "reward" not in spec.inputs:
            raise ConfigError(f"stage {spec.name!r} uses rl.reward_source=reward_model but has no `reward` input",
                              where=f"pipeline.stages.{spec.name}.inputs", fix="add `reward: rm` or set rl.reward_source=gold")

    @classmethod
    def check_data(cls, cfg, spec) -> None:
        if cfg.rl.data.path:  # format, columns, message lists (lengths need the policy's tokenizer: at the start)
            load_prompt_rows(cfg.rl.data, key="rl.data")

    def run(self, work_dir: Path) -> dict:
        cfg, acfg, rcfg = self.cfg, self.cfg.algorithm, self.cfg.rl
        task = build_task(cfg.task)
        sft = self.input("policy")
        policy, tokenizer, ref_policy = trainable_policy(sft, rcfg.lora)  # ref None: LoRA adapters off
        scorer = build_scorer(cfg, self.inputs, task)
        reward_scorer = getattr(scorer, "reward_scorer", None)
        value_model = None
        if "values" in requirements(acfg.advantage_estimator):
            if reward_scorer is None and acfg.value_init == "reward" and "reward" in self.inputs:
                reward_scorer = RewardScorer.from_artifact(self.inputs["reward"])
            value_model = build_critic(policy, tokenizer, reward_scorer, acfg.value_init)
        gold_fn = None if rcfg.data.path else GoldScorer(task)  # gold is defined on the task's prompts
        heldout = None
        if rcfg.data.path:  # the user's prompts: a held-out part for the curve and the evaluation
            rows, heldout, max_prompt_length = self.user_prompts("rl", policy, tokenizer, acfg.max_new_tokens, work_dir)
        else:
            rows, max_prompt_length = task.prompts("rl"), None
        gen = seeded_generator(cfg.seed)  # picklable: ddp_spawn ships the loader to workers
        loader = ResumableLoader(rows, batch_size=rcfg.prompts_per_step, shuffle=True,
                                 drop_last=len(rows) >= rcfg.prompts_per_step, collate_fn=list, generator=gen)
        module = OnlineRLModule(policy, tokenizer, scorer, acfg, rcfg, ref_policy=ref_policy, value_model=value_model,
                                gold_fn=gold_fn, evaluate_fn=self._evaluator(task, tokenizer, scorer, ref_policy, heldout),
                                work_dir=work_dir, grad_clip=cfg.trainer.gradient_clip_val, seed=cfg.seed,
                                max_prompt_length=max_prompt_length)
        optimizer_steps = rcfg.total_steps * acfg.ppo_epochs * acfg.num_mini_batches  # Lightning counts these
        trainer = build_trainer(cfg, stage=self.name, work_dir=work_dir, max_steps=optimizer_steps, max_epochs=-1,
                                hook=self.hook, gradient_clip=False, resume=self.resume)
        fit(trainer, module, loader)
        save_pretrained(module.policy, tokenizer, work_dir / "model")  # LoRA adapters merged
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

    def _evaluator(self, task, tokenizer, scorer, ref_policy, heldout):
        """The held-out curve: the task's eval prompts with the gold reward, or (user prompts) the
        held-out user prompts with the reward model only (no gold reward exists for them)."""
        rcfg = self.cfg.rl
        if rcfg.eval_every <= 0 or (heldout is not None and not heldout):
            return None
        if heldout is not None:
            prompts, gold = [r["prompt"] for r in heldout][:rcfg.eval_prompts], None
        else:
            prompts, gold = [r["prompt"] for r in task.prompts("eval", rcfg.eval_prompts)], task.gold_reward
        return HeldOutEvaluator(tokenizer, prompts, gold=gold, proxy=getattr(scorer, "reward_scorer", None),
                                reference=ref_policy, max_new_tokens=self.cfg.algorithm.max_new_tokens,
                                seed=self.cfg.seed)
