"""Offline preference optimisation: one LightningModule for every pairwise loss in
``PREFERENCE_LOSSES`` (DPO, IPO, cDPO/robust, hinge, SimPO, ORPO, f-DPO, RPO mixes, ...).

A step: ONE forward pass of the policy over the packed batch (:class:`pipeline.data.PreferenceCollator`:
each pair as ``prompt | chosen | rejected`` under a tree attention mask, several pairs per row, so
the prompt is computed once and there is almost no padding); the LM head runs only on the positions
that predict response tokens (:func:`pipeline.models.packing.token_logprobs`), summed per response
(:func:`response_logps`). The reference's sums come from the batch
(precomputed once, :func:`reference_logps`) or from one forward pass under ``torch.inference_mode``
(the reference model, or the policy itself with its LoRA adapters disabled); losses that never read
the reference (SimPO, ORPO, CPL, ``reference_free``) skip that pass. Then :func:`preference_loss`
mixes the configured losses.

Logged: ``train/loss``, TRL's ``rewards/{chosen,rejected,margins,accuracies}``,
``logps/{chosen,rejected}`` and ``loss/<term>`` per training step; the same on held-out
pairs as ``val/...`` (:func:`heldout_metrics`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor

from pipeline.algorithms.preference_losses import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    RunningMean,
    bco_batch_reward_mean,
    loss_terms,
    preference_loss,
)
from pipeline.models.packing import attention_mask_for, token_logprobs
from pipeline.models.policy import reference_of
from pipeline.modules.common import check_finite, configure_adamw

#: per-step state a loss declares in its ``runtime`` metadata -> the batch statistic whose
#: running mean (over training steps, all-reduced over ranks) is passed as that argument
RUNTIME_STATISTICS: dict[str, Callable[..., Tensor]] = {"bco_delta": bco_batch_reward_mean}


@dataclass(frozen=True)
class LossSpec:
    """A validated loss configuration (:func:`pipeline.algorithms.preference_losses.validate_loss_config`)."""

    types: tuple[str, ...]
    weights: tuple[float, ...]
    #: ``beta``, ``reference_free``, ``rpo_alpha`` and every option the chosen losses read
    options: Mapping[str, Any] = field(default_factory=dict)
    #: subtract the batch's per-pair margins inside the losses that take one
    use_margin: bool = False

    @property
    def names(self) -> list[str]:
        """The loss terms, with ``rpo_alpha`` expanded to ``sft``."""
        return [name for name, _ in loss_terms(list(self.types), list(self.weights), self.options)]

    @property
    def uses_reference(self) -> bool:
        """Does any term read reference log-probs (so a reference forward pass is needed)?"""
        if self.options.get("reference_free", False):
            return False
        return any(PREFERENCE_LOSSES.meta(n)["reference"] != "none" for n in self.names)

    @property
    def runtime(self) -> frozenset[str]:
        return frozenset().union(*(PREFERENCE_LOSSES.meta(n)["runtime"] for n in self.names))


def pair_logps(policy: Tensor, ref: Tensor | None, lengths: Tensor, margin: Tensor | None = None) -> PreferenceLogps:
    """A :class:`PreferenceLogps` from per-sequence sums over a concatenated batch ([2B]: chosen, then rejected)."""
    b = policy.shape[0] // 2
    lengths = lengths.to(policy.dtype)
    return PreferenceLogps(
        policy_chosen=policy[:b], policy_rejected=policy[b:],
        ref_chosen=None if ref is None else ref[:b], ref_rejected=None if ref is None else ref[b:],
        chosen_len=lengths[:b], rejected_len=lengths[b:], margin=margin,
    )


def response_logps(model, batch: dict) -> Tensor:
    """[2B] summed log-probs of the responses of a packed batch (chosen 0..B-1, rejected B..2B-1)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": attention_mask_for(model, batch["attention_mask"]),
              "position_ids": batch["position_ids"]}
    lp, _ = token_logprobs(model, inputs, batch["src_row"], batch["src_col"], batch["targets"])
    return lp.new_zeros(batch["lengths"].shape[0]).index_add(0, batch["seq_index"], lp)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def reference_logps(rows: Sequence[dict], policy, ref_model, collate, batch_size: int) -> Tensor:
    """[N, 2] summed reference log-probs (chosen, rejected) of tokenized pairs, in row order.

    The reference is ``ref_model``, or ``policy`` with its LoRA adapters disabled when it is None.
    Rows are batched by length (less padding) and put back in order."""
    out = torch.empty(len(rows), 2)
    with reference_of(policy, ref_model) as model:
        device = _device(model)
        was_training = model.training
        model.eval()
        order = sorted(range(len(rows)), key=lambda i: sum(len(rows[i][k]) for k in ("prompt_ids", "chosen_ids",
                                                                                     "rejected_ids")))
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                lp = response_logps(model, _to(collate([rows[i] for i in idx]), device)).float().cpu()
                out[idx] = torch.stack([lp[:len(idx)], lp[len(idx):]], dim=1)
        finally:
            model.train(was_training)
    return out


