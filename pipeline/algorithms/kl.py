"""Per-token KL estimators and KL-coefficient controllers.

Estimators (Schulman, "Approximating KL divergence"), with d = logp − ref_logp for a
token sampled from the policy whose log-prob is ``logp``:

- ``k1`` = d                    unbiased for KL(π‖π_ref), can be negative
- ``k2`` = d²/2                 biased, ≥ 0 (gradient equals the KL gradient to first order)
- ``k3`` = e^{−d} − 1 + d       unbiased for KL(π‖π_ref), ≥ 0 ("low-variance" k3, verl's ``low_var_kl``)

Each has the signature ``fn(logp, ref_logp, *, clamp=None) -> per-token kl``; ``clamp``
optionally clips the result to [−clamp, clamp] (verl clamps k3 to ±10).

Controllers follow Ziegler et al. 2019 as in TRL/verl: ``.value`` is the current
coefficient, ``.update(current_kl, n_steps)`` adapts it.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.registry import Registry

KLEstimator = Callable[..., Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def _maybe_clamp(kl: Tensor, clamp: float | None) -> Tensor:
    return kl if clamp is None else kl.clamp(min=-clamp, max=clamp)


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """k1 = d = logp − ref_logp."""
    return _maybe_clamp(logp - ref_logp, clamp)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """k2 = ½·d², d = logp − ref_logp."""
    return _maybe_clamp(0.5 * (logp - ref_logp) ** 2, clamp)


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor, *, clamp: float | None = None) -> Tensor:
    """k3 = e^{−d} − 1 + d, d = logp − ref_logp (computed with expm1 for accuracy at d≈0)."""
    d = logp - ref_logp
    return _maybe_clamp(torch.expm1(-d) + d, clamp)


class KLController(Protocol):
    value: float

    def update(self, current_kl: float | Tensor, n_steps: int) -> None: ...


class FixedKLController:
    """Constant coefficient: ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op."""


class AdaptiveKLController:
    """Ziegler et al. proportional controller (TRL/verl ``AdaptiveKLController``).

    e = clip(current_kl/target − 1, −0.2, 0.2);  value ← value·(1 + e·n_steps/horizon).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target is None or not target > 0:
            raise ConfigError(f"adaptive KL controller needs target > 0, got {target!r}", where="algorithm.kl_target")
        if horizon is None or not horizon > 0:
            raise ConfigError(f"adaptive KL controller needs horizon > 0, got {horizon!r}", where="algorithm.kl_horizon")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Multiply ``value`` by 1 + clip(current_kl/target − 1, ±0.2)·n_steps/horizon."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


KL_CONTROLLERS: Registry[Callable[..., KLController]] = Registry("KL controller")


@KL_CONTROLLERS.register("fixed")
def _fixed(*, kl_coef: float, target: float | None = None, horizon: float | None = None) -> KLController:
    return FixedKLController(kl_coef)


@KL_CONTROLLERS.register("adaptive")
def _adaptive(*, kl_coef: float, target: float | None = None, horizon: float | None = None) -> KLController:
    return AdaptiveKLController(kl_coef, target, horizon)  # type: ignore[arg-type]


def build_kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: float | None = None
) -> KLController:
    """Controller by name: ``"fixed"`` (target/horizon ignored) or ``"adaptive"`` (both required)."""
    factory = KL_CONTROLLERS.get(kind, key="algorithm.kl_controller")
    return factory(kl_coef=kl_coef, target=target, horizon=horizon)
