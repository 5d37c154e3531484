"""The report of a study (``python -m pipeline.tune``: ``outputs/studies/<name>/``, see
:mod:`pipeline.tune.outputs`): settings and best configuration(s), optimisation history, parameter
importances (Optuna's fANOVA evaluator), parallel coordinates, slice plots, the Pareto front and
hypervolume history (several objectives), intermediate values with pruned trials marked, the trial
timeline across workers, and the best configuration(s) on tuning vs test seeds.

Trials are read from the study's storage (the journal file in the directory, the database named
in ``summary.json``, or ``storage=``); when it cannot be opened (a database URL whose password
was masked, a server that is down), from ``trials.csv``.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.report import plots, study_plots
from pipeline.report.data import Problems, read_json
from pipeline.report.page import Page, fmt

#: parameters drawn in the slice and parallel-coordinate plots at most (most important first)
MAX_PARAMS = 8


@dataclass
class TrialRecord:
    number: int
    state: str
    #: objective values of a complete trial (in the study's objective order), else None
    values: list[float] | None
    #: override key -> sampled value
    params: dict
    intermediate: dict = field(default_factory=dict)
    start: dt.datetime | None = None
    complete: dt.datetime | None = None
    worker: str | None = None
    feasible: bool = True
    seconds: float | None = None
    fail_reason: str | None = None


@dataclass
class StudyData:
    dir: Path
    name: str
    summary: dict | None
    objectives: list[dict]
    trials: list[TrialRecord]
    #: the Optuna study (None when read from trials.csv)
    study: object | None
    tests: dict | None
    problems: Problems
    source: str


def _worker(w) -> str | None:
    if not w:
        return None
    return f"{w.get('host')}:{w.get('pid')}" if isinstance(w, dict) else str(w)


def _from_study(study, objectives: list[dict]) -> list[TrialRecord]:
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        values = None
        if t.state.name == "COMPLETE":
            named = a.get("values") or {}
            values = [named.get(o["metric"]) for o in objectives] if named else list(t.values or [])
        out.append(TrialRecord(
            t.number, t.state.name, values, dict(a.get("sampled") or t.params), dict(t.intermediate_values),
            t.datetime_start, t.datetime_complete, _worker(a.get("worker")), a.get("feasible", True) is not False,
            a.get("seconds"), a.get("fail_reason")))
    return out


def _cell(text: str):
    from pipeline.report.multirun import parse_value

    return None if text == "" else parse_value(text)


def _time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _from_csv(path: Path, objectives: list[dict], keys: list[str], problems: Problems) -> list[TrialRecord]:
    out = []
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                values = [_cell(row.get(o["metric"], "")) for o in objectives]
                pruned = {}
                if row.get("pruned_step") and row.get("pruned_value"):
                    pruned = {int(float(row["pruned_step"])): float(row["pruned_value"])}
                out.append(TrialRecord(
                    int(row["number"]), row.get("state", "?"), values if row.get("state") == "COMPLETE" else None,
                    {k: _cell(row.get(k, "")) for k in keys if row.get(k, "") != ""}, pruned,
                    _time(row.get("started")), _time(row.get("completed")), row.get("worker") or None,
                    row.get("feasible", "") not in ("False", "false"), _cell(row.get("seconds", "")),
                    row.get("fail_reason") or None))
    except FileNotFoundError:
        problems.add(f"no trials.csv ({path})")
    except (OSError, KeyError, ValueError, csv.Error) as err:
        problems.add(f"trials.csv is unreadable ({path}: {err})")
    return out


def open_study(study_dir: Path, summary: dict | None, storage: str | None, problems: Problems):
    """(study, where) from ``storage``, the journal in the directory or the storage in summary.json."""
    import optuna

    from pipeline.tune.storage import JOURNAL_FILE, is_database, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or (summary or {}).get("storage")
    if not url or (not is_database(url) and not Path(url).exists()):
        url = str(study_dir / JOURNAL_FILE) if (study_dir / JOURNAL_FILE).exists() else None
    if url is None:
        problems.add("no study storage (storage.journal) in the directory: trials read from trials.csv (no "
                     "intermediate values, no fANOVA over the real distributions)")
        return None, None
    if is_database(url) and "***" in url:
        problems.add(f"the study's database URL has a masked password ({url}): trials read from trials.csv; pass "
                     f"--storage <url> for intermediate values and the full trial records")
        return None, None
    try:
        st = open_storage(url, study_dir)
        names = [s.study_name for s in optuna.study.get_all_study_summaries(st, include_best_trial=False)]
        name = (summary or {}).get("study") or (names[0] if len(names) == 1 else None)
        if name not in names:
            problems.add(f"study {name!r} not in {url} (it holds {', '.join(names) or 'none'})")
            return None, None
        return optuna.load_study(study_name=name, storage=st), url
    except Exception as err:  # noqa: BLE001 - a down server: fall back to the CSV
        problems.add(f"cannot open the study storage {url}: {str(err).strip().splitlines()[0]}; trials read "
                     f"from trials.csv")
        return None, None


def load_study_data(study_dir: Path, storage: str | None = None) -> StudyData:
    study_dir = Path(study_dir)
    problems = Problems()
    summary = read_json(study_dir / "summary.json", problems, "summary.json (written when the study finishes)")
    study, where = open_study(study_dir, summary, storage, problems)
    objectives = list((summary or {}).get("objectives") or [])
    if not objectives and study is not None:
        objectives = list(study.user_attrs.get("objectives") or [])
        if not objectives:
            objectives = [{"metric": f"objective {i}", "direction": d.name.lower()} for i, d in enumerate(study.directions)]
    keys = [p["key"] for p in (summary or {}).get("search_space") or (study.user_attrs.get("space") if study else [])
            or []]
    if study is not None:
        trials = _from_study(study, objectives)
        source = f"study storage {where}"
    else:
        if not objectives:  # trials.csv alone: objectives are the columns before the seeds
            problems.add("no summary.json and no storage: objectives unknown")
        trials = _from_csv(study_dir / "trials.csv", objectives, keys, problems)
        source = "trials.csv"
    tests = read_json(study_dir / "test_results.json", problems, required=False)
    name = (summary or {}).get("study") or (study.study_name if study is not None else study_dir.name)
    return StudyData(study_dir, name, summary, objectives, trials, study, tests, problems, source)


# ----------------------------------------------------------------------------- computations
def param_keys(data: StudyData) -> list[str]:
    keys = [p["key"] for p in (data.summary or {}).get("search_space") or []]
    seen = list(dict.fromkeys(k for t in data.trials for k in t.params))
    return list(dict.fromkeys([k for k in keys if k in seen] + seen))


def importances(data: StudyData, why: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Optuna's fANOVA importances (seeded) per objective, over the study's own distributions (or a
    study rebuilt from the records when only trials.csv could be read). Objectives whose importances
    are undefined (fewer than two complete trials, an objective that never varied) are left out, with
    the reason appended to ``why``."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    why = why if why is not None else []
    study = data.study if data.study is not None else _rebuild(data)
    out = {}
    complete = [t for t in data.trials if t.state == "COMPLETE" and t.values]
    if len(complete) < 2:
        why.append(f"importances need at least two complete trials ({len(complete)} so far)")
        return out
    for i, o in enumerate(data.objectives):
        values = {round(t.values[i], 12) for t in complete if i < len(t.values) and plots.is_number(t.values[i])}
        if len(values) < 2:
            why.append(f"{o['metric']} is the same in every complete trial: no parameter explains any of it")
            continue
        with _quiet():
            try:
                imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                            target=lambda t, i=i: t.values[i])
            except (RuntimeError, ValueError, ZeroDivisionError, optuna.exceptions.OptunaError) as err:
                why.append(f"importances of {o['metric']}: {str(err).strip().splitlines()[0]}")
                continue
        out[o["metric"]] = {str(k): float(v) for k, v in imp.items()}
    return out


def _quiet():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield

    return ctx()


def _rebuild(data: StudyData):
    """An in-memory Optuna study of the complete trials with distributions guessed from the values."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    keys = param_keys(data)
    complete = [t for t in data.trials if t.state == "COMPLETE" and t.values and all(k in t.params for k in keys)]
    dists = {}
    for k in keys:
        vals = [t.params[k] for t in complete]
        if vals and all(plots.is_number(v) for v in vals):
            lo, hi = min(vals), max(vals)
            dists[k] = FloatDistribution(lo, hi if hi > lo else lo + 1e-12, log=lo > 0 and hi / lo >= 9.99)
        else:
            dists[k] = CategoricalDistribution(sorted({str(v) for v in vals}))
    study = optuna.create_study(directions=[o["direction"] for o in data.objectives] or ["maximize"])
    for t in complete:
        params = {k: (t.params[k] if isinstance(dists[k], FloatDistribution) else str(t.params[k])) for k in keys}
        values = [float(v) if plots.is_number(v) else float("nan") for v in t.values]
        with _quiet():
            try:
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=values))
            except ValueError:
                continue
    return study