class DPOModule(L.LightningModule):
    """``policy`` is trained; ``ref_model`` is the frozen reference (None: the policy with its LoRA
    adapters disabled, or no reference at all when the losses never read one / the batch carries
    precomputed ``ref_logps``)."""

    def __init__(self, policy, spec: LossSpec, optim_cfg, *, ref_model=None):
        super().__init__()
        self.policy = policy.train()  # from_pretrained returns eval mode
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.spec = spec
        self.optim_cfg = optim_cfg
        self.running = {name: RunningMean() for name in spec.runtime}

    # ------------------------------------------------------------------ log-probs
    def logps(self, batch: dict) -> PreferenceLogps:
        """Summed response log-probs of policy (with gradient) and reference for one concatenated batch."""
        policy = response_logps(self.policy, batch)
        ref = batch.get("ref_logps")
        if ref is None and self.spec.uses_reference:
            with torch.inference_mode(), reference_of(self.policy, self.ref_model) as model:
                ref = response_logps(model, batch)
            ref = ref.clone()  # a normal tensor: inference tensors cannot enter autograd
        return pair_logps(policy, ref, batch["lengths"], batch["margin"] if self.spec.use_margin else None)

    def _runtime(self, logps: PreferenceLogps, update: bool) -> dict[str, float]:
        out = {}
        for name, running in self.running.items():
            if update:
                value = RUNTIME_STATISTICS[name](logps, beta=self.spec.options["beta"])
                world = self.trainer.world_size if self._trainer is not None else 1
                if world > 1:
                    value = self.trainer.strategy.reduce(value, reduce_op="mean")
                running.update(value, count=world)
            out[name] = running.mean
        return out

    def loss(self, logps: PreferenceLogps, update: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        return preference_loss(logps, list(self.spec.types), list(self.spec.weights), self.spec.options,
                               runtime=self._runtime(logps, update))

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch, batch_idx):
        logps = self.logps(batch)
        loss, metrics = self.loss(logps, update=True)
        check_finite(loss, step=self.global_step, key="dpo")
        b = logps.policy_chosen.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict(metrics, batch_size=b)
        return loss

    def validation_step(self, batch, batch_idx):
        logps = self.logps(batch)
        loss, metrics = self.loss(logps)
        b = logps.policy_chosen.shape[0]
        self.log("val/loss", loss, sync_dist=True, batch_size=b)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=b)

    def configure_optimizers(self):
        return configure_adamw(self, [p for p in self.policy.parameters() if p.requires_grad], self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["preference_runtime"] = {n: r.state_dict() for n, r in self.running.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for n, state in checkpoint.get("preference_runtime", {}).items():
            if n in self.running:
                self.running[n].load_state_dict(state)


@torch.inference_mode()
def heldout_metrics(module: DPOModule, loader) -> dict[str, float]:
    """``val/loss`` and ``val/<TRL metric>`` of the current weights over every held-out pair at once.

    Computed after fit (like the SFT and reward stages' held-out numbers): Lightning validates only
    at epoch ends, so a ``max_steps`` run stopped mid-epoch would report nothing."""
    device = _device(module.policy)
    was_training = module.policy.training
    module.policy.eval()
    parts: dict[str, list[Tensor]] = {"policy": [], "ref": [], "lengths": [], "margin": []}
    try:
        for batch in loader:
            lp = module.logps(_to(batch, device))
            parts["policy"].append(torch.stack([lp.policy_chosen, lp.policy_rejected]))
            if lp.ref_chosen is not None:
                parts["ref"].append(torch.stack([lp.ref_chosen, lp.ref_rejected]))
            parts["lengths"].append(torch.stack([lp.chosen_len, lp.rejected_len]))
            if lp.margin is not None:
                parts["margin"].append(lp.margin)
    finally:
        module.policy.train(was_training)
    if not parts["policy"]:
        return {}
    cat = {k: torch.cat(v, dim=-1) if v else None for k, v in parts.items()}
    logps = PreferenceLogps(
        policy_chosen=cat["policy"][0], policy_rejected=cat["policy"][1],
        ref_chosen=None if cat["ref"] is None else cat["ref"][0],
        ref_rejected=None if cat["ref"] is None else cat["ref"][1],
        chosen_len=cat["lengths"][0], rejected_len=cat["lengths"][1], margin=cat["margin"],
    )
    loss, metrics = module.loss(logps)
    out = {"val/loss": float(loss)}
    out.update({f"val/{k}": float(v) for k, v in metrics.items()})
    out["val/pairs"] = int(logps.policy_chosen.shape[0])
    return out
