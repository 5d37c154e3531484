"""Generation engine shared by every online algorithm (see :mod:`pipeline.rollout.engine`)."""

from pipeline.rollout.engine import (
    HFRolloutEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    position_ids_from_mask,
    reference_logprobs,
    sequence_logprobs,
)

__all__ = [
    "HFRolloutEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "position_ids_from_mask",
    "reference_logprobs",
    "sequence_logprobs",
]
