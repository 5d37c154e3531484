"""The report of a Hydra multirun (``python -m pipeline -m ...``: ``outputs/multirun/<date>/<time>/<job>/``)
or of any directory of runs: one row per job (its swept overrides, headline metrics, which stages came
from the cache) and each objective against each swept parameter."""
from __future__ import annotations

from pathlib import Path

from pipeline.report import plots
from pipeline.report.data import DEFAULT_HEADLINE, RunData, headline_keys, is_run_dir, load_run
from pipeline.report.page import Page

#: objectives drawn against the parameters at most
MAX_OBJECTIVES = 6


def parse_value(text: str):
    """An override's value as YAML reads it (``0.1`` -> float, ``[a,b]`` -> text, ``k1`` -> str)."""
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if isinstance(v, (int, float, str, bool)) or v is None else text


def parse_overrides(overrides: list[str]) -> dict:
    out = {}
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep:
            out[key.lstrip("+~")] = parse_value(value)
    return out


def jobs(multirun_dir: Path) -> list[tuple[str, RunData]]:
    """The run directories in ``multirun_dir`` (Hydra's jobs ``0``, ``1``... in number order, or any
    runs: a day of ``outputs/runs``, a tuner trial's ``seed-<s>`` runs)."""
    dirs = [d for d in Path(multirun_dir).iterdir() if d.is_dir() and not d.name.startswith(".") and is_run_dir(d)]
    order = sorted(dirs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    return [(d.name, load_run(d)) for d in order]


def swept(params: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (in first-seen order)."""
    keys = list(dict.fromkeys(k for p in params for k in p))
    return [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]


def job_metrics(run: RunData) -> tuple[dict[str, float], list[str]]:
    """``stage:metric`` -> value for every final metric, and the headline ones (in stage order)."""
    values, headline = {}, []
    for st in run.stages:
        for k, v in st.metrics.items():
            if plots.is_number(v):
                values[f"{st.name}:{k}"] = v
        headline += [f"{st.name}:{k}" for k in headline_keys(st.metrics, list(st.headline) + list(DEFAULT_HEADLINE))]
    return values, headline


def choose_objectives(all_values: list[dict], headline: list[str]) -> list[str]:
    """Headline metrics that vary between jobs; the final evaluation's gold reward / KL first."""
    varying = [k for k in dict.fromkeys(headline)
               if len({round(v[k], 12) for v in all_values if k in v}) > 1]
    first = [k for m in ("eval/gold_reward", "eval/kl", "eval/win_rate") for k in reversed(varying)
             if k.endswith(":" + m)]
    return list(dict.fromkeys(first + varying))[:MAX_OBJECTIVES]


def short_names(keys: list[str]) -> dict[str, str]:
    """``stage:metric`` -> ``metric`` where the metric name alone is unambiguous, else ``metric [stage]``."""
    metric = [k.split(":", 1)[1] for k in keys]
    return {k: (m if metric.count(m) == 1 else f"{m} [{k.split(':', 1)[0]}]") for k, m in zip(keys, metric)}


def build(multirun_dir: Path) -> Page:
    multirun_dir = Path(multirun_dir)
    page = Page("Multirun report", str(multirun_dir))
    runs = jobs(multirun_dir)
    page.section("Jobs")
    if not runs:
        page.note("no run directories (with config.yaml, results.json or run.json) in this directory")
        return page
    params = [parse_overrides(r.overrides) for _, r in runs]
    keys = swept(params)
    common = [o for o in runs[0][1].overrides if o.partition("=")[0].lstrip("+~") not in keys]
    if common:
        page.text("common overrides: " + " ".join(common), muted=True)
    values, headline = [], []
    for _, r in runs:
        v, h = job_metrics(r)
        values.append(v)
        headline += h
    objectives = choose_objectives(values, headline)
    names = short_names(objectives)
    rows = []
    for (num, r), p, v in zip(runs, params, values):
        status = "done" if r.finished else ("failed: " + r.errors[-1] if r.errors else "unfinished")
        reused = [s.name for s in r.stages if s.reused]
        rows.append([num] + [p.get(k) for k in keys] + [status, ", ".join(reused) or "-"]
                    + [v.get(o) for o in objectives])
    page.table(["job"] + keys + ["status", "cached stages"] + [names[o] for o in objectives], rows,
               text_cols=tuple(range(len(keys) + 3)))
    failed = [(num, r) for num, r in runs if not r.finished]
    for num, r in failed:
        page.note(f"job {num}: " + ("; ".join(r.problems[:3]) or "unfinished"))
    all_heads = sorted({k for h in headline for k in [h]} - set(objectives))
    if all_heads:
        page.table(["job"] + all_heads, [[num] + [v.get(k) for k in all_heads] for (num, _), v in zip(runs, values)],
                   summary="other headline metrics")
    page.section("Objectives against swept parameters")
    if not keys:
        page.note("the jobs do not differ in any override: nothing was swept", missing=False)
    elif not objectives:
        page.note("no headline metric differs between the finished jobs")
    else:
        with page.guard("objectives against parameters"):
            fig = plots.objective_vs_params(
                [{"params": p, "values": {names[o]: v[o] for o in objectives if o in v}} for p, v in zip(params, values)],
                keys, [names[o] for o in objectives])
            if fig is not None:
                page.figure(fig, "objectives-vs-parameters", "Each objective (row) against each swept parameter "
                            "(column), one point per finished job.")
    return page
