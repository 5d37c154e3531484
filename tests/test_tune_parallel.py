"""The tuner with several processes: a worker killed mid-trial and the study resumed, two
workers on one journal file, two workers on a real PostgreSQL server, tuner workers and
pipeline grids through Hydra's launchers (basic, joblib, submitit_local)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.conftest import cli_env
from tests.tune_helpers import load_study, run_tune, start_postgres, write_sweep

pytestmark = pytest.mark.slow

#: a reward that sleeps 0.5 s per rollout step: trials of a few seconds
SLOW = ["rl.reward_source=callable", "rl.reward_fn=tests.tune_helpers:slow_high", "rl.total_steps=8"]


def _check_study(study, n_trials: int, workers: int | None = None):
    trials = study.get_trials()
    counted = [t for t in trials if not (t.state.name == "FAIL" and t.user_attrs.get("retried"))]
    assert len(counted) == n_trials, [(t.number, t.state.name) for t in trials]
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none twice
    assert all(t.state.name == "COMPLETE" for t in counted), [(t.number, t.state.name, t.user_attrs.get(
        "fail_reason")) for t in counted]
    if workers is not None:
        pids = Counter((t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in counted)
        assert len(pids) == workers, pids
    return counted


def test_sigkill_mid_trial_then_the_same_command_resumes_the_study(tmp_path):
    path = write_sweep(tmp_path, "kill", base=SLOW + ["rl.total_steps=10"],
                       space={"algorithm.kl_coef": [0.05, 0.1, 0.2, 0.3]},
                       tune={"n_trials": 3, "sampler": "grid", "test_seeds": []})
    env = cli_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tune", f"sweep={path}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    study_dir = tmp_path / "outputs" / "studies" / "kill"
    deadline = time.time() + 400
    victim = None
    while time.time() < deadline and victim is None:
        time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail("the study finished before a worker could be killed")
        if not (study_dir / "storage.journal").is_file():
            continue
        trials = load_study(study_dir, "kill").get_trials()
        running = [t for t in trials if t.state.name == "RUNNING" and t.number == 1]
        if running and any(t.state.name == "COMPLETE" for t in trials):
            victim = running[0]
    assert victim is not None, "trial 1 never started"
    time.sleep(2.0)  # in the middle of its rl stage
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.state.name, t.value, t.datetime_complete) for t in load_study(study_dir, "kill").get_trials()}
    assert before[0][0] == "COMPLETE" and before[1][0] == "RUNNING"

    again = run_tune([f"sweep={path}"], tmp_path, timeout=500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = load_study(study_dir, "kill")
    counted = _check_study(study, 3)
    trials = {t.number: t for t in study.get_trials()}
    assert (trials[0].state.name, trials[0].value, trials[0].datetime_complete) == before[0]  # kept, not re-run
    killed = trials[1]
    assert killed.state.name == "FAIL" and killed.user_attrs["retried"]
    assert "stopped while running it; retried" in killed.user_attrs["fail_reason"]
    (retry,) = [t for t in trials.values() if t.user_attrs.get("retry_of") == 1]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert len(trials) == 4 and len(counted) == 3  # the budget: 3 trials, the killed one not counted twice
    assert "trial   1  FAIL" in again.stdout and "retried" in again.stdout
    assert not any((tmp_path / "outputs" / "artifacts" / ".tmp").iterdir())  # the dead worker's build removed
    assert (study_dir / "best.yaml").is_file()


def test_two_local_workers_share_one_study_without_duplicates_or_losses(tmp_path):
    # trials of a few seconds (a slow reward), so that the second worker's start-up is not the whole study
    path = write_sweep(tmp_path, "two", base=SLOW, tune={"n_trials": 8, "sampler": "random", "test_seeds": [5]})
    proc = run_tune([f"sweep={path}", "tune.n_workers=2"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "outputs" / "studies" / "two"
    counted = _check_study(load_study(study_dir, "two"), 8, workers=2)
    assert len({tuple(sorted(t.params.items())) for t in counted}) == 8  # no configuration sampled twice
    assert len((study_dir / "trials.csv").read_text().splitlines()) == 9
    assert (study_dir / "logs" / "worker-1.log").is_file()
    arts = tmp_path / "outputs" / "artifacts"
    assert len(list(arts.glob("sft-*"))) == 1 and len(list(arts.glob("reward-*"))) == 1  # built once (stage lock)
    assert sum(line.startswith("trial ") for line in proc.stdout.splitlines()) == 8  # one line per trial


@pytest.fixture(scope="module")
def postgres():
    try:
        url, stop = start_postgres()
    except RuntimeError as err:
        pytest.skip(f"no PostgreSQL server for this test: {err}")
    yield url
    stop()


def test_two_workers_on_a_postgresql_study(postgres, tmp_path):
    """Two independent worker processes (as on two machines) on one PostgreSQL study, then the report."""
    name = f"pg_{os.getpid()}_{int(time.time())}"  # a server given by .ci/run may hold other studies
    path = write_sweep(tmp_path, "pg", base=SLOW, tune={"n_trials": 4, "sampler": "random", "test_seeds": [5],
                                                        "study_name": name})
    env = cli_env(tmp_path)
    args = [sys.executable, "-m", "pipeline.tune", f"sweep={path}", f"tune.storage={postgres}", "tune.phase=trials"]
    workers = [subprocess.Popen(args + [f"tune.worker={i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-2000:] for o in outs)
    proc = run_tune([f"sweep={path}", f"tune.storage={postgres}", "tune.phase=report"], tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "outputs" / "studies" / name
    counted = _check_study(load_study(study_dir, name, storage=postgres), 4, workers=2)
    assert len(counted) == 4 and not (study_dir / "storage.journal").exists()
    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["storage"].startswith("postgresql://") and summary["trials"]["COMPLETE"] == 4
    assert (study_dir / "best.yaml").is_file() and (study_dir / "test_results.json").is_file()


def test_tuner_workers_through_hydras_submitit_launcher(tmp_path):
    """`-m tune.worker=0,1 hydra/launcher=submitit_local`: two jobs, one study (what a SLURM run does)."""
    path = write_sweep(tmp_path, "jobs", base=SLOW, tune={"n_trials": 4, "sampler": "random", "test_seeds": [5]})
    proc = run_tune(["-m", "hydra/launcher=submitit_local", f"sweep={path}", "tune.worker=0,1"], tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "outputs" / "studies" / "jobs"
    _check_study(load_study(study_dir, "jobs"), 4)
    assert (study_dir / "best.yaml").is_file() and (study_dir / "test_results.json").is_file()  # worker 0 finished


LAUNCH = ["pipeline=sft", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "task.num_train_prompts=64",
          "task.num_eval_prompts=8", "sft.max_epochs=1", "eval.num_samples=1", "trainer.num_threads=1",
          "trainer.enable_progress_bar=false", "print_summary=false"]


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local"]], ids=["basic", "joblib", "submitit_local"])
def test_multirun_grid_with_hydra_launchers(launcher, tmp_path):
    env = cli_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", *launcher, *LAUNCH, "sft.optim.lr=0.001,0.003"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/results.json"))
    assert len(jobs) == 2
    lrs = sorted(json.loads((j / "run.json").read_text())["overrides"][-1] for j in jobs)
    assert lrs == ["sft.optim.lr=0.001", "sft.optim.lr=0.003"]
    fps = {json.loads((j / "results.json").read_text())["stages"]["sft"]["fingerprint"] for j in jobs}
    assert len(fps) == 2 and len(list((tmp_path / "outputs" / "artifacts").glob("sft-*"))) == 2
