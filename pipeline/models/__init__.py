"""Build or load policy / reward models and tokenizers (Hugging Face format)."""
from pipeline.models.loading import (  # noqa: F401
    build_causal_lm,
    load_causal_lm,
    load_tokenizer,
    resolve_tokenizer,
    save_pretrained,
)
from pipeline.models.tokenizer import train_tokenizer  # noqa: F401
