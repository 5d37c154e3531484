"""Policy models: base (built-in or pretrained), LoRA, and from upstream artifacts."""
from __future__ import annotations

from typing import Callable

from pipeline.models.loading import (
    build_causal_lm,
    load_causal_lm,
    load_tokenizer,
    resolve_tokenizer,
)


def base_policy(model_cfg, corpus_fn: Callable[[], list[str]]):
    """(model, tokenizer) from ``model_cfg``: pretrained when ``name_or_path`` is set,
    else a random-init ``arch`` with a tokenizer trained on ``corpus_fn()``."""
    tokenizer = resolve_tokenizer(model_cfg, corpus_fn)
    if model_cfg.name_or_path:
        model = load_causal_lm(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = build_causal_lm(model_cfg, tokenizer)
    return model, tokenizer


def apply_lora(model, lora_cfg):
    """Wrap ``model`` with peft LoRA adapters when enabled (reference = adapters off)."""
    if not lora_cfg.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    target = list(lora_cfg.target_modules) if lora_cfg.target_modules else None
    if target is None and getattr(model.config, "model_type", "") == "gpt2":
        target = ["c_attn", "c_proj"]
    cfg = LoraConfig(task_type="CAUSAL_LM", r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                     lora_dropout=lora_cfg.dropout, target_modules=target)
    return get_peft_model(model, cfg)


def disable_dropout(model):
    """Set every dropout probability to 0 (online RL: log-probs must match between sampling and training)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def policy_from_artifact(art):
    """(model, tokenizer) saved by an upstream stage."""
    model = load_causal_lm(art.model_dir, key=f"artifact {art.path}")
    tokenizer = load_tokenizer(str(art.model_dir), key=f"artifact {art.path}")
    return model, tokenizer
