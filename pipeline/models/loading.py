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


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.path.exists(os.path.expanduser(name))


def check_local(name: str | Path, key: str, *, needs: str = "config.json") -> None:
    """For a local path: a clear error when it does not exist or is not a model directory
    (instead of a hub error or a tokenizer backend's complaint)."""
    name = str(name)
    if not _looks_local(name):
        return
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise ConfigError(f"not found: {path} (a local path that does not exist)", where=key,
                          fix="check the path; relative paths are resolved from the working directory")
    if path.is_dir() and needs and not (path / needs).is_file():
        have = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ConfigError(f"{path} is not a Hugging Face model directory: it has no {needs} (it holds: {have})",
                          where=key, fix="point it at a directory saved with save_pretrained (config.json + weights)")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, key: str = "model.tokenizer") -> PreTrainedTokenizerBase:
    check_local(name_or_path, key, needs="")
    if _looks_local(str(name_or_path)) and Path(os.path.expanduser(str(name_or_path))).is_dir() and not any(
            (Path(os.path.expanduser(str(name_or_path))) / f).is_file()
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{name_or_path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...)",
                          where=key, fix="save the tokenizer next to the model (tokenizer.save_pretrained) or set "
                                         "model.tokenizer to one")
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


MODEL_SOURCES = ("builtin", "pretrained")


def check_model_config(model_cfg, key: str = "model") -> None:
    """Fail fast on a model config: ``model=pretrained`` without ``name_or_path``, a local
    path that does not exist or is not a model directory."""
    source = model_cfg.get("source", "builtin") if hasattr(model_cfg, "get") else getattr(model_cfg, "source", "builtin")
    if source not in MODEL_SOURCES:
        raise ConfigError(f"unknown value {source!r}; choose one of {', '.join(MODEL_SOURCES)}", where=f"{key}.source")
    if source == "pretrained" and not model_cfg.name_or_path:
        raise ConfigError("model=pretrained needs the model to load", where=f"{key}.name_or_path",
                          fix=f"set {key}.name_or_path=<hub id or local directory>")
    if model_cfg.name_or_path:
        check_local(model_cfg.name_or_path, f"{key}.name_or_path")
    if model_cfg.tokenizer:
        check_local(model_cfg.tokenizer, f"{key}.tokenizer", needs="")


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
    check_local(name_or_path, key)
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


def context_length(model) -> int:
    """How many positions the model can attend to (prompt + completion)."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
