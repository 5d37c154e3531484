"""Online RL as one LightningModule (manual optimisation), for every algorithm.

Each ``training_step`` is one rollout step, readable top to bottom:

1. sample G completions for each of the P prompts with the rollout engine;
2. score them (reward model / gold / callable), apply EOS penalty, clipping, whitening;
3. reference log-probs and the per-token KL estimate; KL-shaped token rewards
   (``kl_penalty=reward``) or a KL loss term later (``kl_penalty=loss``);
4. advantages from the registered estimator (gae needs the critic's values;
   remax needs the greedy decode's score as baseline);
5. ``ppo_epochs`` x ``num_mini_batches`` updates of the registered policy loss
   (+ the clipped value loss for the critic).

Algorithms differ only in the registry names and numbers of ``cfg.algorithm``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from pipeline.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    agg_loss,
    apply_missing_eos_penalty,
    build_kl_controller,
    clip_rewards,
    explained_variance,
    masked_mean,
    requirements,
    token_level_rewards,
    value_loss,
    whiten_rewards,
)
from pipeline.data import seeded_generator
from pipeline.errors import TrainingError
from pipeline.models.packing import accepts_packed
from pipeline.modules.common import OnlineLogging
from pipeline.modules.schedule import parse_schedule, set_learning_rates
from pipeline.rollout.engine import (
    HFRolloutEngine,
    ResponseLayout,
    RolloutBatch,
    SamplingParams,
    layout_responses,
    reference_logprobs,
    sequence_logprobs,
)


@dataclass
class Experience:
    """One rollout step's batch, ready for the update (all without gradient)."""

    rollout: RolloutBatch
    raw_scores: torch.Tensor
    #: after EOS penalty, clipping, whitening
    scores: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    #: per-token KL estimate (the configured estimator), 0 outside the mask
    kl: torch.Tensor
    token_rewards: torch.Tensor
    old_values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor
    gen_time_s: float
    score_time_s: float
    #: the batch laid out for the forward passes (packed: each prompt once), reused by the update
    layout: ResponseLayout