def pareto_front(data: StudyData) -> set[int]:
    """Numbers of the feasible complete trials no other one dominates."""
    pts = [(t.number, _minimised(data, t.values)) for t in data.trials
           if t.state == "COMPLETE" and t.feasible and t.values and all(plots.is_number(v) for v in t.values)]
    front = set()
    for n, p in pts:
        if not any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p)) for _, q in pts):
            front.add(n)
    return front


def _minimised(data: StudyData, values) -> list[float]:
    return [-v if o["direction"] == "maximize" else v for o, v in zip(data.objectives, values)]


def hypervolume_history(data: StudyData, reference: list[float] | None) -> list[tuple[int, float]]:
    """Hypervolume of the front of the trials up to each complete trial (trial-number order)."""
    import numpy as np

    pts = [(t.number, _minimised(data, t.values)) for t in sorted(data.trials, key=lambda t: t.number)
           if t.state == "COMPLETE" and t.feasible and t.values and all(plots.is_number(v) for v in t.values)]
    if not pts:
        return []
    if reference is None or len(reference) != len(data.objectives):
        ref = np.max(np.array([p for _, p in pts]), axis=0)
    else:
        ref = np.array(_minimised(data, reference), dtype=float)
    out = []
    for k in range(1, len(pts) + 1):
        sub = np.array([p for _, p in pts[:k]], dtype=float)
        sub = sub[(sub <= ref).all(axis=1)]
        out.append((pts[k - 1][0], _hv(sub, ref) if len(sub) else 0.0))
    return out


