"""Helpers for the report and dashboard tests: a synthetic two-objective study with known trials."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

#: (number, state, x, kind, values, worker) - the Pareto front of (maximize a, minimize b) is {0, 1, 3}
TRIALS = [
    (0, "COMPLETE", 0.1, "k1", (1.0, 1.0), 0),
    (1, "COMPLETE", 0.5, "k3", (2.0, 2.0), 1),
    (2, "COMPLETE", 0.9, "k1", (1.5, 3.0), 0),   # dominated by 1
    (3, "COMPLETE", 0.3, "k3", (3.0, 4.0), 1),
    (4, "PRUNED", 0.7, "k1", None, 0),
    (5, "FAIL", 0.2, "k3", None, 1),
    (6, "COMPLETE", 0.6, "k1", (0.5, 2.5), 0),   # dominated by 0
]
OBJECTIVES = [{"metric": "eval/gold_reward", "direction": "maximize", "stage": None},
              {"metric": "eval/kl", "direction": "minimize", "stage": None}]
NAME = "synthetic"


def make_study_dir(root: Path) -> Path:
    """``root/outputs/studies/synthetic``: a journal with the trials above (two workers, start and end
    times, intermediate values, one pruned, one failed), summary.json and test_results.json as the
    tuner writes them."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import FrozenTrial, TrialState

    from pipeline.tune.storage import JOURNAL_FILE, open_storage

    study_dir = Path(root) / "outputs" / "studies" / NAME
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(None, study_dir)
    study = optuna.create_study(study_name=NAME, storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", OBJECTIVES)
    dists = {"algorithm.kl_coef": FloatDistribution(0.01, 1.0, log=True),
             "algorithm.kl_estimator": CategoricalDistribution(["k1", "k3"])}
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    for number, state, x, kind, values, worker in TRIALS:
        params = {"algorithm.kl_coef": x, "algorithm.kl_estimator": kind}
        inter = {2: 0.1 * number, 4: 0.1 * number + 0.05} if state != "PRUNED" else {2: -1.0}
        attrs = {"sampled": params, "worker": {"host": "host", "pid": 100 + worker, "index": worker},
                 "seconds": 10.0}
        if values is not None:
            attrs["values"] = dict(zip([o["metric"] for o in OBJECTIVES], values))
        if state == "FAIL":
            attrs["fail_reason"] = "TrainingError: loss became nan"
        start = t0 + dt.timedelta(seconds=10 * (number // 2))
        study.add_trial(FrozenTrial(
            number=number, trial_id=number, state=getattr(TrialState, state), value=None,
            values=list(values) if values is not None else None, datetime_start=start,
            datetime_complete=start + dt.timedelta(seconds=9), params=params, distributions=dists,
            user_attrs=attrs, system_attrs={}, intermediate_values=inter))
    summary = {"study": NAME, "description": "synthetic study", "storage": str(study_dir / JOURNAL_FILE),
               "objectives": OBJECTIVES, "constraints": [],
               "search_space": [{"key": "algorithm.kl_coef", "type": "float", "low": 0.01, "high": 1.0, "log": True},
                                {"key": "algorithm.kl_estimator", "type": "categorical", "choices": ["k1", "k3"]}],
               "sampler": {"name": "nsga2", "seed": 0}, "pruner": {"name": "none", "metric": "eval/gold_reward"},
               "seeds": {"tuning": [0, 1], "test": [5, 6], "stages": ["rl", "eval"]},
               "budget": {"n_trials": 7, "timeout_s": None, "n_workers": 2},
               "pareto_front": [{"trial": n, "values": dict(zip([o["metric"] for o in OBJECTIVES], v)),
                                 "sampled": {"algorithm.kl_coef": x}} for n, _, x, _, v, _ in TRIALS if n in (0, 1, 3)],
               "hypervolume": 3.5, "hypervolume_reference": [0.5, 4.0]}
    (study_dir / "summary.json").write_text(json.dumps(summary))
    tests = {"configs": [{"trial": 3, "rank": 1,
                          "tuning": {"eval/gold_reward": {"mean": 3.0, "std": 0.1, "per_seed": {"0": 2.9, "1": 3.1}},
                                     "eval/kl": {"mean": 4.0, "std": 0.0, "per_seed": {"0": 4.0, "1": 4.0}}},
                          "test": {"eval/gold_reward": {"mean": 2.5, "std": 0.2, "per_seed": {"5": 2.3, "6": 2.7}},
                                   "eval/kl": {"mean": 4.2, "std": 0.1, "per_seed": {"5": 4.1, "6": 4.3}}},
                          "gap": {"eval/gold_reward": 0.5, "eval/kl": -0.2}, "errors": {}}]}
    (study_dir / "test_results.json").write_text(json.dumps(tests))
    return study_dir


def hparams_session(logdir: Path) -> tuple[dict, dict]:
    """(hyperparameters, last value of each scalar) of the TensorBoard HParams session in ``logdir``,
    read with TensorBoard's own event reader and HParams plugin protos."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (events,) = list(Path(logdir).glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in content
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
    metrics = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    return hp, metrics