class OnlineRLModule(OnlineLogging, L.LightningModule):
    def __init__(self, policy, tokenizer, scorer: Callable, acfg, rcfg, *, ref_policy=None, value_model=None,
                 gold_fn: Callable | None = None, evaluate_fn: Callable | None = None, work_dir: Path | None = None,
                 grad_clip: float | None = 1.0, seed: int = 0, max_prompt_length: int | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy.train()
        self.ref_policy = ref_policy.eval().requires_grad_(False) if ref_policy is not None else None
        self.value_model = value_model.train() if value_model is not None else None
        self.tokenizer = tokenizer
        self.scorer, self.gold_fn, self.evaluate_fn = scorer, gold_fn, evaluate_fn
        # the module's own copies: a schedule (rl.schedule) changes them between rollout steps
        self.acfg, self.rcfg = copy.deepcopy(acfg), copy.deepcopy(rcfg)
        #: rollout step -> {schedulable key: value} taking effect at the start of that step
        self.schedule: dict[int, dict] = dict(parse_schedule(rcfg.schedule, rcfg.total_steps))
        self.work_dir = Path(work_dir) if work_dir else None
        self.grad_clip = grad_clip
        self.seed = seed
        self.engine = HFRolloutEngine(self.policy, tokenizer, max_prompt_length=max_prompt_length,
                                      add_special_tokens=False)
        self.sampling = SamplingParams(max_new_tokens=acfg.max_new_tokens, temperature=acfg.temperature,
                                       top_p=acfg.top_p, top_k=acfg.top_k, n=acfg.num_generations)
        self.kl_ctl = build_kl_controller(acfg.kl_controller, acfg.kl_coef, acfg.kl_target, acfg.kl_horizon)
        self.estimator = ADVANTAGE_ESTIMATORS.get(acfg.advantage_estimator, key="algorithm.advantage_estimator")
        self.needs = requirements(acfg.advantage_estimator)
        self.policy_loss = POLICY_LOSSES.get(acfg.policy_loss, key="algorithm.policy_loss")
        self.kl_fn = KL_ESTIMATORS.get(acfg.kl_estimator, key="algorithm.kl_estimator")
        self._generator = seeded_generator(seed * 1009)  # picklable (ddp_spawn); re-seeded per rank at fit start
        #: forward passes on packed batches (each prompt once, no padding) unless a model cannot take them
        self.pack = all(accepts_packed(m) for m in (policy, ref_policy, value_model) if m is not None)
        #: rollout steps done (Lightning's global_step counts optimizer steps: E x M per rollout step)
        self.rollout_step = 0
        #: the latest held-out evaluation, ``{"step": s, "eval/gold_reward": ..}`` (rank 0)
        self.last_eval: dict | None = None
        #: the module's part of a checkpoint being resumed from (applied in ``on_fit_start``)
        self._resumed: dict | None = None

    # ------------------------------------------------------------------ setup
    def configure_optimizers(self):
        from pipeline.modules.common import configure_adamw

        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]
        if self.value_model is not None:
            groups.append({"params": list(self.value_model.parameters()),
                           "lr": self.acfg.critic_lr or self.rcfg.optim.lr})
        return configure_adamw(self, groups, self.rcfg.optim)

    def on_fit_start(self):
        # each rank samples its own stream; same seed + rank -> same numbers
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed * 1009 + self.global_rank)
        resumed, self._resumed = self._resumed, None
        if resumed is not None:  # a mid-stage checkpoint (pipeline.resume): continue its streams
            self._generator.set_state(resumed["generator"])
            for step in sorted(self.schedule):  # the settings in effect (the state already holds their effect)
                if step < self.rollout_step:
                    self.apply_hyperparameters(self.schedule[step], state=False)
            return  # its step-0 evaluation is in the restored curve.jsonl
        if self.evaluate_fn is not None and self.rcfg.eval_every > 0:
            self._evaluate()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What a mid-stage checkpoint needs beyond weights and optimizer: the rollout step, the KL
        controller's coefficient and the rollout generator (this rank's; rank 0's on disk)."""
        checkpoint["online_rl"] = {"rollout_step": self.rollout_step, "kl_coef": float(self.kl_ctl.value),
                                   "generator": self._generator.get_state().cpu()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["online_rl"]
        self.rollout_step = int(state["rollout_step"])
        self.kl_ctl.value = float(state["kl_coef"])
        self._resumed = state

    def on_fit_end(self):
        if self.evaluate_fn is not None and self.rcfg.eval_every > 0 and self.rollout_step % self.rcfg.eval_every:
            self._evaluate(step=self.rollout_step)

    # --------------------------------------------------------------- the step
    @torch.no_grad()
    def experience(self, rows: list[dict]) -> Experience:
        """Steps 1-4 for a batch of prompt rows: sample, score, reference log-probs and KL,
        KL-shaped token rewards, advantages. No parameter changes."""
        t0 = time.perf_counter()
        prompts = [r["prompt"] for r in rows]
        rollout = self.engine.generate(prompts, self.sampling, generator=self._generator).trim()
        t_gen = time.perf_counter() - t0

        rows_g = [rows[i] for i in rollout.group_index.tolist()]
        scores, raw_scores, baseline = self._score(rollout, rows, rows_g)
        t_score = time.perf_counter() - t0 - t_gen

        mask = rollout.response_mask.float()
        ids, attn, start = rollout.input_ids, rollout.attention_mask, rollout.response_start
        layout = self.layout(ids, attn, start)
        # log-probs of the sampled tokens under the temperature-scaled policy, from the rollout itself
        old_logp = rollout.logprobs
        # LoRA (no ref_policy): the reference is the policy with its adapters disabled
        ref_logp = reference_logprobs(self.policy, self.ref_policy, ids, attn, start, self.acfg.temperature,
                                      layout=layout)
        kl = self.kl_fn(old_logp, ref_logp) * mask
        shaping = kl if self.acfg.kl_penalty == "reward" else torch.zeros_like(kl)
        token_rewards = token_level_rewards(scores, shaping, mask, self.kl_ctl.value)
        old_values = None
        if self.value_model is not None:
            with torch.inference_mode():
                old_values = self._values(layout)
            old_values = old_values.clone()  # an ordinary tensor again
        adv, returns = self.estimator(
            token_rewards=token_rewards, response_mask=mask, values=old_values,
            group_index=rollout.group_index, baseline_scores=baseline, gamma=self.acfg.gamma,
            lam=self.acfg.lam, norm_adv_by_std=self.acfg.norm_adv_by_std)
        return Experience(rollout, raw_scores, scores, mask, old_logp, ref_logp, kl, token_rewards, old_values, adv,
                          returns, t_gen, t_score, layout)

    def apply_hyperparameters(self, values: dict, state: bool = True) -> None:
        """Set schedulable hyperparameters (``{"algorithm.kl_coef": 0.1, ...}``, see
        :mod:`pipeline.modules.schedule`) from now on. ``state=True`` also pushes them into the
        training state: learning rates into the optimizer and its LR schedule, ``kl_coef`` into the
        KL controller (a resumed run restores that state from its checkpoint instead)."""
        for key, value in values.items():
            section, name = key.split(".", 1)
            if section == "rl":  # rl.optim.lr
                self.rcfg.optim.lr = value
            else:
                self.acfg[name] = value
            if name in ("kl_target", "kl_horizon") and hasattr(self.kl_ctl, name[3:]):
                setattr(self.kl_ctl, name[3:], float(value))
            if state and name == "kl_coef":
                self.kl_ctl.value = float(value)
        self.sampling = self.sampling.replace(temperature=self.acfg.temperature, top_p=self.acfg.top_p,
                                              top_k=self.acfg.top_k)
        if state and ("rl.optim.lr" in values or "algorithm.critic_lr" in values):
            lrs = [self.rcfg.optim.lr]
            if self.value_model is not None:
                lrs.append(self.acfg.critic_lr or self.rcfg.optim.lr)
            set_learning_rates(self.optimizers(), self.lr_schedulers(), lrs)

    def training_step(self, rows: list[dict], batch_idx: int):
        t0 = time.perf_counter()
        if self.rollout_step in self.schedule:
            self.apply_hyperparameters(self.schedule[self.rollout_step])
        exp = self.experience(rows)
        rollout, raw_scores, kl, mask = exp.rollout, exp.raw_scores, exp.kl, exp.mask
        t_gen, t_score = exp.gen_time_s, exp.score_time_s
        update_metrics = self._update(exp)
        t_update = time.perf_counter() - t0 - t_gen - t_score

        seq_kl = kl.sum(1)  # the configured estimator, summed over response tokens
        self.kl_ctl.update(float(seq_kl.mean()), len(rollout))
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()

        n_tokens = float(mask.sum())
        step_time = time.perf_counter() - t0
        metrics = {
            "rollout/reward_mean": raw_scores.mean(), "rollout/reward_std": raw_scores.std() if len(raw_scores) > 1 else 0.0,
            "rollout/response_length": rollout.response_lengths.float().mean(),
            "rollout/eos_rate": rollout.has_eos.float().mean(),
            "policy/kl": seq_kl.mean(), "policy/kl_coef": self.kl_ctl.value,
            "perf/gen_time_s": t_gen, "perf/score_time_s": t_score, "perf/update_time_s": t_update,
            "perf/step_time_s": step_time, "perf/tokens_per_s": n_tokens / max(step_time, 1e-9),
            **update_metrics,
        }
        if self.gold_fn is not None:
            metrics["rollout/gold_reward"] = self.gold_fn(rollout.prompts, rollout.completions).mean()
        self.rollout_step += 1
        self._log(metrics)
        self._log_completions(rollout, raw_scores)
        if self.evaluate_fn is not None and self.rcfg.eval_every > 0 and self.rollout_step % self.rcfg.eval_every == 0:
            self._evaluate(step=self.rollout_step)

    # ------------------------------------------------------------- pieces
    def _score(self, rollout: RolloutBatch, rows, rows_g):
        raw = self.scorer(rollout.prompts, rollout.completions, rows_g).to(self.device).float()
        scores = apply_missing_eos_penalty(raw, rollout.has_eos, self.acfg.missing_eos_penalty)
        scores = clip_rewards(scores, self.acfg.reward_clip)
        if self.acfg.whiten_rewards:
            scores = whiten_rewards(scores)
        baseline = None
        if "baseline_scores" in self.needs:  # ReMax: the greedy decode's reward is the baseline
            greedy = self.engine.generate([r["prompt"] for r in rows], self.sampling.replace(do_sample=False, n=1))
            b = self.scorer(greedy.prompts, greedy.completions, rows).to(self.device).float()
            b = clip_rewards(apply_missing_eos_penalty(b, greedy.has_eos, self.acfg.missing_eos_penalty),
                             self.acfg.reward_clip)
            baseline = b[rollout.group_index]
        return scores, raw, baseline

    def layout(self, ids, attn, start) -> ResponseLayout:
        """How a batch of rollout rows runs through the models (packed when they all allow it)."""
        return layout_responses(ids, attn, start, pack=self.pack)

    def policy_logprobs(self, ids, attn, start, return_entropy: bool = False, layout: ResponseLayout | None = None):
        """The training forward: log-probs (with gradient) of the response tokens under the
        policy at the sampling temperature, the same distribution the rollout reported."""
        layout = layout if layout is not None else self.layout(ids, attn, start)
        return sequence_logprobs(self.policy, ids, attn, start, self.acfg.temperature, return_entropy=return_entropy,
                                 layout=layout)

    def _values(self, layout: ResponseLayout):
        """The critic's value of the state before each response token, [N, R] (0 outside the responses)."""
        return layout.select(self.value_model(**layout.model_inputs(self.value_model)))

    def _entropy_due(self) -> bool:
        """Entropy is a diagnostic: computed on the rollout steps whose metrics the hook reads
        (every ``trainer.log_every_n_steps``), the first and the last."""
        step = self.rollout_step + 1
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        per_step = self.acfg.ppo_epochs * self.acfg.num_mini_batches
        last = (self.trainer.max_steps // per_step) if self.trainer.max_steps and self.trainer.max_steps > 0 else -1
        return step == 1 or step % every == 0 or step == last

    def _minibatches(self, exp: Experience, g: torch.Generator):
        """(row indices or None for all rows, layout) of one epoch; a single minibatch is the whole
        batch in rollout order and reuses the experience's layout."""
        n, n_mb = len(exp.rollout), self.acfg.num_mini_batches
        if n_mb == 1:
            return [(None, exp.layout)]
        r = exp.rollout
        ids, attn, start = r.input_ids, r.attention_mask, r.response_start
        perm = torch.randperm(n, generator=g).to(ids.device)
        return [(mb, self.layout(ids[mb], attn[mb], start)) for mb in perm.chunk(n_mb)]

    def _update(self, exp: Experience) -> dict:
        acfg = self.acfg
        opt = self.optimizers()
        entropy = self._entropy_due()
        stats: dict[str, list[torch.Tensor]] = {}
        g = torch.Generator().manual_seed(self.seed * 7919 + self.rollout_step)
        r = exp.rollout
        ids, attn, start = r.input_ids, r.attention_mask, r.response_start
        for _ in range(acfg.ppo_epochs):
            for mb, layout in self._minibatches(exp, g):
                rows = (lambda x: x) if mb is None else (lambda x, mb=mb: x[mb])  # noqa: E731
                mask = rows(exp.mask)
                out = self.policy_logprobs(rows(ids), rows(attn), start, return_entropy=entropy, layout=layout)
                logp, ent = out if entropy else (out, None)
                loss, m = self.policy_loss(logp=logp, old_logp=rows(exp.old_logp), advantages=rows(exp.advantages),
                                           response_mask=mask, cliprange=acfg.cliprange, agg_mode=acfg.loss_agg_mode)
                m = {f"policy/{k}": v for k, v in m.items()}
                m["policy/pg_loss"] = loss.detach()
                if acfg.kl_penalty == "loss":
                    kl_loss = agg_loss(self.kl_fn(logp, rows(exp.ref_logp)), mask, acfg.loss_agg_mode)
                    loss = loss + self.kl_ctl.value * kl_loss
                    m["policy/kl_loss"] = kl_loss.detach()
                if self.value_model is not None:
                    values = self._values(layout)
                    vf_loss, vm = value_loss(values, rows(exp.old_values), rows(exp.returns), mask,
                                             acfg.cliprange_value, acfg.loss_agg_mode)
                    loss = loss + acfg.vf_coef * vf_loss
                    m.update({"value/loss": vf_loss.detach(), **{f"value/{k}": v for k, v in vm.items()}})
                if ent is not None:
                    m["policy/entropy"] = masked_mean(ent.detach(), mask)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {float(loss)} at rollout step {self.rollout_step}", where="rl",
                                        fix="lower rl.optim.lr or algorithm.kl_coef, or set algorithm.reward_clip")
                opt.zero_grad()
                self.manual_backward(loss)
                if self.grad_clip:
                    self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                m["train/loss"] = loss.detach()
                for k, v in m.items():
                    stats.setdefault(k, []).append(v)
        # one conversion per metric, not one per metric and minibatch
        out = dict(zip(stats, torch.stack([torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in v]).mean()
                                           for v in stats.values()]).tolist()))
        if exp.old_values is not None:
            ev = float(explained_variance(exp.old_values, exp.returns, exp.mask))
            if math.isfinite(ev):  # undefined (NaN) when the returns have no variance
                out["value/explained_var"] = ev
        return out

    # ------------------------------------------------------------- logging
    def _log_completions(self, rollout: RolloutBatch, scores: torch.Tensor) -> None:
        every = self.rcfg.log_completions_every
        if not every or (self.rollout_step - 1) % every or not self.trainer.is_global_zero or self.work_dir is None:
            return
        k = min(self.rcfg.num_completions_logged, len(rollout))
        gold = self.gold_fn(rollout.prompts[:k], rollout.completions[:k]) if self.gold_fn else None
        rows = [{"step": self.rollout_step, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
                 "reward": float(scores[i]), **({"gold_reward": float(gold[i])} if gold is not None else {})}
                for i in range(k)]
        with open(self.work_dir / "completions.jsonl", "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                cols = list(rows[0])
                with contextlib.suppress(Exception):
                    logger.log_table(key="completions", columns=cols, data=[[r[c] for c in cols] for r in rows])
