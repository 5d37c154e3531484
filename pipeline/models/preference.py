"""Pairwise preference models: P(a ≻ b | x) read from both responses at once.

A Bradley-Terry reward model scores each response alone, so its preferences are always
transitive. A pairwise model reads ``prompt + a + [eos] + b + [eos]`` (see
:func:`pipeline.data.tokenize_comparisons`) with a sequence-classification backbone that
gives a score s(x, a, b) at the last token, and is **antisymmetric by construction**::

    z(x, a, b) = s(x, a, b) − s(x, b, a),     P(a ≻ b | x) = σ(z)

so P(a ≻ b) + P(b ≻ a) = 1 exactly (floating-point subtraction is anti-commutative), the
order responses are shown in cannot bias it, and it can represent cyclic preferences.

Artifact layout (``preference_model`` stage)::

    model/                  HF AutoModelForSequenceClassification + tokenizer (safetensors)
    preference_meta.json    {"max_length": N}
"""
from __future__ import annotations

import json
from typing import Sequence

import torch
from transformers import AutoModelForSequenceClassification

from pipeline.data.collate import tokenize_comparisons
from pipeline.models.loading import load_tokenizer
from pipeline.models.reward import member_scores, pad_batch

META = "preference_meta.json"


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] score at the last non-pad position (right padding), read from the attention mask.

    Decoder classifiers (a ``score`` head) are run as backbone + head so that the position is
    taken from the mask, not by searching pad ids (wrong when pad == eos: the comparison format
    holds an eos in the middle); other models go through :func:`member_scores`."""
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear) and hasattr(model, "base_model") and model.base_model is not model:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1
        return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0]
    return member_scores(model, input_ids, attention_mask)


class PreferenceModel(torch.nn.Module):
    """Antisymmetric pairwise preference model around a sequence classifier ``backbone``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, ab_ids, ab_mask, ba_ids, ba_mask) -> torch.Tensor:
        """[B] preference logits z(a, b) = s(a, b) − s(b, a) (one forward pass over both orders)."""
        width = max(ab_ids.shape[1], ba_ids.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
        s = last_token_scores(self.backbone, torch.cat([pad(ab_ids), pad(ba_ids)]), torch.cat([pad(ab_mask), pad(ba_mask)]))
        n = ab_ids.shape[0]
        return s[:n] - s[n:]


class PreferenceScorer:
    """Text in, P(a ≻ b | x) out, with the model's own tokenizer (like :class:`RewardScorer`)."""

    def __init__(self, model: PreferenceModel, tokenizer, max_length: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_artifact(cls, art) -> "PreferenceScorer":
        meta = json.loads((art.path / META).read_text())
        backbone = AutoModelForSequenceClassification.from_pretrained(str(art.model_dir))
        tokenizer = load_tokenizer(str(art.model_dir), key=f"artifact {art.path}")
        return cls(PreferenceModel(backbone), tokenizer, int(meta["max_length"]))

    @torch.no_grad()
    def logits(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[N] preference logits z(a, b) (float32, CPU)."""
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        out = []
        for i in range(0, len(prompts), batch_size):
            ab, ba = tokenize_comparisons(prompts[i:i + batch_size], a[i:i + batch_size], b[i:i + batch_size],
                                          self.tokenizer, self.max_length, where="preference scoring")
            ab_ids, ab_mask = pad_batch(ab, pad_id)
            ba_ids, ba_mask = pad_batch(ba, pad_id)
            out.append(self.model(ab_ids.to(device), ab_mask.to(device), ba_ids.to(device), ba_mask.to(device))
                       .float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def preference(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[N] P(a_i ≻ b_i | prompt_i)."""
        return torch.sigmoid(self.logits(list(prompts), list(a), list(b), batch_size))

    def to(self, device) -> "PreferenceScorer":
        self.model.to(device)
        return self

