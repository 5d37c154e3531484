"""Weights & Biases for studies (when ``logger=wandb`` / ``logger.backends`` has wandb).

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
import os
from pathlib import Path

from pipeline.tracking.loggers import resolve_wandb_mode, scrub_secrets
from pipeline.tune.study import Tuner

log = logging.getLogger("pipeline.tune")


def enabled(tuner: Tuner) -> bool:
    return "wandb" in list(tuner.base_cfg.logger.backends)


def log_trial(tuner: Tuner, trial) -> None:
    """One W&B run for a finished trial (a no-op unless W&B is on)."""
    if not enabled(tuner):
        return
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    wcfg = tuner.base_cfg.logger.wandb
    a = trial.user_attrs
    run_dir = Path(a.get("output_dir") or tuner.study_dir / "trials" / f"{trial.number:04d}")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
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
        run = wandb.init(project=wcfg.project, entity=wcfg.entity, group=tuner.study_name,
                         name=f"{tuner.study_name}/trial-{trial.number}", job_type="tune-trial",
                         tags=list(wcfg.tags) + [f"study:{tuner.study_name}"], mode=resolve_wandb_mode(wcfg.mode),
                         dir=str(run_dir), config=scrub_secrets(config), reinit="create_new")
        metric = tuner.t.pruner.metric or tuner.objectives[0].metric
        for step, value in sorted(trial.intermediate_values.items()):
            if math.isfinite(value):
                run.log({f"intermediate/{metric}": value}, step=int(step))
        run.summary.update(summary)
        run.finish()
    except Exception as err:  # tracking never fails a study
        log.warning("W&B run for trial %d not written: %s", trial.number, err)
