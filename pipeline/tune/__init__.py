"""Hyperparameter search over pipelines with Optuna: ``python -m pipeline.tune sweep=ppo``.

Modules: :mod:`~pipeline.tune.spec` (sweep files and their schema), :mod:`~pipeline.tune.space`
(search spaces), :mod:`~pipeline.tune.study` (the study checked against the pipeline: seeds,
sampler, pruner), :mod:`~pipeline.tune.storage` (storage, study lock, heartbeats, budget),
:mod:`~pipeline.tune.trial` (one trial), :mod:`~pipeline.tune.worker` (the trial loop, local
workers), :mod:`~pipeline.tune.outputs` (study directory, test seeds), :mod:`~pipeline.tune.progress`
(console), :mod:`~pipeline.tune.tracking` (W&B), :mod:`~pipeline.tune.pbt` (population-based training:
sweeps with a ``pbt:`` section) and :mod:`~pipeline.tune.pb2` (PB2's GP bandit).

From Python::

    from pipeline.tune import run_study
    result = run_study("ppo", tune=["n_trials=8"], overrides=["rl.total_steps=30"], root=".")
    result.summary["best"], result.study_dir
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pipeline.tune")


@dataclass
class StudyResult:
    study_dir: Path
    summary: dict | None
    tests: dict | None


def run_study(sweep: str, tune=(), overrides=(), *, root=None, config_dirs=(), console=None) -> StudyResult:
    """Run (or resume) the study of sweep file ``sweep``: ``tune`` are ``tune.*`` settings without
    the prefix (``["n_trials=8"]``), ``overrides`` pipeline overrides for every trial."""
    from pipeline.run import torch_threads_kept

    with torch_threads_kept():  # workers share the CPU (set_threads) for this study only
        return _run_study(sweep, tune, overrides, root=root, config_dirs=config_dirs, console=console)


def _run_study(sweep, tune, overrides, *, root, config_dirs, console) -> StudyResult:
    from pipeline.tune.spec import load_spec
    from pipeline.tune.study import Tuner
    from pipeline.tune.worker import launch, set_threads, wait, work

    root = Path(root or Path.cwd()).resolve()
    spec = load_spec(sweep, list(tune), root)
    tuner = Tuner(spec, overrides, root=root, tune_overrides=tune, config_dirs=config_dirs)
    if spec.pbt is not None:  # population-based training: pipeline/tune/pbt.py
        from pipeline.tune.pbt import run_population

        return run_population(tuner, console)
    t = tuner.t
    finisher = t.phase == "report" or (t.phase == "all" and t.worker == 0)
    study = tuner.open_study(create=t.phase != "report")
    say = (console.print if console is not None else log.info)
    if tuner.multi and t.pruner.name != "none":
        say(f"{len(tuner.objectives)} objectives: Optuna cannot prune multi-objective studies, so this study "
            f"runs without pruning (tune.pruner={t.pruner.name} ignored)")
    if tuner.grid is not None and t.n_trials is not None:
        from pipeline.tune.space import grid_size

        if grid_size(tuner.grid) < t.n_trials:
            say(f"the grid has {grid_size(tuner.grid)} points: the study stops there (tune.n_trials={t.n_trials})")
            t.n_trials = grid_size(tuner.grid)
    if t.phase in ("all", "trials"):
        set_threads(t.n_workers)
        deadline = time.time() + t.timeout if t.timeout else None
        procs = launch(tuner, range(1, t.n_workers)) if t.n_workers > 1 and t.phase == "all" else []
        monitor = None
        if t.progress and console is not None:
            from pipeline.tune.progress import Monitor

            monitor = Monitor(tuner, console)
        interrupted = False
        try:
            if monitor is not None:
                monitor.__enter__()
            work(tuner, study, worker_index=t.worker, deadline=deadline, wait_for_others=finisher,
                 on_trial=lambda trial: _after_trial(tuner, study, trial))
        except BaseException:
            interrupted = True
            raise
        finally:
            wait(procs, terminate=interrupted)
            if monitor is not None:
                monitor.__exit__(None, None, None)
    if not finisher:
        return StudyResult(tuner.study_dir, None, None)
    return finalize(tuner, study, console)


def _after_trial(tuner, study, trial) -> None:
    from pipeline.tune.outputs import write_trials_csv
    from pipeline.tune.tracking import log_trial

    write_trials_csv(tuner, study)
    log_trial(tuner, trial)


def finalize(tuner, study, console=None) -> StudyResult:
    """Write the study's outputs, re-run the best configuration(s) on the test seeds, print."""
    from pipeline.tune import outputs as out

    out.write_trials_csv(tuner, study)
    ranked = out.ranked(tuner, study)
    presets = out.write_presets(tuner, study, ranked, None)
    out.write_summary(tuner, out.summary(tuner, study, ranked, presets, None))
    tests = None
    selected = out.selected_for_test(tuner, ranked)
    if selected and tuner.t.test_seeds:
        if console is not None:
            console.print(f"re-running {len(selected)} configuration(s) on test seeds {list(tuner.t.test_seeds)} ...",
                          markup=False)
        tests = out.run_tests(tuner, selected)
        out.write_tests(tuner, tests)
        presets = out.write_presets(tuner, study, ranked, tests)
    doc = out.summary(tuner, study, ranked, presets, tests)
    out.write_summary(tuner, doc)
    if console is not None:
        from pipeline.tune.progress import print_results

        print_results(tuner, doc, tests, console)
    return StudyResult(tuner.study_dir, doc, tests)
