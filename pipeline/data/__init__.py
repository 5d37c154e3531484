"""User datasets (TRL formats) -> examples -> tokenized, padded batches."""
from pipeline.data.collate import (
    IGNORE_INDEX,
    PairCollator,
    SFTCollator,
    seeded_generator,
    tokenize_pairs,
    tokenize_responses,
    tokenize_sft,
)
from pipeline.data.formats import FORMATS, load_preference_examples, load_sft_examples, split_common_prefix
from pipeline.data.records import PreferenceExample, SFTExample

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "PairCollator",
    "PreferenceExample",
    "SFTCollator",
    "SFTExample",
    "load_preference_examples",
    "load_sft_examples",
    "seeded_generator",
    "split_common_prefix",
    "tokenize_pairs",
    "tokenize_responses",
    "tokenize_sft",
]
