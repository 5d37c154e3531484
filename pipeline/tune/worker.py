"""Workers: the trial loop of one process, and local worker processes sharing a study.

A worker claims a trial under the study lock (stale trials are recovered first, the budget is
checked), runs it, tells the study, and repeats until the budget or ``tune.timeout`` is spent.
The worker that finishes the study (``tune.worker=0`` with ``tune.phase=all``) then waits for
trials other workers still run, so that a trial whose worker dies is retried before the
outputs are written. ``tune.n_workers=N`` runs N-1 more workers as local processes
(``python -m pipeline.tune ... tune.phase=trials tune.worker=i``, logs in ``<study>/logs/``).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from pipeline.errors import TrainingError
from pipeline.tune.storage import FAIL_REASON, claim
from pipeline.tune.study import Tuner
from pipeline.tune.trial import run_trial

log = logging.getLogger("pipeline.tune")

#: torch threads per local worker (set by the launching process)
THREADS_ENV = "PIPELINE_TUNE_THREADS"


def _succeeded(study) -> bool:
    from optuna.trial import TrialState

    return any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def work(tuner: Tuner, study, *, worker_index: int = 0, deadline: float | None = None, wait_for_others: bool = False,
         on_trial=None, poll_s: float = 1.0) -> Counter:
    """Run trials until none can be claimed; returns a count of states this worker produced."""
    from optuna.trial import TrialState

    done: Counter = Counter()
    failures_in_a_row = 0
    reasons: Counter = Counter()
    while True:
        trial = claim(study, tuner.lock, n_trials=tuner.t.n_trials, grace_period=tuner.t.grace_period,
                      max_retries=tuner.t.max_retries, worker_index=worker_index,
                      allow_new=deadline is None or time.time() < deadline)
        if trial is None:
            others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if wait_for_others and others:
                time.sleep(poll_s)  # they finish, or go stale and are retried here
                continue
            return done
        state, reason = run_trial(tuner, study, trial, worker_index=worker_index)
        done[state] += 1
        if on_trial is not None:
            on_trial(study._storage.get_trial(trial._trial_id))
        if state == "FAIL":
            failures_in_a_row += 1
            reasons[reason] += 1
            if failures_in_a_row >= tuner.t.fail_fast and not _succeeded(study):
                common, n = reasons.most_common(1)[0]
                raise TrainingError(f"the study's first {failures_in_a_row} trials all failed; stopping instead of "
                                    f"spending the budget. Most common reason ({n}x): {common}",
                                    where=f"study {tuner.study_name}",
                                    fix="fix the cause (see trials.csv / the worker logs) and re-run the same "
                                        "command: finished trials are kept")
        else:
            failures_in_a_row = 0


def set_threads(n_workers: int) -> None:
    """Share the CPU between local workers (trainer.num_threads, when set, still wins in each stage)."""
    n = os.environ.get(THREADS_ENV)
    if not n and n_workers <= 1:
        return  # one worker: torch's own default
    import torch

    torch.set_num_threads(int(n) if n else max(1, (os.cpu_count() or 1) // n_workers))


def worker_command(tuner: Tuner, index: int) -> list[str]:
    """The command line of local worker ``index`` (the same study: same sweep and overrides)."""
    cmd = [sys.executable, "-m", "pipeline.tune"]
    for d in tuner.config_dirs:
        cmd += ["--config-dir", d]
    mine = ("phase", "worker", "n_workers", "progress")
    tune = [o for o in tuner.tune_overrides if o.split("=", 1)[0] not in mine]
    cmd += [f"sweep={tuner.spec.path}", *[f"tune.{o}" for o in tune], *tuner.cli_overrides,
            "tune.phase=trials", f"tune.worker={index}", "tune.n_workers=1", "tune.progress=false",
            "hydra/job_logging=stdout", "hydra.output_subdir=null",
            f"hydra.run.dir={tuner.study_dir / 'logs'}"]
    return cmd


def launch(tuner: Tuner, indices) -> list[tuple[int, subprocess.Popen, Path]]:
    """Start local worker processes; each logs to ``<study>/logs/worker-<i>.log``."""
    logs = tuner.study_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, tuner.t.n_workers))
    env = dict(os.environ, PIPELINE_ROOT=str(tuner.root), **{THREADS_ENV: str(threads)})
    procs = []
    for i in indices:
        path = logs / f"worker-{i}.log"
        with open(path, "ab") as out:
            proc = subprocess.Popen(worker_command(tuner, i), cwd=tuner.root, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append((i, proc, path))
    return procs


def wait(procs, *, terminate: bool = False) -> None:
    for i, proc, path in procs:
        if terminate and proc.poll() is None:
            proc.terminate()
        rc = proc.wait()
        if rc != 0:
            log.warning("worker %d exited with code %d (log: %s)", i, rc, path)


def fail_reasons(study) -> Counter:
    from optuna.trial import TrialState

    return Counter(t.user_attrs.get(FAIL_REASON, "?") for t in study.get_trials(deepcopy=False)
                   if t.state == TrialState.FAIL)
