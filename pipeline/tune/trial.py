"""One trial: sample a configuration, run it on every tuning seed, report, record, tell.

A trial's overrides are the sweep's ``base``, the command line's pipeline overrides and its
sampled values; each tuning seed is one pipeline run (``trials/<number>/seed-<s>/``) where the
seed applies to the tuned stages only (``stages.<name>.seed=<s>``), so upstream stages come
from the cache. Its score is the mean over the seeds.

Pruning: the runner's hook sees the tuned stage's metrics during training (the online-RL
stage's held-out ``eval/*`` curve every ``rl.eval_every`` steps, its rollout metrics every
``trainer.log_every_n_steps``); the pruning metric is reported at ``step + offset`` (seeds
run one after another, each seed's curve continuing after the previous one), and
``optuna.TrialPruned`` raised from the hook stops the run with nothing published. The
``wilcoxon`` pruner instead compares the trial with the best one seed by seed.

Trial user attributes (what reports and later tools read):

==================  ==========================================================================
``overrides``       the trial's pipeline overrides (base + command line + sampled values)
``sampled``         override key -> sampled value
``seeds``           the tuning seeds
``output_dir``      the trial's directory (``<study>/trials/<number>``)
``runs``            per seed: ``seed``, ``output_dir``, ``fingerprints`` and ``reused`` per stage,
                    ``seconds``, ``values`` (objective and constraint metrics)
``values``          objective metric -> mean over seeds (also Optuna's ``trial.values``)
``values_per_seed`` objective metric -> [value per seed]
``metrics``         stage -> metric -> mean over seeds (every final metric)
``constraints``     constraint text -> mean metric value; ``feasible``: all satisfied
                    (Optuna's ``trial.constraints`` hold the violations, <= 0 is feasible)
``pruned_at``       ``{step, seed, value}`` for a pruned trial
``fail_reason``     one line for a failed trial; ``retried`` / ``retry_of`` / ``retry_history``
                    for a trial whose worker died and its retry
``worker``          ``{host, pid, id, index}``; ``heartbeat`` (unix time); ``seconds``
==================  ==========================================================================
"""
from __future__ import annotations

import gc
import logging
import math
import time
import traceback
import warnings

from pipeline.errors import PipelineError
from pipeline.tune import space as sp
from pipeline.tune.storage import FAIL_REASON, Heartbeat, fail_and_retry
from pipeline.tune.study import MissingMetric, SeedRun, Tuner

log = logging.getLogger("pipeline.tune")


