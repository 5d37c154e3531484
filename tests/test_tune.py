"""The tuner (python -m pipeline.tune): sweep specs, search spaces, small studies end to end,
seed discipline, pruning, failures, multi-objective, resume, W&B. One SFT model and one
reward model serve the whole module (shared artifact directory); each trial is about a second."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, TrainingError
from pipeline.tune import run_study
from pipeline.tune.spec import load_spec
from pipeline.tune.study import Tuner
from tests.conftest import run_cli
from tests.tune_helpers import BASE, load_study, run_tune, wandb_records, write_sweep


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tune")


@pytest.fixture(scope="module")
def study1(root):
    """3 trials x 2 tuning seeds, 1 test seed; a pruner that watches but never prunes (the curve)."""
    path = write_sweep(root, "small", tune={"n_trials": 3, "seeds": [0, 1], "test_seeds": [5],
                                            "pruner": {"name": "median", "options": {"n_startup_trials": 100}}})
    result = run_study(str(path), root=root)
    return result, load_study(result.study_dir, "small")


# ----------------------------------------------------------------------------- specs and spaces
def test_typo_in_sweep_file_is_an_error_naming_file_line_and_key(tmp_path):
    path = write_sweep(tmp_path, "typo", tune={"n_trails": 3})
    with pytest.raises(ConfigError) as err:
        load_spec(str(path))
    text = err.value.render()
    line = next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if "n_trails" in ln)
    assert f"typo.yaml:{line}: tune.n_trails: unknown key 'n_trails' (did you mean 'n_trials'?)" in text
    path = write_sweep(tmp_path, "typo2", space={"algorithm.kl_coef": {"type": "float", "low": 0.1, "high": 1,
                                                                       "logg": True}})
    with pytest.raises(ConfigError, match=r"space.algorithm.kl_coef.logg: unknown key 'logg' \(did you mean 'log'\?\)"):
        Tuner(load_spec(str(path)), root=tmp_path)
    with pytest.raises(ConfigError, match="command line tune.sampler.nmae=random: unknown key 'nmae'"):
        load_spec(str(write_sweep(tmp_path, "ok")), ["sampler.nmae=random"])


def test_typo_from_the_command_line_is_one_line_without_traceback(tmp_path):
    path = write_sweep(tmp_path, "cli", space={"algorithm.kl_coeff": {"type": "float", "low": 0.1, "high": 1.0}})
    proc = run_tune([f"sweep={path}"], tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and "cli.yaml:" in first, proc.stderr
    assert first.endswith("space.algorithm.kl_coeff: no config key 'algorithm.kl_coeff' "
                          "(did you mean 'algorithm.kl_coef'?)"), proc.stderr


@pytest.mark.parametrize("space,tune,message", [
    ({"rl.optim.lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, {}, "empty range: low=0.001 > high=1e-05"),
    ({"rl.optim.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, {}, "log-scale range must be positive"),
    ({"algorithm.ppo_epochs": {"type": "int", "low": 1.5, "high": 4}}, {}, "integer bounds"),
    ({"algorithm.temperature": []}, {}, "non-empty list of choices"),
    ({"algorithm": {"choices": ["ppo", "grpo"], "then": {"rloo": {"algorithm.kl_coef": [0.1, 0.2]}}}}, {},
     "`then` has a branch for 'rloo', which is not one of the choices"),
    ({"rl.optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, {"sampler": "grid"},
     "grid sampler needs a finite set of values"),
    ({"rl.optim.lr": {"type": "floot", "low": 1e-5, "high": 1e-3}}, {}, "type 'floot' \\(did you mean 'float'\\?\\)"),
    ({"algorithm.kl_coef": [0.1, 0.2]}, {"seeds": [0, 1], "test_seeds": [1, 2]},
     "test seeds must be disjoint from the tuning seeds; both have \\[1\\]"),
    ({"algorithm": ["ppo", "nope"]}, {}, "space.algorithm='nope'"),
    ({"seed": [1, 2]}, {}, "seeds are tune.seeds"),
])
def test_impossible_search_space_is_a_clear_error(tmp_path, space, tune, message):
    path = write_sweep(tmp_path, "bad", space=space, tune=tune)
    with pytest.raises(ConfigError, match=message) as err:
        Tuner(load_spec(str(path)), root=tmp_path)
    assert "\n" not in err.value.render().split("  fix:")[0].strip()  # one line (+ an optional fix line)


def test_conditional_parameters_are_sampled_only_with_their_parent():
    import optuna

    from pipeline.tune import space as sp

    params = sp.parse_space({"algorithm": {"type": "categorical", "choices": ["ppo", "grpo"], "then": {
        "ppo": {"algorithm.cliprange": {"type": "float", "low": 0.1, "high": 0.3},
                "algorithm.kl_coef": {"type": "float", "low": 0.05, "high": 0.5}},
        "grpo": {"algorithm.kl_coef": {"type": "float", "low": 0.001, "high": 0.01}}}}})
    names = [p.name for p in sp.walk(params)]
    assert names == ["algorithm", "algorithm.cliprange", "algorithm.kl_coef|algorithm=ppo",
                     "algorithm.kl_coef|algorithm=grpo"]  # one range per branch
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = sp.suggest(trial, params)
        seen.add(values["algorithm"])
        if values["algorithm"] == "ppo":
            assert set(values) == {"algorithm", "algorithm.cliprange", "algorithm.kl_coef"}
            assert 0.05 <= values["algorithm.kl_coef"] <= 0.5
        else:
            assert set(values) == {"algorithm", "algorithm.kl_coef"} and values["algorithm.kl_coef"] <= 0.01
        assert sp.assignments_of(trial.params, params) == values
        study.tell(trial, 0.0)
    assert seen == {"ppo", "grpo"}


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_validates_against_the_pipeline(name, tmp_path):
    tuner = Tuner(load_spec(name), root=tmp_path)
    assert tuner.seed_stages and set(tuner.seed_stages) <= set(tuner.stage_names)
    assert "sft" not in tuner.seed_stages and "rm" not in tuner.seed_stages  # policy sweeps reuse SFT and RM
    if tuner.spec.pbt is not None:  # population-based training: its settings against the pipeline too
        from pipeline.tune.pbt import Population

        assert Population(tuner).stage == "rl"


def test_seeds_apply_to_the_stages_the_space_changes(tmp_path):
    t = Tuner(load_spec(str(write_sweep(tmp_path, "rl", space={"rl.optim.lr": [1e-4, 1e-3]}))), root=tmp_path)
    assert t.seed_stages == ["rl", "eval"]
    assert t.seed_overrides(7) == ["stages.rl.seed=7", "stages.eval.seed=7"]
    t = Tuner(load_spec(str(write_sweep(tmp_path, "rm", space={"task.label_noise": [0.0, 0.2]}))), root=tmp_path)
    assert t.seed_stages == ["rm", "rl", "eval"]  # label noise changes the RM (SFT ignores it)
    t = Tuner(load_spec(str(write_sweep(tmp_path, "all", space={"rl.optim.lr": [1e-4, 1e-3]},
                                        tune={"seed_stages": ["sft"]}))), root=tmp_path)
    assert t.seed_stages == ["sft", "rm", "rl", "eval"]  # the spec says otherwise: SFT varies too


def test_curve_pruning_under_ddp_spawn_is_refused_up_front(tmp_path):
    path = write_sweep(tmp_path, "ddp", base=["trainer=ddp"], tune={"pruner": "median"})
    with pytest.raises(ConfigError, match="cannot send back from its worker processes") as err:
        Tuner(load_spec(str(path)), root=tmp_path)
    assert "tune.pruner=wilcoxon" in err.value.fix
    Tuner(load_spec(str(path), ["pruner=wilcoxon", "seeds=[0,1]"]), root=tmp_path)  # between seeds: fine


# ----------------------------------------------------------------------------- a small study
def test_small_study_writes_best_trials_and_test_results(study1):
    result, study = study1
    d = result.study_dir
    for name in ("best.yaml", "experiment/best.yaml", "trials.csv", "test_results.json", "test_results.csv",
                 "summary.json", "storage.journal"):
        assert (d / name).is_file(), name
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    rows = (d / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("number,state,eval/gold_reward,eval/gold_reward@seed0")
    best = max(trials, key=lambda t: t.value)
    assert result.summary["best"]["trial"] == best.number
    assert (d / "best.yaml").read_text() == (d / "experiment" / "best.yaml").read_text()
    assert result.summary["presets"]["best"]["reproduces_trial"] is True
    assert result.summary["search_space"][0] == {"key": "algorithm.kl_coef", "type": "float", "low": 0.01,
                                                 "high": 0.5, "log": True}
    assert result.summary["budget"]["n_trials"] == 3


def test_trial_attributes_record_overrides_dirs_fingerprints_and_metrics(study1):
    _, study = study1
    for t in study.get_trials():
        a = t.user_attrs
        assert a["overrides"][:len(BASE)] == BASE and a["overrides"][-2].startswith("algorithm.kl_coef=")
        assert set(a["sampled"]) == {"algorithm.kl_coef", "rl.optim.lr"}
        assert Path(a["output_dir"]).is_dir() and a["seeds"] == [0, 1]
        assert [r["seed"] for r in a["runs"]] == [0, 1]
        for r in a["runs"]:
            assert set(r["fingerprints"]) == {"sft", "rm", "rl", "eval"}
            assert json.loads((Path(r["output_dir"]) / "results.json").read_text())["stages"]["eval"][
                "fingerprint"] == r["fingerprints"]["eval"]
        # the score is the mean over the tuning seeds
        per_seed = a["values_per_seed"]["eval/gold_reward"]
        assert t.value == pytest.approx(sum(per_seed) / 2) and a["values"]["eval/gold_reward"] == t.value
        assert a["metrics"]["rl"]["train/steps"] == 4 and "eval/kl" in a["metrics"]["eval"]
        assert a["worker"]["pid"] and a["heartbeat"]


def test_sft_and_reward_model_run_once_per_study(study1, root):
    _, study = study1
    arts = root / "outputs" / "artifacts"
    assert len(list(arts.glob("sft-*"))) == 1 and len(list(arts.glob("reward-*"))) == 1
    runs = [r for t in study.get_trials() for r in t.user_attrs["runs"]]
    built = [(r["reused"]["sft"], r["reused"]["rm"]) for r in runs]
    assert built[0] == (False, False) and all(b == (True, True) for b in built[1:])
    # the tuning seed varies the tuned stages only: one SFT/RM fingerprint, one RL per trial and seed
    assert len({r["fingerprints"]["sft"] for r in runs}) == 1
    assert len({r["fingerprints"]["rl"] for r in runs}) == len(runs) == 6


def test_intermediate_values_are_the_held_out_curve_of_every_seed(study1):
    _, study = study1
    for t in study.get_trials():
        # eval/gold_reward at rl steps 2 and 4 of seed 0, then seed 1 continues after step 4
        assert sorted(t.intermediate_values) == [2, 4, 7, 9]
        curve = [json.loads(x) for x in (Path(t.user_attrs["runs"][0]["output_dir"]) / "stages" / "rl" /
                                         "curve.jsonl").read_text().splitlines()]
        assert t.intermediate_values[4] == pytest.approx([p for p in curve if p["step"] == 4][0]["eval/gold_reward"])


def test_test_seeds_are_disjoint_and_reported_separately(study1):
    result, study = study1
    doc = json.loads((result.study_dir / "test_results.json").read_text())
    assert doc["tuning_seeds"] == [0, 1] and doc["test_seeds"] == [5]
    assert not set(doc["tuning_seeds"]) & set(doc["test_seeds"])
    (config,) = doc["configs"]
    best = study.best_trial
    assert config["trial"] == best.number
    assert config["tuning"]["eval/gold_reward"]["mean"] == pytest.approx(best.value)
    test = config["test"]["eval/gold_reward"]
    assert set(test["per_seed"]) == {"5"} and test["std"] == 0.0
    assert config["gap"]["eval/gold_reward"] == pytest.approx(best.value - test["mean"])
    run = json.loads((Path(config["run_dirs"]["5"]) / "run.json").read_text())
    assert run["stages"]["sft"]["reused"] and run["stages"]["rm"]["reused"] and not run["stages"]["rl"]["reused"]
    assert "stages.rl.seed=5" in run["overrides"]


def test_best_yaml_runs_as_an_experiment_and_reproduces_the_recorded_score(study1, root):
    result, study = study1
    best = study.best_trial
    proc = run_cli(["--config-dir", str(result.study_dir), "experiment=best", "force_stages=[rl,eval]",
                    "print_summary=false"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in (root / "outputs" / "runs").glob("*/*") if (p / "results.json").is_file()]
    res = json.loads((run_dir / "results.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    assert not info["stages"]["rl"]["reused"]  # recomputed, not read from the cache
    assert res["stages"]["eval"]["metrics"]["eval/gold_reward"] == best.user_attrs["values_per_seed"][
        "eval/gold_reward"][0]  # the first tuning seed (0) is the preset's seed
    assert res["stages"]["rl"]["fingerprint"] == best.user_attrs["runs"][0]["fingerprints"]["rl"]


def test_rerunning_a_finished_study_resumes_it_and_respects_the_budget(study1, root):
    result, study = study1
    before = [(t.number, t.value) for t in study.get_trials()]
    again = run_study(str(root / "small.yaml"), root=root)  # the same command
    assert [(t.number, t.value) for t in load_study(again.study_dir, "small").get_trials()] == before
    more = run_study(str(root / "small.yaml"), tune=["n_trials=4"], root=root)  # a larger budget: one more
    trials = load_study(more.study_dir, "small").get_trials()
    assert len(trials) == 4 and [(t.number, t.value) for t in trials[:3]] == before


def test_resuming_with_another_search_space_is_refused(study1, root):
    path = write_sweep(root, "small2", space={"algorithm.kl_coef": [0.1, 0.2]}, tune={"study_name": "small"})
    with pytest.raises(ConfigError, match="study 'small' exists .* with a different space"):
        run_study(str(path), root=root)


# ----------------------------------------------------------------------------- pruning, failures
def test_pruning_stops_a_clearly_bad_trial(root):
    """Two trials rewarded +1, then one rewarded -1: the median pruner stops it at its first step."""
    fns = ["tests.tune_helpers:high", "tests.tune_helpers:low"]
    path = write_sweep(root, "prune", base=["rl.reward_source=callable", "rl.reward_fn=tests.tune_helpers:high",
                                            "trainer.log_every_n_steps=1", "rl.total_steps=6"],
                       space={"rl.reward_fn": fns, "algorithm.kl_coef": [0.05, 0.1, 0.2]},
                       enqueue=[{"rl.reward_fn": fns[0], "algorithm.kl_coef": 0.05},
                                {"rl.reward_fn": fns[0], "algorithm.kl_coef": 0.1},
                                {"rl.reward_fn": fns[1], "algorithm.kl_coef": 0.2}],
                       tune={"n_trials": 3, "test_seeds": [], "pruner": {
                           "name": "median", "metric": "rollout/reward_mean", "options": {"n_startup_trials": 2}}})
    result = run_study(str(path), root=root)
    trials = load_study(result.study_dir, "prune").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    bad = trials[2]
    assert bad.user_attrs["pruned_at"]["step"] == 1 and bad.user_attrs["pruned_at"]["value"] == -1.0
    assert max(bad.intermediate_values) == 1 < max(trials[0].intermediate_values) == 6
    assert not (Path(bad.user_attrs["output_dir"]) / "seed-0" / "results.json").exists()  # nothing published
    import csv

    rows = list(csv.DictReader((result.study_dir / "trials.csv").open()))
    assert rows[2]["state"] == "PRUNED" and rows[2]["eval/gold_reward"] == ""  # no objective value
    assert rows[2]["pruned_step"] == "1" and rows[2]["pruned_value"] == "-1"


def test_failing_trials_are_recorded_with_their_reason_and_the_study_goes_on(root):
    fns = ["tests.tune_helpers:broken_reward", "tests.tune_helpers:nan_reward", "tests.tune_helpers:high"]
    path = write_sweep(root, "failing", base=["rl.reward_source=callable", "rl.reward_fn=tests.tune_helpers:high"],
                       space={"rl.reward_fn": fns, "algorithm.num_mini_batches": [1, 3]},
                       enqueue=[{"rl.reward_fn": f, "algorithm.num_mini_batches": 1} for f in fns]
                       + [{"rl.reward_fn": fns[2], "algorithm.num_mini_batches": 3}],  # 3 does not divide 4 prompts
                       tune={"n_trials": 4, "test_seeds": [], "fail_fast": 3})
    result = run_study(str(path), root=root)
    trials = load_study(result.study_dir, "failing").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "FAIL"]
    assert trials[0].user_attrs["fail_reason"] == "RuntimeError: reward service unavailable"
    assert "loss became nan" in trials[1].user_attrs["fail_reason"]
    assert trials[3].user_attrs["fail_reason"].startswith("algorithm.num_mini_batches: algorithm.num_mini_batches=3 "
                                                          "must divide the rollout batch")
    assert result.summary["best"]["trial"] == 2
    csv_text = (result.study_dir / "trials.csv").read_text()
    assert "RuntimeError: reward service unavailable" in csv_text


def test_a_study_whose_trials_all_fail_stops_instead_of_burning_the_budget(root):
    fns = ["tests.tune_helpers:broken_reward", "tests.tune_helpers:nan_reward"]
    path = write_sweep(root, "allfail", base=["rl.reward_source=callable", "rl.reward_fn=tests.tune_helpers:high"],
                       space={"rl.reward_fn": fns}, tune={"n_trials": 10, "fail_fast": 2})
    with pytest.raises(TrainingError, match="first 2 trials all failed") as err:
        run_study(str(path), root=root)
    assert "re-run the same command" in err.value.fix
    assert len(load_study(root / "outputs" / "studies" / "allfail", "allfail").get_trials()) == 2


def test_multi_objective_study_returns_the_pareto_front(root, capsys):
    from rich.console import Console

    path = write_sweep(root, "pareto", objectives={"eval/gold_reward": "maximize", "eval/kl": "minimize"},
                       tune={"n_trials": 4, "sampler": "random", "pruner": "hyperband", "test_top_k": 1})
    result = run_study(str(path), root=root, console=Console(force_terminal=False, width=200))
    out = capsys.readouterr().out
    assert "Optuna cannot prune multi-objective studies" in out and "without pruning" in out
    study = load_study(result.study_dir, "pareto")
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all(not t.intermediate_values for t in done)
    front = [p["trial"] for p in result.summary["pareto_front"]]
    assert front and sorted(front) == sorted(t.number for t in study.best_trials)
    for t in done:  # no trial outside the front dominates a front trial
        for f in (x for x in done if x.number in front):
            assert not (t.values[0] >= f.values[0] and t.values[1] <= f.values[1] and t.values != f.values)
    assert result.summary["hypervolume"] >= 0 and len(result.summary["hypervolume_reference"]) == 2
    assert (result.study_dir / "experiment" / f"trial_{front[0]}.yaml").is_file()
    assert len(result.tests) == 1


def test_constraints_mark_trials_infeasible_and_the_best_is_feasible(root):
    path = write_sweep(root, "constrained", constraints=["eval/kl <= -1000"], tune={"n_trials": 2})
    result = run_study(str(path), root=root)
    trials = load_study(result.study_dir, "constrained").get_trials()
    assert all(t.user_attrs["feasible"] is False and t.constraints["eval/kl <= -1000"] > 0 for t in trials)
    assert "best" not in result.summary and not (result.study_dir / "best.yaml").exists()


def test_each_trial_is_a_wandb_run_in_the_study_group(root, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_sweep(root, "tracked", base=["logger=wandb"], space={"algorithm.kl_coef": [0.3]},
                       tune={"n_trials": 1, "test_seeds": []})
    result = run_study(str(path), root=root)
    trial_dir = result.study_dir / "trials" / "0000"
    (log,) = list(trial_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "tracked" and run.display_name == "tracked/trial-0" and run.job_type == "tune-trial"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["algorithm.kl_coef"] == 0.3 and config["trial"] == 0
    summary = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update if u.key}
    value = load_study(result.study_dir, "tracked").get_trials()[0].value
    assert summary["state"] == "COMPLETE" and math.isclose(summary["eval/gold_reward"], value)
    # the trial's stage runs are in the study's group too
    (stage_log,) = list(Path(load_study(result.study_dir, "tracked").get_trials()[0].user_attrs["runs"][0][
        "output_dir"]).joinpath("stages", "rl").glob("wandb/offline-run-*/run-*.wandb"))
    stage_run = next(r.run for r in wandb_records(stage_log) if r.WhichOneof("record_type") == "run")
    assert stage_run.run_group == "tracked" and stage_run.display_name == "tracked/t0/s0/rl"


def test_every_sampler_and_pruner_runs_the_space(tmp_path):
    import optuna

    from pipeline.tune import space as sp
    from pipeline.tune.spec import PRUNERS, SAMPLERS

    path = write_sweep(tmp_path, "samplers", space={"algorithm.kl_coef": {"type": "float", "low": 0.1, "high": 0.3,
                                                                          "step": 0.1},
                                                    "algorithm.ppo_epochs": {"type": "int", "low": 1, "high": 2},
                                                    "algorithm.temperature": [0.7, 1.0]})
    tuner = Tuner(load_spec(str(path)), root=tmp_path)
    for name in SAMPLERS:
        tuner.t.sampler.name, tuner.t.sampler.options = name, {}
        tuner.grid = sp.check_grid(tuner.params) if name == "grid" else None
        study = optuna.create_study(sampler=tuner.sampler(0), direction="maximize")
        for i in range(3):
            trial = study.ask()
            study.sampler = tuner.sampler(trial.number)  # what a worker does for each trial
            values = sp.suggest(trial, tuner.params)
            assert values["algorithm.kl_coef"] in (0.1, 0.2, 0.30000000000000004, 0.3)
            study.tell(trial, float(i))
    for name in PRUNERS:
        tuner.t.pruner.name = tuner.pruner_name = name
        assert isinstance(tuner.pruner(), optuna.pruners.BasePruner)
    tuner.t.sampler.options = {"n_startup_trails": 3}
    tuner.t.sampler.name = "tpe"
    with pytest.raises(ConfigError, match="TPESampler has no option 'n_startup_trails' "
                                          "\\(did you mean 'n_startup_trials'\\?\\)"):
        tuner.sampler(0)


def test_wilcoxon_prunes_between_seeds_on_final_scores(root):
    path = write_sweep(root, "wilcoxon", space={"algorithm.kl_coef": [0.05, 0.3]},
                       tune={"n_trials": 2, "seeds": [0, 1], "test_seeds": [], "pruner": "wilcoxon"})
    result = run_study(str(path), root=root)
    for t in load_study(result.study_dir, "wilcoxon").get_trials():
        # one intermediate value per seed: that seed's final objective (not the training curve)
        assert sorted(t.intermediate_values) == [0, 1]
        assert [t.intermediate_values[k] for k in (0, 1)] == t.user_attrs["values_per_seed"]["eval/gold_reward"]


def test_nothing_below_the_tuner_imports_it():
    """tune/ sits above run.py (it composes configs and calls plan / run_pipeline); only the
    reports and the dashboard, above it, read studies through it."""
    import re

    pkg = Path(__file__).resolve().parent.parent / "pipeline"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        if not rel.startswith(("tune/", "report/", "dashboard.py")):
            assert not re.search(r"(from|import) pipeline\.tune", path.read_text()), rel