def _hv(points, ref) -> float:
    try:
        from optuna._hypervolume import compute_hypervolume

        return float(compute_hypervolume(points, ref))
    except ImportError:  # pragma: no cover - two objectives by hand
        order = points[points[:, 0].argsort()]
        hv, prev = 0.0, ref[1]
        for x, y in order:
            if y < prev:
                hv += (ref[0] - x) * (prev - y)
                prev = y
        return hv


# ----------------------------------------------------------------------------- sections
def overview_section(page: Page, data: StudyData) -> None:
    page.section("Study")
    s = data.summary or {}
    if s.get("description"):
        page.text(s["description"])
    page.text(f"trials read from {data.source}", muted=True)
    from collections import Counter

    states = Counter(t.state for t in data.trials)
    rows = [["objectives", ", ".join(f"{o['metric']} ({o['direction']})" for o in data.objectives)],
            ["trials", ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items())) or "none"]]
    if s.get("constraints"):
        rows.append(["constraints", ", ".join(s["constraints"])])
    if s.get("sampler"):
        rows.append(["sampler", f"{s['sampler'].get('name')} (seed {s['sampler'].get('seed')})"])
    if s.get("pruner"):
        rows.append(["pruner", f"{s['pruner'].get('name')} on {s['pruner'].get('metric')}"])
    if s.get("seeds"):
        rows.append(["seeds", f"tuning {s['seeds'].get('tuning')}, test {s['seeds'].get('test')}, seeded stages "
                              f"{s['seeds'].get('stages')}"])
    if s.get("budget"):
        rows.append(["budget", ", ".join(f"{k}={v}" for k, v in s["budget"].items())])
    if s.get("storage"):
        rows.append(["storage", s["storage"]])
    page.table(["", ""], rows, text_cols=(0, 1))
    for p in data.problems:
        page.note(p)
    if s.get("best"):
        b = s["best"]
        page.heading(f"best: trial {b.get('trial')}  {data.objectives[0]['metric']} = {fmt(b.get('value'))}")
        page.table(["parameter", "value"], [[k, v] for k, v in (b.get("sampled") or {}).items()], text_cols=(0, 1))
    if s.get("pareto_front"):
        metrics = [o["metric"] for o in data.objectives]
        page.heading(f"Pareto front (hypervolume {fmt(s.get('hypervolume'))}, reference "
                     f"{s.get('hypervolume_reference')})")
        keys = list(dict.fromkeys(k for p in s["pareto_front"] for k in (p.get("sampled") or {})))
        page.table(["trial"] + metrics + keys, [[p["trial"]] + [p["values"].get(m) for m in metrics]
                                                + [(p.get("sampled") or {}).get(k) for k in keys]
                                                for p in s["pareto_front"]])
    if (data.dir / "best.yaml").is_file():
        page.text(f"run the best configuration: python -m pipeline --config-dir {data.dir} experiment=best", muted=True)


def trials_section(page: Page, data: StudyData, keys: list[str]) -> None:
    metrics = [o["metric"] for o in data.objectives]
    rows = [[t.number, t.state.lower()] + [(t.values or [None] * len(metrics))[i] if t.values else None
                                           for i in range(len(metrics))]
            + [t.params.get(k) for k in keys] + [t.seconds, t.worker, t.fail_reason or ""]
            for t in sorted(data.trials, key=lambda t: t.number)]
    page.table(["trial", "state"] + metrics + keys + ["seconds", "worker", "failure"], rows,
               text_cols=(1, len(metrics) + len(keys) + 3, len(metrics) + len(keys) + 4), summary="all trials")


