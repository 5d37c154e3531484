"""Online preference stage (kind ``nlhf``): Nash methods and online / iterative DPO from an SFT
policy (``algorithm=nash_md|nash_mp|online_ipo|egpo|inpo|online_dpo``), settings in ``nlhf.*``.

Inputs: ``policy`` (the initial policy and the KL reference) and ``judge`` (a reward model,
read through σ(r − r'), or a pairwise preference model); with ``nlhf.judge=gold_preference`` or
``gold_reward`` the task's own gold judge is used and no input is needed. Publishes the trained
policy (HF format, LoRA merged) and ``curve.jsonl`` (held-out gold reward, KL to the input
policy and the gold win rate against it every ``nlhf.eval_every`` iterations).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.algorithms.preference_losses import PREFERENCE_LOSSES, validate_loss_config
from pipeline.config import plain
from pipeline.config.schema import NLHFAlgorithmConfig, PreferenceLossOptions
from pipeline.data import ResumableLoader, load_prompt_rows, seeded_generator
from pipeline.errors import ConfigError
from pipeline.evaluation import HeldOutEvaluator
from pipeline.models.loading import save_pretrained
from pipeline.models.policy import trainable_policy
from pipeline.models.preference import PreferenceScorer
from pipeline.models.reward import RewardScorer
from pipeline.modules.nlhf import OnlinePreferenceModule, frozen_copy
from pipeline.modules.online_objectives import ONLINE_OBJECTIVES
from pipeline.modules.schedule import NLHF_SCHEDULABLE, parse_schedule
from pipeline.scoring import JUDGES
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task
from pipeline.training import build_trainer, fit

UPDATES = ("plain", "extragradient")
#: the algorithm settings an objective may read (declared per objective as ``options``)
_OPTIONAL = ("mixture_coef", "eta") + tuple(f.name for f in dataclasses.fields(PreferenceLossOptions))
_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(NLHFAlgorithmConfig)}
#: how a judge input is loaded, by the artifact type it publishes
_JUDGE_LOADERS = {
    "reward_model": lambda art, ncfg: RewardScorer.from_artifact(art, aggregation=ncfg.reward_aggregation,
                                                                 uwo_coef=ncfg.uwo_coef),
    "preference_model": lambda art, ncfg: PreferenceScorer.from_artifact(art),
}


def loss_options(acfg) -> dict:
    """The preference-loss options of ``algorithm`` (for :func:`preference_loss`)."""
    names = ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma",
             "cpl_lambda", "reference_free", "rpo_alpha")
    return {n: plain(acfg[n]) for n in names}


def validate_algorithm(acfg, ncfg) -> None:
    """Fail before anything runs when the algorithm / loop settings cannot work together."""
    meta = ONLINE_OBJECTIVES.meta(acfg.loss, key="algorithm.loss")
    if acfg.update_rule not in UPDATES:
        raise ConfigError(f"unknown value {acfg.update_rule!r}; choose one of {', '.join(UPDATES)}", where="algorithm.update_rule")
    if acfg.update_rule not in meta["updates"]:
        raise ConfigError(f"algorithm.loss={acfg.loss} runs with update_rule={' or '.join(sorted(meta['updates']))}, "
                          f"not {acfg.update_rule}", where="algorithm.update_rule",
                          fix=f"set algorithm.update_rule={sorted(meta['updates'])[0]}")
    for key, v in (("algorithm.num_generations", acfg.num_generations), ("algorithm.inner_steps", acfg.inner_steps),
                   ("algorithm.max_new_tokens", acfg.max_new_tokens), ("nlhf.prompts_per_step", ncfg.prompts_per_step),
                   ("nlhf.rounds", ncfg.rounds), ("nlhf.steps_per_round", ncfg.steps_per_round)):
        if v < 1:
            raise ConfigError(f"must be >= 1, got {v}", where=key)
    if acfg.num_generations < meta["min_generations"]:
        raise ConfigError(f"algorithm.loss={acfg.loss} compares responses of the same prompt and needs "
                          f"algorithm.num_generations >= {meta['min_generations']} (got {acfg.num_generations})",
                          where="algorithm.num_generations")
    if ncfg.ref_update_every < 0:
        raise ConfigError(f"must be >= 0 (0 = never), got {ncfg.ref_update_every}", where="nlhf.ref_update_every")
    if not acfg.beta > 0:
        raise ConfigError(f"must be > 0, got {acfg.beta}", where="algorithm.beta")
    if not 0.0 <= acfg.mixture_coef <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {acfg.mixture_coef}", where="algorithm.mixture_coef")
    if not acfg.eta > 0:
        raise ConfigError(f"must be > 0, got {acfg.eta}", where="algorithm.eta")
    unused = [n for n in _OPTIONAL if n not in meta["options"] and plain(acfg[n]) != _DEFAULTS[n]]
    if acfg.update_rule == "plain" and acfg.inner_steps != _DEFAULTS["inner_steps"]:
        unused.append("inner_steps")
    if unused:
        users = [o for o in ONLINE_OBJECTIVES if unused[0] in ONLINE_OBJECTIVES.meta(o)["options"]]
        raise ConfigError(f"algorithm.{unused[0]} has no effect with algorithm.loss={acfg.loss}"
                          + (f" and update_rule={acfg.update_rule}" if unused[0] == "inner_steps" else "")
                          + " (a silent no-op is an error)", where=f"algorithm.{unused[0]}",
                          fix="remove it" + (f", or use algorithm.loss={' or '.join(users)}" if users else
                                             ", or use algorithm.update_rule=extragradient"))
    if acfg.loss == "best_worst":
        types = [acfg.loss_type] if isinstance(acfg.loss_type, str) else list(acfg.loss_type)
        metas = [PREFERENCE_LOSSES.meta(t, key="algorithm.loss_type") for t in types]
        data = "list" if any(m["data"] == "list" for m in metas) else "pair"
        validate_loss_config(acfg.loss_type, plain(acfg.loss_weights), loss_options(acfg), key="algorithm",
                             defaults=_DEFAULTS, data=data)
        stateful = [t for t, m in zip(types, metas) if m["runtime"]]
        if stateful:
            raise ConfigError(f"{stateful} keep per-step state ({', '.join(sorted(set().union(*(m['runtime'] for m in metas))))}) "
                              "that the online loop does not track", where="algorithm.loss_type",
                              fix="use another loss online (sigmoid, ipo, hinge, robust...) or the offline dpo stage")


@STAGES.register("nlhf")
class NLHFStage(Stage):
    kind = "nlhf"
    produces = "policy"
    roles = {"policy": Role({"policy"}), "judge": Role({"reward_model", "preference_model"}, required=False)}
    config_keys = ("task", "algorithm", "nlhf", "trainer")
    ignored_task_fields = ("num_pref_prompts", "label_noise", "num_eval_prompts")
    headline = ("rollout/win_rate", "policy/kl", "eval/win_rate", "eval/gold_reward", "eval/kl", "train/steps")
    algorithm_schema = NLHFAlgorithmConfig
    schedule_key = "nlhf.schedule"
    schedulable = tuple(NLHF_SCHEDULABLE)

    @classmethod
    def total_steps(cls, cfg) -> int:
        return int(cfg.nlhf.rounds * cfg.nlhf.steps_per_round)

    @classmethod
    def validate(cls, cfg, spec) -> None:
        acfg, ncfg = cfg.algorithm, cfg.nlhf
        validate_algorithm(acfg, ncfg)
        parse_schedule(ncfg.schedule, cls.total_steps(cfg), "nlhf.schedule", NLHF_SCHEDULABLE)
        where = f"pipeline.stages.{spec.name}.inputs"
        if ncfg.judge is None:
            if "judge" not in spec.inputs:
                raise ConfigError(f"stage {spec.name!r} has no judge: give it a `judge` input (a reward model or a "
                                  "preference model) or set nlhf.judge=gold_preference", where=where)
        else:
            needs = JUDGES.meta(ncfg.judge, key="nlhf.judge")["needs"]
            if needs is None and "judge" in spec.inputs:
                raise ConfigError(f"nlhf.judge={ncfg.judge} is the task's own judge, so the `judge` input "
                                  f"{spec.inputs['judge']!r} would be unused", where=where,
                                  fix="remove the judge input, or set nlhf.judge=null to judge with it")
            if needs is not None and "judge" not in spec.inputs:
                raise ConfigError(f"nlhf.judge={ncfg.judge} needs a `judge` input publishing a "
                                  f"{needs.replace('_', ' ')}", where=where)

    def _judge(self, task):
        ncfg = self.cfg.nlhf
        art = self.inputs.get("judge")
        produces = STAGES.get(art.kind).produces if art is not None else None
        name = ncfg.judge or produces
        needs = JUDGES.meta(name, key="nlhf.judge")["needs"]
        if needs is not None and needs != produces:
            raise ConfigError(f"nlhf.judge={name} needs a {needs.replace('_', ' ')}, but the judge input "
                              f"{self.spec.inputs['judge']!r} publishes a {produces.replace('_', ' ')}",
                              where="nlhf.judge", fix=f"set nlhf.judge=null (judge with {produces.replace('_', ' ')})")
        model = _JUDGE_LOADERS[needs](art, ncfg) if needs is not None else None
        return JUDGES.get(name)(model, task, ncfg), name

    @classmethod
    def check_data(cls, cfg, spec) -> None:
        if cfg.nlhf.data.path:  # format, columns, message lists (lengths need the policy's tokenizer: at the start)
            load_prompt_rows(cfg.nlhf.data, key="nlhf.data")

    def run(self, work_dir: Path) -> dict:
        cfg, acfg, ncfg = self.cfg, self.cfg.algorithm, self.cfg.nlhf
        task = build_task(cfg.task)
        start = self.input("policy")
        policy, tokenizer, ref_policy = trainable_policy(start, ncfg.lora)  # ref None: LoRA adapters off
        judge, judge_name = self._judge(task)
        if ncfg.data.path:  # the user's prompts: a held-out part is published for the evaluation
            rows, _, max_prompt_length = self.user_prompts("nlhf", policy, tokenizer, acfg.max_new_tokens, work_dir)
        else:
            rows, max_prompt_length = task.prompts("rl"), None
        loader = ResumableLoader(rows, batch_size=ncfg.prompts_per_step, shuffle=True,
                                 drop_last=len(rows) >= ncfg.prompts_per_step, collate_fn=list,
                                 generator=seeded_generator(cfg.seed))
        evaluator = self._evaluator(task, tokenizer, ref_policy)
        module = OnlinePreferenceModule(policy, tokenizer, judge, acfg, ncfg, ref_policy=ref_policy,
                                        loss_options=loss_options(acfg), evaluate_fn=evaluator, work_dir=work_dir,
                                        grad_clip=cfg.trainer.gradient_clip_val, seed=cfg.seed,
                                        max_prompt_length=max_prompt_length)
        per_iteration = 2 * acfg.inner_steps if acfg.update_rule == "extragradient" else 1
        iterations = ncfg.rounds * ncfg.steps_per_round
        trainer = build_trainer(cfg, stage=self.name, work_dir=work_dir, max_steps=iterations * per_iteration,
                                max_epochs=-1, hook=self.hook, gradient_clip=False, resume=self.resume)
        fit(trainer, module, loader)
        save_pretrained(module.policy, tokenizer, work_dir / "model")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        metrics["train/steps"] = int(metrics.pop("train/rollout_step", module.rollout_step))
        metrics["train/optimizer_steps"] = int(trainer.global_step)
        curve = work_dir / "curve.jsonl"
        if curve.is_file():
            points = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
            if points:
                metrics.update({k: v for k, v in points[-1].items() if k != "step"})
        self.record["algorithm"] = plain(acfg)
        self.record["judge"] = judge_name
        return metrics

    def _evaluator(self, task, tokenizer, ref_policy):
        ncfg = self.cfg.nlhf
        if ncfg.eval_every <= 0 or ncfg.data.path:
            return None
        prompts = [r["prompt"] for r in task.prompts("eval", ncfg.eval_prompts)]
        # the curve's KL is always to the input policy, also when the loop's reference moves
        reference = frozen_copy(ref_policy) if ref_policy is not None and ncfg.ref_update_every else ref_policy
        return HeldOutEvaluator(tokenizer, prompts, gold=task.gold_reward, proxy=None, reference=reference,
                                max_new_tokens=self.cfg.algorithm.max_new_tokens, seed=self.cfg.seed,
                                preference=task.gold_preference)
