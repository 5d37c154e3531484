"""Reward modelling: Bradley-Terry loss on (chosen, rejected) pairs, K-member ensembles.

Ensemble members share the batch but each weighs examples by its own Poisson(1)
bootstrap weights (online bootstrap), so members differ by data as well as head init.
"""
from __future__ import annotations

import lightning as L
import torch

from pipeline.algorithms.reward_losses import bradley_terry_loss
from pipeline.modules.common import check_finite, configure_adamw


def bootstrap_weights(index: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Deterministic Poisson(1) weight of example ``index`` for member ``k`` (1 for K=1)."""
    if k < 0:
        return torch.ones_like(index, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed * 1000003 + k)
    table = torch.poisson(torch.ones(int(index.max()) + 1), generator=g)
    return table[index.cpu()].to(index.device)


class RewardModule(L.LightningModule):
    def __init__(self, ensemble, optim_cfg, *, center_coef: float = 0.0, use_margin: bool = True, seed: int = 0):
        super().__init__()
        self.ensemble = ensemble.train()
        self.optim_cfg = optim_cfg
        self.center_coef = center_coef
        self.use_margin = use_margin
        self.seed = seed

    def _scores(self, batch):
        """Member scores for chosen and rejected: two [K, B] tensors (one forward pass)."""
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        scores = self.ensemble(ids, mask)
        b = batch["chosen_input_ids"].shape[0]
        return scores[:, :b], scores[:, b:]

    def training_step(self, batch, batch_idx):
        r_c, r_r = self._scores(batch)
        margin = batch["margin"] if self.use_margin else None
        k_members = r_c.shape[0]
        losses = []
        for k in range(k_members):
            w = bootstrap_weights(batch["index"], k if k_members > 1 else -1, self.seed)
            losses.append(bradley_terry_loss(r_c[k], r_r[k], margin, self.center_coef, weights=w))
        loss = torch.stack(losses).mean()
        check_finite(loss, step=self.global_step, key="reward")
        bs = r_c.shape[1]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/accuracy", (r_c.mean(0) > r_r.mean(0)).float().mean(), batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        r_c, r_r = self._scores(batch)
        bs = r_c.shape[1]
        self.log("val/loss", bradley_terry_loss(r_c.mean(0), r_r.mean(0)), sync_dist=True, batch_size=bs)
        self.log("val/accuracy", (r_c.mean(0) > r_r.mean(0)).float().mean(), prog_bar=True, sync_dist=True,
                 batch_size=bs)

    def configure_optimizers(self):
        return configure_adamw(self, [p for p in self.ensemble.parameters() if p.requires_grad], self.optim_cfg)