def build(study_dir: Path, storage: str | None = None) -> Page:
    data = load_study_data(study_dir, storage)
    page = Page(f"Study report: {data.name}", str(data.dir))
    overview_section(page, data)
    keys = param_keys(data)
    trials_section(page, data, keys)
    objs = data.objectives
    if not data.trials:
        page.note("the study has no trials")
        return page

    page.section("Optimisation history")
    with page.guard("the optimisation history"):
        fig = study_plots.history(data.trials, objs)
        if fig is None:
            page.note("no complete trial yet")
        else:
            page.figure(fig, "history", "Objective per complete trial (hollow: infeasible) and the best so far.")

    page.section("Parameter importances")
    imps: dict = {}
    with page.guard("the parameter importances"):
        why: list[str] = []
        imps = importances(data, why)
        for reason in why:
            page.note(reason, missing=False)
        fig = study_plots.importances(imps)
        if fig is not None:
            page.figure(fig, "importances", "How much of each objective's variance each parameter explains "
                        "(Optuna's fANOVA importance evaluator, seed 0).")
    ranked = list(dict.fromkeys([k for imp in imps.values() for k in imp if k in keys] + keys))[:MAX_PARAMS]

    page.section("Parameters and objectives")
    with page.guard("the parallel coordinates"):
        fig = study_plots.parallel_coordinates(data.trials, ranked, objs[0]) if objs else None
        if fig is not None:
            page.figure(fig, "parallel-coordinates", "Each complete trial as a line through its parameter values and "
                        f"{objs[0]['metric']}.")
    with page.guard("the slice plots"):
        rows = [{"params": t.params, "values": dict(zip([o["metric"] for o in objs], t.values))}
                for t in data.trials if t.state == "COMPLETE" and t.values]
        fig = plots.objective_vs_params(rows, ranked, [o["metric"] for o in objs],
                                        colors=[t.number for t in data.trials if t.state == "COMPLETE" and t.values])
        if fig is None:
            page.note("no complete trial to draw slice plots from", missing=False)
        else:
            page.figure(fig, "slices", "Slice plots: each objective against each parameter, one point per complete "
                        "trial (colour: trial number).")

    if len(objs) > 1:
        page.section("Pareto front")
        s = data.summary or {}
        reference = s.get("hypervolume_reference")
        with page.guard("the Pareto front"):
            fig = study_plots.pareto(data.trials, objs, pareto_front(data), reference)
            if fig is not None:
                page.figure(fig, "pareto-front", "Complete trials on the first two objectives; the front of the "
                            "feasible ones in red.")
        with page.guard("the hypervolume history"):
            fig = study_plots.hypervolume_history(hypervolume_history(data, reference))
            if fig is not None:
                page.figure(fig, "hypervolume-history", "Hypervolume dominated by the front of the trials so far "
                            f"(reference point {reference}).")

    page.section("Intermediate values and pruning")
    metric = ((data.summary or {}).get("pruner") or {}).get("metric") or (objs[0]["metric"] if objs else "value")
    with page.guard("the intermediate values"):
        fig = study_plots.intermediate(data.trials, metric)
        if fig is None:
            page.note("no intermediate values recorded (pruner none, or trials read from trials.csv)", missing=False)
        else:
            page.figure(fig, "intermediate-values", "What the pruner saw: the tuned stage's held-out metric during "
                        "training, seeds one after another; pruned trials end with an x.")

    page.section("Trial timeline")
    with page.guard("the timeline"):
        fig = study_plots.timeline(data.trials)
        if fig is None:
            page.note("no trial start times recorded")
        else:
            page.figure(fig, "timeline", "When each trial ran, on which worker (host:pid), and how it ended.")

    page.section("Tuning vs test seeds")
    configs = (data.tests or {}).get("configs") or []
    if not configs:
        page.note("no test-seed results (test_results.json: written after the trials, with tune.test_seeds)",
                  missing=False)
    else:
        with page.guard("the tuning vs test seeds"):
            fig = study_plots.tuning_vs_test(configs, objs)
            if fig is not None:
                page.figure(fig, "tuning-vs-test", "The best configuration(s) re-run on seeds the study never saw: "
                            "per-seed scores, mean ± std, and the gap (tuning mean − test mean).")
        rows = []
        for c in configs:
            for o in objs:
                tu, te = (c.get("tuning") or {}).get(o["metric"]) or {}, (c.get("test") or {}).get(o["metric"]) or {}
                rows.append([c.get("trial"), o["metric"], tu.get("mean"), tu.get("std"), te.get("mean"), te.get("std"),
                             (c.get("gap") or {}).get(o["metric"]), "; ".join((c.get("errors") or {}).values())])
        page.table(["trial", "objective", "tuning mean", "tuning std", "test mean", "test std", "gap", "errors"], rows,
                   text_cols=(1, 7))
    if data.summary:
        page.section("Settings")
        page.pre(json.dumps(data.summary, indent=2, default=str), summary="summary.json")
    return page
