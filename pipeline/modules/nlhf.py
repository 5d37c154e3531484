"""Online preference optimisation as one LightningModule (manual optimisation): Nash-MD,
Nash-MP, online IPO, EGPO, INPO and online / iterative DPO share this loop.

Each ``training_step`` is one iteration on a batch of prompts, readable top to bottom:

1. **Round start** (every ``nlhf.steps_per_round`` iterations): π_t, the round's frozen starting
   policy, is set to the current policy (it samples INPO's pairs and online DPO's candidates and
   is INPO's previous iterate); every ``nlhf.ref_update_every`` rounds the KL reference becomes the
   current policy too (iterative DPO with π_t as reference: DNO). ``steps_per_round=1`` is fully
   online; ``ref_update_every=0`` keeps the input policy as the reference.
2. **Objective** (``algorithm.loss``, :mod:`pipeline.modules.online_objectives`): samples from
   the policy and its opponent through the rollout engine -> P(y ≻ y') from the judge -> a
   registered loss.
3. **Update operator** (``algorithm.update_rule``): ``plain`` takes one optimizer step against the
   current policy; ``extragradient`` saves θ_t (weights and optimizer state), takes
   ``inner_steps`` steps against θ_t to reach θ_{t+½}, freezes it, restores θ_t and takes
   ``inner_steps`` steps against θ_{t+½} (Nash-MP's mirror prox with the anchor π_k = θ_t; EGPO on
   the online IPO loss).

Frozen copies are made only where an objective needs one (``models`` metadata): the reference
(or, with LoRA and a fixed reference, the adapters-off policy), π_t when ``steps_per_round > 1``,
θ_t and θ_{t+½} for extragradient.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch import Tensor

from pipeline.errors import TrainingError
from pipeline.modules.common import OnlineLogging
from pipeline.modules.online_objectives import ONLINE_OBJECTIVES
from pipeline.modules.schedule import NLHF_SCHEDULABLE, parse_schedule, set_learning_rates
from pipeline.rollout.engine import HFRolloutEngine, RolloutBatch, SamplingParams, reference_logprobs, sequence_logprobs
from pipeline.scoring import Judge, round_robin_scores


def frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


class OnlinePreferenceModule(OnlineLogging, L.LightningModule):
    def __init__(self, policy, tokenizer, judge: Judge, acfg, ncfg, *, ref_policy=None, loss_options: dict | None = None,
                 evaluate_fn: Callable | None = None, work_dir: Path | None = None,
                 grad_clip: float | None = 1.0, seed: int = 0, max_prompt_length: int | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy.train()
        self.tokenizer = tokenizer
        self.judge, self.evaluate_fn = judge, evaluate_fn
        # the module's own copies: a schedule (nlhf.schedule) changes them between iterations
        self.acfg, self.ncfg = copy.deepcopy(acfg), copy.deepcopy(ncfg)
        self.loss_options = dict(loss_options or {})
        #: iteration -> {schedulable key: value} taking effect at the start of that iteration
        self.schedule: dict[int, dict] = dict(parse_schedule(ncfg.schedule, ncfg.rounds * ncfg.steps_per_round,
                                                             "nlhf.schedule", NLHF_SCHEDULABLE))
        self.work_dir = Path(work_dir) if work_dir else None
        self.grad_clip, self.seed = grad_clip, seed
        self.objective = ONLINE_OBJECTIVES.get(acfg.loss, key="algorithm.loss")
        meta = ONLINE_OBJECTIVES.meta(acfg.loss)
        needs = meta["models"]
        self.engine = HFRolloutEngine(self.policy, tokenizer, add_special_tokens=False,
                                    max_prompt_length=max_prompt_length)
        self.sampling = SamplingParams(max_new_tokens=acfg.max_new_tokens, temperature=acfg.temperature,
                                       top_p=acfg.top_p, top_k=acfg.top_k, n=acfg.num_generations)
        # the KL reference: a frozen copy, or (LoRA, never updated, never sampled from) the policy
        # with its adapters disabled
        lora_ref = ref_policy is None and ncfg.ref_update_every == 0 and "reference_sampler" not in needs
        self.reference = None if lora_ref else (ref_policy if ref_policy is not None else frozen_copy(policy))
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        # π_t: a frozen copy when it must stay fixed over several iterations, else the policy itself
        round_start = meta["samples_from"] == "round_start" or "previous" in needs
        self.previous = frozen_copy(policy) if round_start and ncfg.steps_per_round > 1 else self.policy
        self.extragradient = acfg.update_rule == "extragradient"
        self.anchor = frozen_copy(policy) if self.extragradient else None
        self.half_step = frozen_copy(policy) if self.extragradient else None
        self._generator: torch.Generator | None = None
        #: iterations done (Lightning's global_step counts optimizer steps)
        self.rollout_step = 0
        #: the module's part of a checkpoint being resumed from (applied in ``on_fit_start``)
        self._resumed: dict | None = None
        #: the latest held-out evaluation, ``{"step": s, "eval/gold_reward": ..}`` (rank 0)
        self.last_eval: dict | None = None

    # ------------------------------------------------------------------ setup
    def configure_optimizers(self):
        from pipeline.modules.common import configure_adamw

        return configure_adamw(self, [{"params": [p for p in self.policy.parameters() if p.requires_grad]}],
                               self.ncfg.optim)

    def on_fit_start(self):
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed * 1009 + self.global_rank)
        resumed, self._resumed = self._resumed, None
        if resumed is not None:  # a mid-stage checkpoint (pipeline.resume): continue its streams
            self._generator.set_state(resumed["generator"])
            if self.evaluate_fn is not None and resumed.get("baseline") is not None:
                self.evaluate_fn.baseline = list(resumed["baseline"])  # sampled from the input policy
            for step in sorted(self.schedule):  # the settings in effect (the optimizer already holds their lr)
                if step < self.rollout_step:
                    self.apply_hyperparameters(self.schedule[step], state=False)
            return
        if self.evaluate_fn is not None and self.ncfg.eval_every > 0:
            if hasattr(self.evaluate_fn, "set_baseline") and self.trainer.is_global_zero:
                self.evaluate_fn.set_baseline(self.policy)
            self._evaluate(step=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Beyond weights (frozen references and round-start policy included) and optimizer: the
        iteration, the sampling generator and the evaluation's baseline samples."""
        checkpoint["online_preference"] = {"rollout_step": self.rollout_step,
                                           "generator": self._generator.get_state().cpu(),
                                           "baseline": getattr(self.evaluate_fn, "baseline", None)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["online_preference"]
        self.rollout_step = int(state["rollout_step"])
        self._resumed = state

    def on_fit_end(self):
        if self.evaluate_fn is not None and self.ncfg.eval_every > 0 and self.rollout_step % self.ncfg.eval_every:
            self._evaluate(step=self.rollout_step)

    # ----------------------------------------------------- the context objectives use
    @property
    def reference_sampler(self):
        return self.reference

    def sample(self, model, prompts: list[str], *, mixture=None, alpha: float = 0.0) -> RolloutBatch:
        engine = self.engine if model is self.policy else self.engine.with_model(model)
        return engine.generate(prompts, self.sampling, generator=self._generator, mixture_model=mixture,
                               mixture_alpha=alpha).trim()

    def logp(self, batch: RolloutBatch) -> Tensor:
        """[N] log π(y) summed over response tokens, with gradient."""
        return sequence_logprobs(self.policy, batch.input_ids, batch.attention_mask, batch.response_start).sum(1)

    @torch.no_grad()
    def frozen_logp(self, model, batch: RolloutBatch) -> Tensor:
        return sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_start).sum(1)

    @torch.no_grad()
    def ref_logp(self, batch: RolloutBatch) -> Tensor:
        return reference_logprobs(self.policy, self.reference, batch.input_ids, batch.attention_mask,
                                  batch.response_start).sum(1)

    def preference(self, a: RolloutBatch, b: RolloutBatch, ia: Tensor | None = None, ib: Tensor | None = None) -> Tensor:
        """[M] P(a[ia] ≻ b[ib]) from the judge (rows aligned when no indices are given); with
        ``missing_eos_penalty`` the logit loses the penalty for a response without EOS."""
        ia = torch.arange(len(a)) if ia is None else ia
        ib = torch.arange(len(b)) if ib is None else ib
        prompts = [a.prompts[i] for i in ia.tolist()]
        p = self.judge.preference(prompts, [a.completions[i] for i in ia.tolist()],
                                  [b.completions[i] for i in ib.tolist()]).to(self.device).float()
        pen = self.acfg.missing_eos_penalty
        if pen:
            missing = lambda batch, idx: (~batch.has_eos[idx.to(batch.has_eos.device)]).float().to(self.device)
            logit = torch.logit(p.clamp(1e-6, 1 - 1e-6)) - pen * missing(a, ia) + pen * missing(b, ib)
            p = torch.sigmoid(logit)
        return p

    def rank(self, batch: RolloutBatch) -> Tensor:
        """[N] scores ranking each response among the ``num_generations`` of its prompt: the judge's
        reward (minus ``missing_eos_penalty`` without EOS) or its round-robin win rate."""
        scores = self.judge.rewards(batch.prompts, batch.completions)
        if scores is None:
            pair = lambda ia, ib: self.preference(batch, batch, ia, ib)
            return round_robin_scores(pair, len(batch), self.acfg.num_generations).to(self.device)
        scores = scores.to(self.device).float()
        pen = self.acfg.missing_eos_penalty
        return scores - pen * (~batch.has_eos).float().to(self.device) if pen else scores

    def stats(self, batch: RolloutBatch) -> dict:
        return {"rollout/response_length": batch.response_lengths.float().mean(),
                "rollout/eos_rate": batch.has_eos.float().mean()}

    # --------------------------------------------------------------- the step
    def apply_hyperparameters(self, values: dict, state: bool = True) -> None:
        """Set schedulable hyperparameters (``{"algorithm.beta": 0.05, ...}``, see
        :mod:`pipeline.modules.schedule`) from now on; ``state=True`` also pushes a new learning
        rate into the optimizer and its LR schedule (a resumed run restores those instead)."""
        for key, value in values.items():
            section, name = key.split(".", 1)
            if section == "nlhf":  # nlhf.optim.lr
                self.ncfg.optim.lr = value
                continue
            self.acfg[name] = value
            if name in self.loss_options:
                self.loss_options[name] = value
        self.sampling = self.sampling.replace(temperature=self.acfg.temperature, top_p=self.acfg.top_p,
                                              top_k=self.acfg.top_k)
        if state and "nlhf.optim.lr" in values:
            set_learning_rates(self.optimizers(), self.lr_schedulers(), [self.ncfg.optim.lr])

    def training_step(self, rows: list[dict], batch_idx: int):
        t0 = time.perf_counter()
        if self.rollout_step in self.schedule:
            self.apply_hyperparameters(self.schedule[self.rollout_step])
        self._round_start()
        prompts = [r["prompt"] for r in rows]
        stats: dict[str, list[float]] = {}
        self._iteration(self.optimizers(), prompts, stats)
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        metrics = {k: sum(v) / len(v) for k, v in stats.items()}
        metrics["perf/step_time_s"] = time.perf_counter() - t0
        metrics["train/round"] = float(self.rollout_step // self.ncfg.steps_per_round)
        self.rollout_step += 1
        self._log(metrics)
        if self.evaluate_fn is not None and self.ncfg.eval_every > 0 and self.rollout_step % self.ncfg.eval_every == 0:
            self._evaluate(step=self.rollout_step)

    def _iteration(self, opt, prompts: list[str], stats: dict) -> None:
        """One iteration of the update operator (``opt``: a Lightning-wrapped optimizer)."""
        if not self.extragradient:
            self._step(opt, prompts, self.policy, stats)
            return
        self.anchor.load_state_dict(self.policy.state_dict())
        saved = copy.deepcopy(opt.optimizer.state_dict())
        for _ in range(self.acfg.inner_steps):
            self._step(opt, prompts, self.anchor, stats)
        self.half_step.load_state_dict(self.policy.state_dict())
        self.policy.load_state_dict(self.anchor.state_dict())
        opt.optimizer.load_state_dict(saved)
        for _ in range(self.acfg.inner_steps):
            self._step(opt, prompts, self.half_step, stats)

    def _round_start(self) -> None:
        k = self.ncfg.steps_per_round
        if self.rollout_step % k:
            return
        rnd = self.rollout_step // k
        every = self.ncfg.ref_update_every
        if rnd > 0 and every and rnd % every == 0:
            self.reference.load_state_dict(self.policy.state_dict())
        if self.previous is not self.policy:
            self.previous.load_state_dict(self.policy.state_dict())

    def _step(self, opt, prompts: list[str], opponent, stats: dict) -> None:
        t0 = time.perf_counter()
        loss, m = self.objective(self, prompts, opponent)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {float(loss)} at iteration {self.rollout_step}", where="nlhf",
                                fix="lower nlhf.optim.lr or raise algorithm.beta")
        t_loss = time.perf_counter() - t0
        opt.zero_grad()
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        m = {**m, "train/loss": loss.detach(), "perf/sample_and_judge_time_s": t_loss,
             "perf/update_time_s": time.perf_counter() - t0 - t_loss}
        for k, v in m.items():
            stats.setdefault(k, []).append(float(v))

    # ------------------------------------------------------------- logging
