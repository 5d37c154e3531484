"""Model and tokenizer construction / loading with clear errors.

``model.name_or_path`` takes a Hugging Face Hub id or a local directory. When it is
null a tiny random-init ``arch`` (gpt2 / llama) is built with the tokenizer trained on
the task corpus. Weights load from safetensors; ``trust_remote_code`` is off unless set.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.errors import ConfigError

BUILTIN_ARCHS = ("gpt2", "llama")


def _hub_error(name: str, key: str, err: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not Path(name).exists() and ("/" in name or not name.startswith((".", "/"))):
        why = "the Hugging Face Hub is unreachable (HF_HUB_OFFLINE=1)" if offline else f"it could not be fetched ({type(err).__name__})"
        return ConfigError(
            f"{name!r} is not a local directory and {why}",
            where=key,
            fix="pass a local directory with config.json + weights, or download it first on a machine with internet access",
        )
    return ConfigError(f"cannot load {name!r}: {err}", where=key, fix="check that the directory holds a Hugging Face model")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, key: str = "model.tokenizer") -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(name_or_path, key, err) from None
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok: PreTrainedTokenizerBase, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Make sure pad/eos exist (pad falls back to eos) and install a chat template."""
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = chat_template
    return tok


def resolve_tokenizer(model_cfg, corpus_fn, key: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer for a model config: explicit ``tokenizer``, the pretrained model's,
    or a BPE trained on ``corpus_fn()`` for built-in random-init models.

    ``key`` is the config section of ``model_cfg`` (``reward.model``...), named in errors."""
    from pipeline.models.tokenizer import train_tokenizer

    if model_cfg.tokenizer:
        tok = load_tokenizer(model_cfg.tokenizer, trust_remote_code=model_cfg.trust_remote_code, key=f"{key}.tokenizer")
    elif model_cfg.name_or_path:
        tok = load_tokenizer(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code,
                             key=f"{key}.name_or_path")
    else:
        tok = train_tokenizer(corpus_fn(), vocab_size=model_cfg.vocab_size)
    return prepare_tokenizer(tok, model_cfg.chat_template)


def build_causal_lm(model_cfg, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A random-init causal LM of ``model_cfg.arch`` sized for ``tokenizer``."""
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if model_cfg.arch == "gpt2":
        config = GPT2Config(
            n_layer=model_cfg.n_layer, n_embd=model_cfg.n_embd, n_head=model_cfg.n_head,
            n_positions=max(128, model_cfg.max_length), resid_pdrop=model_cfg.dropout,
            activation_function="gelu_pytorch_tanh",
            embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout, **common,
        )
        return GPT2LMHeadModel(config)
    if model_cfg.arch == "llama":
        config = LlamaConfig(
            hidden_size=model_cfg.n_embd, intermediate_size=int(model_cfg.n_embd * 8 / 3) // 8 * 8,
            num_hidden_layers=model_cfg.n_layer, num_attention_heads=model_cfg.n_head,
            num_key_value_heads=max(1, model_cfg.n_head // 2), max_position_embeddings=max(128, model_cfg.max_length),
            attention_dropout=model_cfg.dropout, tie_word_embeddings=True, **common,
        )
        return LlamaForCausalLM(config)
    raise ConfigError(f"unknown built-in architecture {model_cfg.arch!r}; choose one of {', '.join(BUILTIN_ARCHS)}",
                      where="model.arch", fix="or set model.name_or_path to a pretrained model")


def load_causal_lm(name_or_path: str | Path, *, trust_remote_code: bool = False, key: str = "model.name_or_path",
                   dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from a hub id or local directory (safetensors preferred)."""
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        fuse_activation(config)
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), config=config,
                                                    trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _hub_error(str(name_or_path), key, err) from None


#: the same function, one fused kernel instead of a Python composition of five ops
_FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def fuse_activation(config) -> None:
    """Use torch's fused tanh-GELU where the config names the (numerically equal, up to
    float rounding) Python ``gelu_new``: one kernel instead of five elementwise ops."""
    for attr in ("activation_function", "hidden_act"):
        name = getattr(config, attr, None)
        if isinstance(name, str) and name in _FUSED_ACTIVATIONS:
            setattr(config, attr, _FUSED_ACTIVATIONS[name])


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path) -> None:
    """Save in HF format with safetensors (LoRA adapters are merged first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
