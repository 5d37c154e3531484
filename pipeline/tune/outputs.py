"""What a study leaves in its directory, and the test-seed re-runs.

Study directory (``outputs/studies/<study>/``, or ``tune.study_dir``)::

    storage.journal          the Optuna study (default storage; a database with tune.storage=...)
    trials.csv               one row per trial: state, objectives (mean and per seed), constraints,
                             sampled values, pruning step, failure reason, retries, directory
    best.yaml                the best configuration as an experiment preset
    experiment/best.yaml     the same, where Hydra finds it:
                             python -m pipeline --config-dir <study> experiment=best
    experiment/trial_<n>.yaml  multi-objective: one preset per Pareto-optimal trial
    test_results.json/.csv   the best configuration(s) re-run on the test seeds: per seed, mean,
                             std, and the tuning-vs-test gap
    summary.json             study settings (search space, budget, seeds, objectives), trial counts,
                             best trial(s) or Pareto front and hypervolume, test results
    trials/<n>/seed-<s>/     each trial's pipeline runs (config.yaml, results.json, run.json, stages/)
    test/trial-<n>/seed-<s>/ the test-seed runs
    logs/                    local worker logs; tune.log: the tuner's own log
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.tune import space as sp
from pipeline.tune.storage import FAIL_REASON, RETRY_OF, mask_url
from pipeline.tune.study import MissingMetric, Tuner

log = logging.getLogger("pipeline.tune")

BEST = "best.yaml"
TRIALS_CSV = "trials.csv"
TEST_JSON, TEST_CSV = "test_results.json", "test_results.csv"
SUMMARY = "summary.json"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def feasible(trial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------- trials.csv
def trials_table(tuner: Tuner, study) -> tuple[list[str], list[dict]]:
    trials = study.get_trials(deepcopy=False)
    keys = [p.key for p in sp.walk(tuner.params)]
    keys = list(dict.fromkeys(keys))
    metrics = [o.metric for o in tuner.objectives]
    seeds = list(tuner.t.seeds)
    cols = (["number", "state"] + metrics + [f"{m}@seed{s}" for m in metrics for s in seeds]
            + [c.text for c in tuner.constraints] + (["feasible"] if tuner.constraints else [])
            + keys + ["pruned_step", "pruned_value", "seconds", "fail_reason", "retry_of", "worker", "output_dir", "started",
                      "completed"])
    rows = []
    for t in trials:
        a = t.user_attrs
        row = {"number": t.number, "state": t.state.name}
        values = a.get("values") or {}  # complete trials only (a pruned trial's Optuna value is its last report)
        for m in metrics:
            row[m] = values.get(m)
        for m in metrics:
            for s, v in zip(seeds, (a.get("values_per_seed") or {}).get(m, [])):
                row[f"{m}@seed{s}"] = v
        for c in tuner.constraints:
            row[c.text] = (a.get("constraints") or {}).get(c.text)
        if tuner.constraints and t.state.name == "COMPLETE":
            row["feasible"] = feasible(t)
        sampled = a.get("sampled") or sp.assignments_of(t.params, tuner.params)
        for k in keys:
            row[k] = sampled.get(k)
        row["pruned_step"] = (a.get("pruned_at") or {}).get("step")
        row["pruned_value"] = (a.get("pruned_at") or {}).get("value")
        row["seconds"] = a.get("seconds")
        row["fail_reason"] = a.get(FAIL_REASON)
        row["retry_of"] = a.get(RETRY_OF)
        w = a.get("worker") or {}
        row["worker"] = f"{w.get('host')}:{w.get('pid')}" if w else None
        row["output_dir"] = a.get("output_dir")
        row["started"] = t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None
        row["completed"] = t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else None
        rows.append(row)
    return cols, rows


def write_trials_csv(tuner: Tuner, study) -> Path:
    cols, rows = trials_table(tuner, study)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    path = tuner.study_dir / TRIALS_CSV
    atomic_write(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------- best trials
def ranked(tuner: Tuner, study) -> list:
    """Single objective: feasible complete trials, best first. Several: the feasible Pareto
    front (Optuna's), ordered by the first objective."""
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    o = tuner.objectives[0]
    sign = -1.0 if o.direction == "maximize" else 1.0
    if tuner.multi:
        front = [t for t in study.best_trials if feasible(t)]
        return sorted(front, key=lambda t: (sign * t.values[0], t.number))
    return sorted(complete, key=lambda t: (sign * t.value, t.number))


def selected_for_test(tuner: Tuner, ranked_trials: list) -> list:
    k = tuner.t.test_top_k or (len(ranked_trials) if tuner.multi else 1)
    return ranked_trials[:k]


def hypervolume(tuner: Tuner, study, front: list) -> tuple[float | None, list[float] | None]:
    """Hypervolume of the front, in the objectives' own units, against a reference point: each
    objective's ``reference`` or the worst value of any feasible complete trial."""
    import numpy as np
    from optuna.trial import TrialState

    if not front:
        return None, None
    signs = np.array([1.0 if o.direction == "minimize" else -1.0 for o in tuner.objectives])
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    pts = np.array([t.values for t in complete]) * signs  # all minimised
    worst = pts.max(axis=0)
    ref = np.array([o.reference * s if o.reference is not None else w
                    for o, s, w in zip(tuner.objectives, signs, worst)])
    front_pts = np.array([t.values for t in front]) * signs
    front_pts = front_pts[(front_pts <= ref).all(axis=1)]
    if len(front_pts) == 0:
        return 0.0, (ref * signs).tolist()
    try:
        from optuna._hypervolume import compute_hypervolume

        hv = float(compute_hypervolume(front_pts, ref))
    except ImportError:  # pragma: no cover - two objectives, by hand
        order = front_pts[np.argsort(front_pts[:, 0])]
        hv, prev = 0.0, ref[1]
        for x, y in order:
            if y < prev:
                hv += (ref[0] - x) * (prev - y)
                prev = y
    return hv, (ref * signs).tolist()


# ----------------------------------------------------------------------------- presets
def _is_group(key: str) -> bool:
    from pipeline.config.compose import config_groups

    return "." not in key and "@" not in key and key in config_groups()


def preset_dict(tuner: Tuner, overrides: list[str], seed: int) -> tuple[list[str], dict]:
    """(defaults entries, values) of an experiment preset equivalent to ``overrides`` at ``seed``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    defaults, includes, values = [], [], {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_delete():
            log.warning("best.yaml: %s (a deletion) cannot be written in a preset; it is left out", o.input_line)
            continue
        if _is_group(key):
            if key == "experiment":
                includes.append(f"/experiment/{o.value()}@_here_")
            else:
                defaults.append(f"override /{key}: {o.value()}")
            continue
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = o.value()
    base_seed = int(tuner.base_cfg.seed)
    if int(seed) != base_seed:
        for name in tuner.seed_stages:
            values.setdefault("stages", {}).setdefault(name, {})["seed"] = int(seed)
    return includes + defaults, values


def preset_text(tuner: Tuner, trial, comments: list[str]) -> str:
    seed = tuner.t.seeds[0]
    defaults, values = preset_dict(tuner, trial.user_attrs["overrides"], seed)
    body = OmegaConf.to_yaml(OmegaConf.create(values)) if values else ""
    head = ["# @package _global_"] + [f"# {c}" for c in comments]
    lines = head
    if defaults:
        lines += ["defaults:"] + [f"  - {d}" for d in defaults] + ["  - _self_"]
    return "\n".join(lines) + "\n" + body


def _config_dir_context(extra_dir: Path):
    """A Hydra context whose search path also holds ``extra_dir`` (as ``--config-dir`` does)."""
    import contextlib

    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from pipeline.config import CONF_DIR

    @contextlib.contextmanager
    def ctx():
        gh = GlobalHydra.instance()
        if gh.is_initialized():
            import copy

            csp = copy.deepcopy(gh.hydra.config_loader.get_search_path())
        else:
            csp = create_config_search_path(str(CONF_DIR))
        backup = get_gh_backup()
        csp.prepend(provider="tune", path=f"file://{extra_dir}", anchor=SearchPathQuery(provider="schema"))
        gh.clear()
        Hydra.create_main_hydra2(task_name="tune", config_search_path=csp)
        try:
            yield
        finally:
            restore_gh_from_backup(backup)

    return ctx()


def verify_preset(tuner: Tuner, name: str, trial) -> str | None:
    """None if ``experiment=<name>`` from the study directory plans the trial's stages (first tuning
    seed) with the same fingerprints; else what differs."""
    return preset_problem(tuner, name, (trial.user_attrs.get("runs") or [{}])[0].get("fingerprints"))


def preset_problem(tuner: Tuner, name: str, want: dict | None) -> str | None:
    """None if ``experiment=<name>`` from the study directory plans stages with the fingerprints
    ``want`` (stage -> fingerprint); else what differs."""
    from pipeline.config import compose
    from pipeline.run import plan

    if not want:
        return None
    try:
        with _config_dir_context(tuner.study_dir):
            cfg = compose([f"experiment={name}"], root=tuner.root, output_dir=tuner.study_dir / "trials" / "check")
            got = {s.name: s.fingerprint for s in plan(cfg)}
    except Exception as err:  # noqa: BLE001
        return f"it does not compose: {str(err).strip().splitlines()[0]}"
    diff = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
    return f"stages {', '.join(diff)} get other settings" if diff else None


def write_presets(tuner: Tuner, study, ranked_trials: list, tests: dict | None) -> dict:
    """best.yaml (+ experiment/best.yaml, and experiment/trial_<n>.yaml for a Pareto front)."""
    out: dict = {}
    if not ranked_trials:
        return out
    exp = tuner.study_dir / "experiment"
    trials = ranked_trials if tuner.multi else ranked_trials[:1]
    for rank, t in enumerate(trials):
        values = t.user_attrs.get("values") or {}
        per_seed = t.user_attrs.get("values_per_seed") or {}
        comments = [f"{'Best' if rank == 0 else 'Pareto-optimal'} configuration of study {tuner.study_name!r}: "
                    f"trial {t.number}" + (" (Pareto front, best " + tuner.objectives[0].metric + ")"
                                           if tuner.multi and rank == 0 else "")]
        for o in tuner.objectives:
            seeds = ", ".join(f"{s}: {_fmt(v)}" for s, v in zip(tuner.t.seeds, per_seed.get(o.metric, [])))
            comments.append(f"{o.metric} ({o.direction}) = {_fmt(values.get(o.metric))} "
                            f"(mean over tuning seeds; {seeds})")
        test = (tests or {}).get(t.number)
        if test:
            for o in tuner.objectives:
                s = test["test"].get(o.metric)
                if s:
                    comments.append(f"test seeds {list(tuner.t.test_seeds)}: {o.metric} = {_fmt(s['mean'])} "
                                    f"+- {_fmt(s['std'])} (gap tuning - test: {_fmt(test['gap'].get(o.metric))})")
        comments.append(f"runs as it is (seed {tuner.t.seeds[0]} reproduces that seed's score):")
        name = "best" if rank == 0 else f"trial_{t.number}"
        comments.append(f"  python -m pipeline --config-dir {tuner.study_dir} experiment={name}")
        comments.append("another seed for the tuned stages (" + ", ".join(tuner.seed_stages) + "): add "
                        + " ".join(f"stages.{n}.seed=<s>" for n in tuner.seed_stages))
        text = preset_text(tuner, t, comments)
        atomic_write(exp / f"{name}.yaml", text)
        if rank == 0:
            atomic_write(tuner.study_dir / BEST, text)
        if tuner.multi:
            atomic_write(exp / f"trial_{t.number}.yaml", text)
        out[name] = {"trial": t.number, "path": str(exp / f"{name}.yaml")}
    problem = verify_preset(tuner, "best", trials[0])
    out["best"]["reproduces_trial"] = problem is None
    if problem:
        log.warning("best.yaml does not reproduce trial %d (%s); its overrides: %s", trials[0].number, problem,
                    " ".join(trials[0].user_attrs["overrides"]))
        text = (tuner.study_dir / BEST).read_text().replace(
            "# @package _global_\n", "# @package _global_\n# WARNING: this preset does not reproduce the trial ("
            + problem + "); run it with the trial's overrides instead (trials.csv / summary.json)\n", 1)
        atomic_write(tuner.study_dir / BEST, text)
        atomic_write(exp / "best.yaml", text)
    return out


# ----------------------------------------------------------------------------- test seeds
def _stats(xs: list[float]) -> dict:
    xs = [float(x) for x in xs]
    finite = [x for x in xs if math.isfinite(x)]
    return {"mean": sum(finite) / len(finite) if finite else float("nan"),
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "n": len(finite)}


def run_tests(tuner: Tuner, trials: list, on_run=None) -> dict:
    """Re-run each trial's configuration on the test seeds (stages shared through the cache)."""
    out = {}
    for rank, t in enumerate(trials, 1):
        per_seed: dict[str, dict] = {o.metric: {} for o in tuner.objectives}
        errors, dirs = {}, {}
        for seed in tuner.t.test_seeds:
            run_dir = tuner.study_dir / "test" / f"trial-{t.number}" / f"seed-{seed}"
            dirs[str(seed)] = str(run_dir)
            try:
                run = tuner.run_config(t.user_attrs["overrides"], seed, run_dir,
                                       run_name=f"{tuner.study_name}/test-t{t.number}/s{seed}")
                for o in tuner.objectives:
                    per_seed[o.metric][str(seed)] = run.metric(o.metric, o.stage)
            except MissingMetric:
                raise
            except Exception as err:  # noqa: BLE001 - a failed test seed is reported, the others still run
                errors[str(seed)] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                log.warning("test seed %s of trial %d failed: %s", seed, t.number, errors[str(seed)])
            if on_run is not None:
                on_run(t.number, seed)
        tuning = {o.metric: {**_stats((t.user_attrs.get("values_per_seed") or {}).get(o.metric, [])),
                             "per_seed": dict(zip(map(str, tuner.t.seeds),
                                                  (t.user_attrs.get("values_per_seed") or {}).get(o.metric, [])))}
                  for o in tuner.objectives}
        test = {m: {**_stats(list(v.values())), "per_seed": v} for m, v in per_seed.items() if v}
        gap = {m: tuning[m]["mean"] - test[m]["mean"] for m in test}
        out[t.number] = {"trial": t.number, "rank": rank, "overrides": t.user_attrs.get("overrides"),
                         "sampled": t.user_attrs.get("sampled"), "tuning": tuning, "test": test, "gap": gap,
                         "errors": errors, "run_dirs": dirs}
    return out


