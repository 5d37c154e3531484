"""Tracking of studies: Weights & Biases (when ``logger=wandb`` / ``logger.backends`` has wandb) and
TensorBoard HParams (``tensorboard`` in ``logger.backends``: one session per trial in
``<study>/tensorboard/trial-<n>/``).

Each finished trial becomes one W&B run in a group named after the study
(``<study>/trial-<n>``, job type ``tune-trial``): its sampled values as the run config, its
objective(s), state and per-seed values in the summary, and the intermediate values the
pruner saw as history. The trial's stage runs (one per trained stage and seed) are in the
same group (``logger.wandb.group=<study>``), named ``<study>/t<n>/s<seed>/<stage>``. The
trial run is written after the trial finished, so it never overlaps a stage's run.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from pipeline.tracking.wandb_runs import init
from pipeline.tune.study import Tuner

log = logging.getLogger("pipeline.tune")


def enabled(tuner: Tuner) -> bool:
    return "wandb" in list(tuner.base_cfg.logger.backends)


def log_trial(tuner: Tuner, trial) -> None:
    """A finished trial: one W&B run (with ``logger=wandb``) and one TensorBoard HParams session
    (with ``tensorboard`` in ``logger.backends``)."""
    if "tensorboard" in list(tuner.base_cfg.logger.backends):
        write_trial_hparams(tuner, trial)
    if enabled(tuner):
        _wandb_trial(tuner, trial)


def write_trial_hparams(tuner: Tuner, trial) -> None:
    """``<study>/tensorboard/trial-<n>/``: the sampled values and state as hyperparameters, the
    objectives (mean and per tuning seed) and constraint values as metrics, so that
    ``tensorboard --logdir <study>/tensorboard`` compares the trials in its HParams view."""
    from pipeline.tracking.hparams import write_hparams

    a = trial.user_attrs
    hparams = {**(a.get("sampled") or {}), "state": trial.state.name, "trial": trial.number}
    metrics = dict(a.get("values") or {})
    for m, xs in (a.get("values_per_seed") or {}).items():
        metrics.update({f"{m}/seed_{s}": x for s, x in zip(tuner.t.seeds, xs)})
    metrics.update({f"constraint/{k}": v for k, v in (a.get("constraints") or {}).items()})
    if a.get("pruned_at"):
        metrics["pruned_at_step"] = a["pruned_at"].get("step")
    try:
        write_hparams(tuner.study_dir / "tensorboard" / f"trial-{trial.number}", hparams, metrics)
    except Exception as err:  # noqa: BLE001 - tracking never fails a study
        log.warning("TensorBoard HParams of trial %d not written: %s", trial.number, err)


def _wandb_trial(tuner: Tuner, trial) -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:  # pragma: no cover
        return
    wcfg = tuner.base_cfg.logger.wandb
    a = trial.user_attrs
    run_dir = Path(a.get("output_dir") or tuner.study_dir / "trials" / f"{trial.number:04d}")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**(a.get("sampled") or {}), "trial": trial.number, "study": tuner.study_name,
              "overrides": a.get("overrides"), "seeds": a.get("seeds")}
    summary = {"state": trial.state.name, "trial": trial.number}
    if trial.values:
        for o, v in zip(tuner.objectives, trial.values):
            summary[o.metric] = v
        for m, xs in (a.get("values_per_seed") or {}).items():
            for s, x in zip(tuner.t.seeds, xs):
                summary[f"{m}/seed_{s}"] = x
    if a.get("constraints"):
        summary.update({f"constraint/{k}": v for k, v in a["constraints"].items()})
        summary["feasible"] = a.get("feasible")
    if a.get("pruned_at"):
        summary["pruned_at_step"] = a["pruned_at"].get("step")
    if a.get("fail_reason"):
        summary["fail_reason"] = a["fail_reason"]
    try:
        run = init(mode=wcfg.mode, dir=run_dir, config=config, project=wcfg.project, entity=wcfg.entity,
                   group=tuner.study_name, name=f"{tuner.study_name}/trial-{trial.number}", job_type="tune-trial",
                   tags=list(wcfg.tags) + [f"study:{tuner.study_name}"])
        metric = tuner.t.pruner.metric or tuner.objectives[0].metric
        for step, value in sorted(trial.intermediate_values.items()):
            if math.isfinite(value):
                run.log({f"intermediate/{metric}": value}, step=int(step))
        run.summary.update(summary)
        run.finish()
    except Exception as err:  # tracking never fails a study
        log.warning("W&B run for trial %d not written: %s", trial.number, err)
