"""User datasets (TRL formats) -> examples -> tokenized, padded batches."""
from pipeline.data.collate import (
    IGNORE_INDEX,
    PairCollator,
    SFTCollator,
    seeded_generator,
    tokenize_comparisons,
    tokenize_pairs,
    tokenize_responses,
    tokenize_sft,
)
from pipeline.data.formats import (
    FORMATS,
    SOURCE,
    load_preference_examples,
    load_prompt_rows,
    load_sft_examples,
    split_common_prefix,
)
from pipeline.data.records import PreferenceExample, SFTExample
from pipeline.data.splits import split_holdout

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "PairCollator",
    "PreferenceExample",
    "SFTCollator",
    "SFTExample",
    "SOURCE",
    "load_preference_examples",
    "load_prompt_rows",
    "load_sft_examples",
    "seeded_generator",
    "split_common_prefix",
    "split_holdout",
    "tokenize_comparisons",
    "tokenize_pairs",
    "tokenize_responses",
    "tokenize_sft",
]
