"""Pairwise preference model training: logistic loss on P(chosen ≻ rejected) = σ(z).

Batches come from :class:`pipeline.data.PairCollator` over :func:`pipeline.data.tokenize_comparisons`
rows: ``chosen_input_ids`` holds the comparison with the chosen response first, ``rejected_input_ids``
the same comparison in the other order. The model is antisymmetric by construction, so training
on one order also trains the other (symmetrised training would add nothing).
"""
from __future__ import annotations

import lightning as L
import torch

from pipeline.algorithms.preference_losses import logistic_nll
from pipeline.modules.common import check_finite, configure_adamw


class PreferenceModule(L.LightningModule):
    def __init__(self, model, optim_cfg):
        super().__init__()
        self.model = model.train()
        self.optim_cfg = optim_cfg

    def logits(self, batch) -> torch.Tensor:
        """[B] z(chosen, rejected)."""
        return self.model(batch["chosen_input_ids"], batch["chosen_attention_mask"],
                          batch["rejected_input_ids"], batch["rejected_attention_mask"])

    def training_step(self, batch, batch_idx):
        z = self.logits(batch)
        loss = logistic_nll(z, label_smoothing=0.0).mean()
        check_finite(loss, step=self.global_step, key="preference_model")
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self.log("train/accuracy", (z > 0).float().mean(), batch_size=z.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        z = self.logits(batch)
        self.log("val/loss", logistic_nll(z, label_smoothing=0.0).mean(), sync_dist=True, batch_size=z.shape[0])
        self.log("val/accuracy", (z > 0).float().mean(), prog_bar=True, sync_dist=True, batch_size=z.shape[0])

    def configure_optimizers(self):
        return configure_adamw(self, [p for p in self.model.parameters() if p.requires_grad], self.optim_cfg)