class CurveReporter:
    """The runner's hook during a trial: intermediate values of the pruning metric -> pruner."""

    def __init__(self, tuner: Tuner, trial):
        self.trial = trial
        p = tuner.t.pruner
        objective = tuner.objectives[0]
        self.metric = p.metric or objective.metric
        direction = p.direction or objective.direction
        self.sign = 1.0 if direction == objective.direction else -1.0
        self.stage = p.stage
        self.stages = set(tuner.seed_stages)
        self.seed_index, self.seed = 0, None
        self.offset, self.last = 0, -1
        self.reported = 0
        self.pruned_at: dict | None = None

    def start_seed(self, index: int, seed: int) -> None:
        if index > 0 and self.last >= 0:
            self.offset += self.last + 1
        self.seed_index, self.seed, self.last = index, seed, -1

    def __call__(self, stage: str, step: int, metrics: dict) -> None:
        import optuna

        if step < 0 or stage not in self.stages or self.metric not in metrics:
            return
        if self.stage is None:
            self.stage = stage  # the first tuned stage reporting the metric
        if stage != self.stage:
            return
        value = float(metrics[self.metric])
        self.last = max(self.last, step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trial.report(self.sign * value, self.offset + step)
        self.reported += 1
        if self.trial.should_prune():
            self.pruned_at = {"step": self.offset + step, "stage_step": step, "seed": self.seed, "value": value}
            raise optuna.TrialPruned(f"pruned at step {self.offset + step} ({self.metric}={value:.4g})")


def _reason(err: BaseException) -> str:
    if isinstance(err, PipelineError):
        text = err.render().splitlines()[0]
    else:
        text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
    return text[:500]


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _mean_metrics(runs: list[SeedRun]) -> dict:
    out: dict[str, dict[str, float]] = {}
    for name in runs[0].results["stages"]:
        keys = set.intersection(*(set(r.results["stages"][name]["metrics"]) for r in runs))
        vals = {}
        for k in sorted(keys):
            xs = [r.results["stages"][name]["metrics"][k] for r in runs]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
                vals[k] = _mean([float(x) for x in xs])
        out[name] = vals
    return out


def run_trial(tuner: Tuner, study, trial, *, worker_index: int = 0) -> tuple[str, str | None]:
    """Run a claimed trial to the end and tell the study. Returns (state, reason)."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    t0 = time.time()
    trial_dir = tuner.study_dir / "trials" / f"{trial.number:04d}"
    study.sampler = tuner.sampler(trial.number)  # per-trial seed: no repeats across workers / resumes
    reporter = CurveReporter(tuner, trial) if tuner.curve_pruning else None
    state, reason = TrialState.FAIL, None
    with Heartbeat(study._storage, trial._trial_id, tuner.t.heartbeat_interval):
        try:
            assignments = sp.suggest(trial, tuner.params)
            overrides = tuner.base + [sp.override(k, v) for k, v in assignments.items()]
            trial.set_user_attr("overrides", overrides)
            trial.set_user_attr("sampled", assignments)
            trial.set_user_attr("seeds", list(tuner.t.seeds))
            trial.set_user_attr("output_dir", str(trial_dir))
            log.info("trial %d: %s", trial.number, " ".join(sp.override(k, v) for k, v in assignments.items()))
            runs: list[SeedRun] = []
            records = []
            for k, seed in enumerate(tuner.t.seeds):
                if reporter is not None:
                    reporter.start_seed(k, seed)
                run = tuner.run_config(overrides, seed, trial_dir / f"seed-{seed}", hook=reporter,
                                       run_name=f"{tuner.study_name}/t{trial.number}/s{seed}")
                values = {o.metric: run.metric(o.metric, o.stage) for o in tuner.objectives}
                values.update({c.metric: run.metric(c.metric) for c in tuner.constraints if c.metric not in values})
                runs.append(run)
                records.append({"seed": int(seed), "output_dir": str(run.output_dir), "fingerprints": run.fingerprints,
                                "reused": run.reused, "values": values,
                                "seconds": round(sum(s["seconds"] for s in run.info["stages"].values()), 3)})
                trial.set_user_attr("runs", records)
                if tuner.pruner_name == "wilcoxon":  # seed by seed against the best trial
                    o = tuner.objectives[0]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        trial.report(values[o.metric], k)
                    if k + 1 < len(tuner.t.seeds) and trial.should_prune():
                        trial.set_user_attr("pruned_at", {"step": k, "seed": int(seed), "value": values[o.metric]})
                        raise optuna.TrialPruned(f"pruned after seed {seed}")
            per_seed = {o.metric: [r["values"][o.metric] for r in records] for o in tuner.objectives}
            means = {m: _mean(v) for m, v in per_seed.items()}
            bad = [m for m, v in means.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"objective {bad[0]} is {means[bad[0]]} (per seed: {per_seed[bad[0]]})")
            trial.set_user_attr("values", means)
            trial.set_user_attr("values_per_seed", per_seed)
            trial.set_user_attr("metrics", _mean_metrics(runs))
            if tuner.constraints:
                cons = {}
                for c in tuner.constraints:
                    x = _mean([r["values"][c.metric] for r in records])
                    cons[c.text] = x
                    trial.set_constraint(c.text, c.value(x) if math.isfinite(x) else float("inf"))
                trial.set_user_attr("constraints", cons)
                trial.set_user_attr("feasible", all(c.value(cons[c.text]) <= 0 for c in tuner.constraints))
            trial.set_user_attr("seconds", round(time.time() - t0, 3))
            _tell(study, trial, TrialState.COMPLETE, [means[o.metric] for o in tuner.objectives])
            state = TrialState.COMPLETE
        except optuna.TrialPruned as err:
            if reporter is not None and reporter.pruned_at is not None:
                trial.set_user_attr("pruned_at", reporter.pruned_at)
            trial.set_user_attr("seconds", round(time.time() - t0, 3))
            reason = str(err)
            _tell(study, trial, TrialState.PRUNED)
            state = TrialState.PRUNED
        except (KeyboardInterrupt, SystemExit):
            fail_and_retry(study, study._storage.get_trial(trial._trial_id), "interrupted", tuner.t.max_retries)
            raise
        except BaseException as err:  # noqa: BLE001 - any failure is the trial's, recorded with its reason
            reason = _reason(err)
            if not isinstance(err, PipelineError):
                log.warning("trial %d failed:\n%s", trial.number, traceback.format_exc())
            try:
                trial.set_user_attr(FAIL_REASON, reason)
                trial.set_user_attr("seconds", round(time.time() - t0, 3))
                _tell(study, trial, TrialState.FAIL)
            except UpdateFinishedTrialError:
                pass
            if isinstance(err, MissingMetric):
                raise
            _free_memory()
    return state.name, reason


def _tell(study, trial, state, values=None) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.tell(trial, values, state=state)
    except UpdateFinishedTrialError:  # declared stale (and retried) by another worker meanwhile
        log.warning("trial %d finished after it was declared stale; its retry stands", trial.number)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass

