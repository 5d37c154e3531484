"""Hyperparameter schedules of the online stages (``rl.schedule``, ``nlhf.schedule``): settings that
change between rollout steps (iterations for ``nlhf``).

::

    rl:
      schedule:
        - {step: 20, overrides: [algorithm.kl_coef=0.1, rl.optim.lr=5.0e-5]}
        - {step: 40, overrides: [algorithm.temperature=0.8]}

An entry applies at the start of rollout step ``step`` (before that step samples), and a value
stays until a later entry changes it; the settings before the first entry are the run's own.
Population-based training (``pipeline/tune/pbt.py``) records its members' hyperparameters this way,
and the best member's schedule replays as a plain pipeline run.

Only the keys of :data:`SCHEDULABLE` (``rl``) / :data:`NLHF_SCHEDULABLE` (``nlhf``) can change
mid-run: the ones the training step reads afresh (sampling, clipping, loss weights and
coefficients, GAE) and the ones pushed into training state when they change (the learning rates
into the optimizer and its LR schedule, ``kl_coef`` into the KL controller). Keys that shape the
step count or the models (``ppo_epochs``, ``num_mini_batches``, estimators, losses,
``max_new_tokens``...) cannot.
"""
from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError

#: schedulable key of an ``rl`` stage -> the type its values must have
SCHEDULABLE: dict[str, type] = {
    "rl.optim.lr": float,
    "algorithm.critic_lr": float,
    "algorithm.kl_coef": float,
    "algorithm.kl_target": float,
    "algorithm.kl_horizon": int,
    "algorithm.temperature": float,
    "algorithm.top_p": float,
    "algorithm.top_k": int,
    "algorithm.cliprange": float,
    "algorithm.cliprange_value": float,
    "algorithm.vf_coef": float,
    "algorithm.gamma": float,
    "algorithm.lam": float,
    "algorithm.reward_clip": float,
    "algorithm.missing_eos_penalty": float,
}

#: schedulable key of an ``nlhf`` stage -> the type its values must have
NLHF_SCHEDULABLE: dict[str, type] = {
    "nlhf.optim.lr": float,
    "algorithm.beta": float,
    "algorithm.mixture_coef": float,
    "algorithm.eta": float,
    "algorithm.label_smoothing": float,
    "algorithm.temperature": float,
    "algorithm.top_p": float,
    "algorithm.top_k": int,
    "algorithm.missing_eos_penalty": float,
}
#: schedulable keys whose value may be null (off / follow the policy's learning rate)
NULLABLE = ("algorithm.critic_lr", "algorithm.reward_clip", "algorithm.missing_eos_penalty")


def parse_schedule(entries, total_steps: int | None = None, key: str = "rl.schedule",
                   schedulable: dict[str, type] = SCHEDULABLE) -> list[tuple[int, dict]]:
    """``[(step, {key: value})]`` sorted by step (entries of one step merged in order), checked:
    known ``schedulable`` keys, values of the right type, steps in ``[0, total_steps)``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from pipeline.config import plain
    from pipeline.registry import closest

    merged: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(plain(entries) or []):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"step", "overrides"}:
            raise ConfigError(f"expected {{step: <int>, overrides: [key=value, ...]}}, got {entry!r}", where=where)
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an integer >= 0, got {step!r}", where=f"{where}.step")
        if total_steps is not None and step >= total_steps:
            raise ConfigError(f"step {step} is past the last step ({total_steps - 1})", where=f"{where}.step",
                              fix="schedule steps from 0 to the stage's last step")
        values = merged.setdefault(step, {})
        for text in entry.get("overrides") or []:
            try:
                (o,) = OverridesParser.create().parse_overrides([str(text)])
            except OverrideParseException as err:
                raise ConfigError(f"cannot parse {text!r}: {str(err).splitlines()[0]}",
                                  where=f"{where}.overrides") from None
            name, value = o.key_or_group, o.value()
            if name not in schedulable:
                near = closest(name, schedulable)
                raise ConfigError(f"{name!r} cannot change during training" + (f" (did you mean {near!r}?)" if near
                                  else ""), where=f"{where}.overrides",
                                  fix=f"schedulable keys: {', '.join(schedulable)}")
            values[name] = _typed(value, schedulable[name], f"{where}.overrides: {name}")
    return sorted(merged.items())


def _typed(value: Any, tp: type, where: str) -> Any:
    if value is None and where.rsplit(": ", 1)[-1] in NULLABLE:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
        raise ConfigError(f"expected {'an integer' if tp is int else 'a number'}, got {value!r}", where=where)
    return tp(value)


def set_learning_rates(opt, sch, lrs: list[float]) -> None:
    """New base learning rates for the optimizer's parameter groups (in order); an LR schedule keeps
    its shape (the current lr is the new base lr times the schedule's current factor)."""
    opt = getattr(opt, "optimizer", opt)  # Lightning's wrapper
    for i, (group, lr) in enumerate(zip(opt.param_groups, lrs)):
        group["initial_lr"] = lr
        if sch is not None and hasattr(sch, "lr_lambdas"):
            sch.base_lrs[i] = lr
            group["lr"] = lr * sch.lr_lambdas[i](sch.last_epoch)
        else:
            group["lr"] = lr
    if sch is not None:
        sch._last_lr = [g["lr"] for g in opt.param_groups]
