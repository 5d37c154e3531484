"""User datasets (TRL formats) -> examples -> tokenized, padded batches."""
from pipeline.data.collate import (
    IGNORE_INDEX,
    PairCollator,
    PreferenceCollator,
    SFTCollator,
    check_on_long_prompt,
    fit_prompt_rows,
    fit_prompts,
    seeded_generator,
    tokenize_comparisons,
    tokenize_pairs,
    tokenize_preferences,
    tokenize_responses,
    tokenize_sft,
)
from pipeline.data.formats import (
    FORMATS,
    SOURCE,
    load_preference_examples,
    load_eval_data,
    load_prompt_rows,
    load_sft_examples,
    split_common_prefix,
)
from pipeline.data.loader import ResumableLoader
from pipeline.data.records import PreferenceExample, SFTExample
from pipeline.data.splits import split_holdout

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "PairCollator",
    "PreferenceCollator",
    "PreferenceExample",
    "ResumableLoader",
    "SFTCollator",
    "SFTExample",
    "check_on_long_prompt",
    "fit_prompt_rows",
    "fit_prompts",
    "SOURCE",
    "load_preference_examples",
    "load_eval_data",
    "load_prompt_rows",
    "load_sft_examples",
    "seeded_generator",
    "split_common_prefix",
    "split_holdout",
    "tokenize_comparisons",
    "tokenize_pairs",
    "tokenize_preferences",
    "tokenize_responses",
    "tokenize_sft",
]