def write_tests(tuner: Tuner, tests: dict) -> None:
    doc = {"study": tuner.study_name, "tuning_seeds": list(tuner.t.seeds), "test_seeds": list(tuner.t.test_seeds),
           "seed_stages": tuner.seed_stages,
           "objectives": [{"metric": o.metric, "direction": o.direction} for o in tuner.objectives],
           "gap": "tuning mean - test mean", "configs": list(tests.values())}
    atomic_write(tuner.study_dir / TEST_JSON, json.dumps(doc, indent=2, default=float))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "rank", "split", "seed"] + [o.metric for o in tuner.objectives])
    for c in tests.values():
        for split in ("tuning", "test"):
            seeds = tuner.t.seeds if split == "tuning" else tuner.t.test_seeds
            for s in seeds:
                vals = [c[split].get(o.metric, {}).get("per_seed", {}).get(str(s)) for o in tuner.objectives]
                w.writerow([c["trial"], c["rank"], split, s] + [_fmt(v) for v in vals])
    atomic_write(tuner.study_dir / TEST_CSV, buf.getvalue())


# ----------------------------------------------------------------------------- summary
def summary(tuner: Tuner, study, ranked_trials: list, presets: dict, tests: dict | None) -> dict:
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    doc = {
        "study": tuner.study_name, "sweep": tuner.spec.name, "sweep_file": tuner.spec.path,
        "description": tuner.spec.description, "storage": mask_url(tuner.storage_url),
        "study_dir": str(tuner.study_dir),
        "objectives": [{"metric": o.metric, "direction": o.direction, "stage": o.stage} for o in tuner.objectives],
        "constraints": [c.text for c in tuner.constraints],
        "search_space": [p.describe() for p in sp.walk(tuner.params)],
        "overrides": tuner.base,
        "budget": {"n_trials": tuner.t.n_trials, "timeout_s": tuner.t.timeout, "n_workers": tuner.t.n_workers},
        "sampler": {"name": tuner.t.sampler.name, "seed": tuner.t.sampler.seed, "options": tuner.t.sampler.options},
        "pruner": {"name": tuner.pruner_name, "requested": tuner.t.pruner.name, "options": tuner.t.pruner.options,
                   "metric": tuner.t.pruner.metric or tuner.objectives[0].metric},
        "seeds": {"tuning": list(tuner.t.seeds), "test": list(tuner.t.test_seeds), "stages": tuner.seed_stages},
        "trials": {"total": len(trials), **{s: states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING",
                                                                          "WAITING")},
                   "seconds": round(sum(float(t.user_attrs.get("seconds") or 0) for t in trials), 1)},
        "presets": presets,
    }
    if tuner.multi:
        hv, ref = hypervolume(tuner, study, ranked_trials)
        doc["pareto_front"] = [{"trial": t.number, "values": dict(zip([o.metric for o in tuner.objectives], t.values)),
                                "sampled": t.user_attrs.get("sampled")} for t in ranked_trials]
        doc["hypervolume"] = hv
        doc["hypervolume_reference"] = ref
    elif ranked_trials:
        b = ranked_trials[0]
        doc["best"] = {"trial": b.number, "value": b.value, "values_per_seed": b.user_attrs.get("values_per_seed"),
                       "sampled": b.user_attrs.get("sampled"), "overrides": b.user_attrs.get("overrides")}
    if tests is not None:
        doc["test"] = {str(k): {"mean": {m: s["mean"] for m, s in v["test"].items()},
                                "std": {m: s["std"] for m, s in v["test"].items()}, "gap": v["gap"]}
                       for k, v in tests.items()}
    return doc


def write_summary(tuner: Tuner, doc: dict) -> None:
    atomic_write(tuner.study_dir / SUMMARY, json.dumps(doc, indent=2, default=str))
