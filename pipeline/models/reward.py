"""Reward models: a scalar head on a causal-LM or encoder backbone, K-member ensembles,
and :class:`RewardScorer`, the text-in / scores-out interface later stages use.

The reward model keeps its own tokenizer: scorers take *text* (prompt, completion),
so a policy with a different tokenizer can be scored (decode, re-tokenize).

Artifact layout (``reward`` stage)::

    model/member_0/   HF AutoModelForSequenceClassification + tokenizer (safetensors)
    model/member_1/   ... one directory per ensemble member
    reward_meta.json  {"members": [...], "offsets": [...], "max_length": N}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from pipeline.algorithms.reward_losses import aggregate
from pipeline.data.collate import tokenize_responses
from pipeline.models.loading import _hub_error, load_tokenizer

META = "reward_meta.json"


def load_sequence_classifier(name_or_path: str | Path, *, pad_token_id: int | None, trust_remote_code: bool = False,
                             key: str = "reward.model.name_or_path"):
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(name_or_path), num_labels=1, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(str(name_or_path), key, err) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    head = _score_head(model)
    if head is not None:  # N+ detail: head ~ N(0, 1/sqrt(d+1)), zero bias
        torch.nn.init.normal_(head.weight, std=1.0 / (head.weight.shape[1] + 1) ** 0.5)
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    return model


def build_sequence_classifier(mcfg, tokenizer):
    """A random-init sequence classifier (one label) of the built-in ``mcfg.arch`` sized for ``tokenizer``."""
    from pipeline.models.loading import build_causal_lm

    lm = build_causal_lm(mcfg, tokenizer)
    lm.config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(lm.config)


def classifier_source(init_from: str, *, policy_dir, model_cfg, corpus_fn, max_length: int, key: str):
    """How a stage trained on pairs builds its classifier backbone: ``(make, tokenizer, max_length)``.

    ``init_from="sft"``: from the SFT policy in ``policy_dir`` (its tokenizer; ``max_length`` is the
    policy's ``model.max_length``). ``init_from="model"``: ``model_cfg`` (the section's ``model``):
    a pretrained classifier / encoder (``name_or_path``) or a random-init built-in ``arch`` with a
    tokenizer trained on ``corpus_fn()``. ``make()`` returns a fresh model each call (ensembles)."""
    from pipeline.models.loading import resolve_tokenizer

    if init_from == "sft":
        tokenizer = load_tokenizer(str(policy_dir), key=f"{key}.init_from")
        return (lambda: load_sequence_classifier(policy_dir, pad_token_id=tokenizer.pad_token_id,
                                                 key=f"{key}.init_from")), tokenizer, max_length
    tokenizer = resolve_tokenizer(model_cfg, corpus_fn, key=f"{key}.model")
    if model_cfg.name_or_path:
        return (lambda: load_sequence_classifier(model_cfg.name_or_path, pad_token_id=tokenizer.pad_token_id,
                                                 trust_remote_code=model_cfg.trust_remote_code,
                                                 key=f"{key}.model.name_or_path")), tokenizer, model_cfg.max_length
    return (lambda: build_sequence_classifier(model_cfg, tokenizer)), tokenizer, model_cfg.max_length


def _score_head(model):
    for name in ("score", "classifier"):
        mod = getattr(model, name, None)
        if isinstance(mod, torch.nn.Linear):
            return mod
    return None


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: the reward is read at the last non-pad position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def member_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] scalar rewards from one member.

    Computed from the last non-pad position explicitly (HF heads locate it by
    searching pad ids, which breaks when pad == eos)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits
    if logits.dim() == 3:  # per-token scores from a causal classifier
        last = attention_mask.sum(1) - 1
        return logits[torch.arange(logits.shape[0]), last, 0]
    return logits[:, 0]


class RewardEnsemble(torch.nn.Module):
    def __init__(self, members: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        """[K, B]"""
        return torch.stack([member_scores(m, input_ids, attention_mask) for m in self.members])


class RewardScorer:
    """Scores text with a trained reward model artifact (ensemble aware)."""

    def __init__(self, ensemble: RewardEnsemble, tokenizer, offsets: Sequence[float], max_length: int,
                 aggregation: str = "mean", uwo_coef: float = 1.0):
        self.ensemble = ensemble.eval()
        self.tokenizer = tokenizer
        self.offsets = torch.tensor(list(offsets), dtype=torch.float32)
        self.max_length = max_length
        self.aggregation = aggregation
        self.uwo_coef = uwo_coef

    @classmethod
    def from_artifact(cls, art, aggregation: str = "mean", uwo_coef: float = 1.0) -> "RewardScorer":
        meta = json.loads((art.path / META).read_text())
        members = []
        for d in meta["members"]:
            m = AutoModelForSequenceClassification.from_pretrained(str(art.path / d))
            members.append(m)
        tokenizer = load_tokenizer(str(art.path / meta["members"][0]), key=f"artifact {art.path}")
        return cls(RewardEnsemble(members), tokenizer, meta["offsets"], meta["max_length"], aggregation, uwo_coef)

    @property
    def ensemble_size(self) -> int:
        return len(self.ensemble.members)

    @torch.no_grad()
    def member_scores(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[K, N] normalised scores of every member."""
        device = next(self.ensemble.parameters()).device
        out = []
        for i in range(0, len(prompts), batch_size):
            seqs, _ = tokenize_responses(prompts[i:i + batch_size], completions[i:i + batch_size], self.tokenizer,
                                         self.max_length, where="reward scoring", on_long_prompt="error")
            ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id)
            out.append(self.ensemble(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(out, dim=1) - self.offsets[:, None]

    def score(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """[N] aggregated reward (``mean`` | ``wco`` | ``uwo``)."""
        return aggregate(self.member_scores(prompts, completions, batch_size), self.aggregation,
                         uwo_coef=self.uwo_coef, key="reward aggregation")

    def to(self, device) -> "RewardScorer":
        self.ensemble.to(device)
        return self
