"""Pure tensor functions and registries for online policy optimisation (cf. verl core_algos).

Registries pick implementations by config name: ``ADVANTAGE_ESTIMATORS``, ``POLICY_LOSSES``,
``LOSS_AGG_MODES``, ``KL_ESTIMATORS``, ``KL_CONTROLLERS``. ``pipeline.algorithms.tabular``
(not imported here) is the exact bandit backend used by the tests.
"""
from pipeline.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    requirements,
    group_stats,
    reward_to_go,
    sequence_returns,
)
from pipeline.algorithms.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
)
from pipeline.algorithms.policy_losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    entropy_from_logits,
    explained_variance,
    value_loss,
)
from pipeline.algorithms.rewards import (
    apply_missing_eos_penalty,
    clip_rewards,
    last_token_index,
    token_level_rewards,
    whiten_rewards,
)
from pipeline.algorithms.utils import masked_mean, masked_sum, masked_var, masked_whiten, whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "requirements",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "agg_loss",
    "apply_missing_eos_penalty",
    "build_kl_controller",
    "clip_rewards",
    "entropy_from_logits",
    "explained_variance",
    "group_stats",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "reward_to_go",
    "sequence_returns",
    "token_level_rewards",
    "value_loss",
    "whiten",
    "whiten_rewards",
]
