"""Supervised fine-tuning: next-token cross-entropy on completion tokens."""
from __future__ import annotations

import lightning as L
import torch

from pipeline.modules.common import check_finite, configure_adamw


class SFTModule(L.LightningModule):
    def __init__(self, model, optim_cfg):
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode
        self.optim_cfg = optim_cfg

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    def training_step(self, batch, batch_idx):
        loss = self(batch)
        check_finite(loss, step=self.global_step, key="sft")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        return configure_adamw(self, [p for p in self.model.parameters() if p.requires_grad], self.optim_cfg)


@torch.no_grad()
def heldout_nll(model, loader) -> float:
    """Token-weighted mean negative log-likelihood of the labelled tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        total += float((nll * mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)
