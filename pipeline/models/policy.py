"""Policy models: base (built-in or pretrained), LoRA, and from upstream artifacts."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from pipeline.models.loading import (
    build_causal_lm,
    load_causal_lm,
    load_tokenizer,
    resolve_tokenizer,
)


def base_policy(model_cfg, corpus_fn: Callable[[], list[str]], tokenizer=None):
    """(model, tokenizer) from ``model_cfg``: pretrained when ``name_or_path`` is set,
    else a random-init ``arch`` with a tokenizer trained on ``corpus_fn()`` (or ``tokenizer``,
    already resolved that way)."""
    tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(model_cfg, corpus_fn)
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
    """Set every dropout probability to 0 (TRL's ``disable_dropout``: log-probs of the policy and
    its reference must not be noisy); returns ``model``."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@contextmanager
def reference_of(policy, ref_model=None) -> Iterator:
    """The reference model to score with: ``ref_model``, or, when it is None, ``policy`` itself with
    its LoRA adapters disabled (the PEFT reference: no second copy of the weights)."""
    if ref_model is not None:
        yield ref_model
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model given and the policy has no LoRA adapters to disable")
    with policy.disable_adapter():
        yield policy


#: config attributes under which a model transforms its logits after the LM head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling",
                     "lm_head_multiplier")


def causal_lm_parts(model):
    """(backbone, lm_head) of a Hugging Face causal LM (also inside a PEFT wrapper), so the head can
    run on selected positions only; None when the model's logits are not ``lm_head(backbone(x))``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, "base_model", None)
    if head is None or backbone is None or backbone is base:
        return None
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    return backbone, head


def policy_from_artifact(art):
    """(model, tokenizer) saved by an upstream stage."""
    model = load_causal_lm(art.model_dir, key=f"artifact {art.path}")
    tokenizer = load_tokenizer(str(art.model_dir), key=f"artifact {art.path}")
    return model, tokenizer


def trainable_policy(art, lora_cfg):
    """``(policy, tokenizer, reference)`` for an online stage starting from a policy artifact:
    dropout off (sampling and training log-probs must match); with LoRA the policy gets adapters
    and the reference is None (the same model with its adapters disabled), else the reference is
    a second, frozen copy of the starting policy."""
    policy, tokenizer = policy_from_artifact(art)
    disable_dropout(policy)
    if lora_cfg.enabled:
        return apply_lora(policy, lora_cfg), tokenizer, None
    return policy, tokenizer, policy_from_artifact(art)[0]
