"""Figures of an Optuna study (drawn with matplotlib from plain trial records, see
:class:`pipeline.report.study.TrialRecord`): optimisation history, parameter importances, parallel
coordinates, Pareto front and hypervolume history, intermediate values, trial timeline,
tuning-seed vs test-seed scores."""
from __future__ import annotations

import math

from matplotlib.figure import Figure

from pipeline.report.plots import _style, color, is_number

#: trial numbers are written next to points / bars up to this many trials
MAX_LABELS = 60

STATE_COLORS = {"COMPLETE": "#2ca02c", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#1f77b4",
                "WAITING": "#7f7f7f"}


def _best_so_far(values: list[float], maximize: bool) -> list[float]:
    out, best = [], None
    for v in values:
        best = v if best is None else (max(best, v) if maximize else min(best, v))
        out.append(best)
    return out


def history(trials, objectives: list[dict]) -> Figure | None:
    """Objective value per trial number (complete trials; infeasible ones hollow) and the best so far."""
    done = [t for t in trials if t.state == "COMPLETE" and t.values]
    if not done:
        return None
    fig = Figure(figsize=(5.2 * len(objectives), 3.4), layout="constrained")
    axes = fig.subplots(1, len(objectives), squeeze=False)[0]
    for i, (ax, o) in enumerate(zip(axes, objectives)):
        pts = [(t.number, t.values[i], t.feasible) for t in done if i < len(t.values) and is_number(t.values[i])]
        if not pts:
            continue
        feas = [p for p in pts if p[2]]
        ax.scatter([p[0] for p in feas], [p[1] for p in feas], color=color(0), s=22, label="trial", zorder=3)
        infeas = [p for p in pts if not p[2]]
        if infeas:
            ax.scatter([p[0] for p in infeas], [p[1] for p in infeas], facecolors="none", edgecolors=color(0), s=22,
                       label="infeasible", zorder=3)
        if feas:
            best = _best_so_far([p[1] for p in feas], o["direction"] == "maximize")
            ax.step([p[0] for p in feas], best, where="post", color=color(1), lw=1.4, label="best so far")
        _style(ax, f"{o['metric']} ({o['direction']})", "trial", o["metric"])
        ax.legend(fontsize=7)
    return fig


def importances(per_objective: dict[str, dict[str, float]]) -> Figure | None:
    """Horizontal bars: importance of each parameter, one panel per objective."""
    per_objective = {k: v for k, v in per_objective.items() if v}
    if not per_objective:
        return None
    n = max(len(v) for v in per_objective.values())
    fig = Figure(figsize=(4.8 * len(per_objective), 0.9 + 0.35 * n), layout="constrained")
    axes = fig.subplots(1, len(per_objective), squeeze=False)[0]
    for ax, (obj, imp) in zip(axes, per_objective.items()):
        names = list(imp)[::-1]
        ax.barh(range(len(names)), [imp[k] for k in names], color=color(0))
        for i, k in enumerate(names):
            ax.annotate(f"{imp[k]:.2f}", (imp[k], i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlim(0, max(1.0, max(imp.values()) * 1.15))
        _style(ax, f"importance for {obj}", "importance (fANOVA, normalised)")
    return fig


def _axis(values: list) -> tuple[list[float], list[str] | None, bool]:
    """Values -> positions in [0, 1] (log scale for positive numbers spanning a decade), tick labels."""
    if all(is_number(v) for v in values):
        xs = [float(v) for v in values]
        log = min(xs) > 0 and max(xs) / min(xs) >= 9.99
        ys = [math.log10(x) for x in xs] if log else xs
        lo, hi = min(ys), max(ys)
        span = hi - lo or 1.0
        return [(y - lo) / span for y in ys], None, log
    cats = sorted({str(v) for v in values})
    span = max(1, len(cats) - 1)
    return [cats.index(str(v)) / span for v in values], cats, False


def parallel_coordinates(trials, params: list[str], objective: dict, index: int = 0) -> Figure | None:
    """One line per complete trial through its parameter values and objective (colour: objective)."""
    done = [t for t in trials if t.state == "COMPLETE" and t.values and index < len(t.values)
            and is_number(t.values[index]) and all(t.params.get(p) is not None for p in params)]
    if len(done) < 2 or not params:
        return None
    import numpy as np
    from matplotlib import colormaps

    cols = params + [objective["metric"]]
    data = [[t.params[p] for t in done] for p in params] + [[t.values[index] for t in done]]
    scaled, labels = [], []
    for col in data:
        ys, cats, log = _axis(col)
        scaled.append(ys)
        if cats:
            labels.append(cats)
        else:
            labels.append([f"{min(col):.3g}", f"{max(col):.3g}"] + (["(log)"] if log else []))
    obj = np.array(data[-1], dtype=float)
    norm = (obj - obj.min()) / ((obj.max() - obj.min()) or 1.0)
    if objective["direction"] == "minimize":
        norm = 1 - norm
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(max(5.0, 1.9 * len(cols)), 3.6), layout="constrained")
    ax = fig.subplots()
    order = np.argsort(norm)  # best drawn last (on top)
    for j in order:
        ax.plot(range(len(cols)), [s[j] for s in scaled], color=cmap(norm[j]), alpha=0.8, lw=1.3)
    for k, lab in enumerate(labels):
        ax.axvline(k, color="black", lw=0.8)
        if all(is_number(v) for v in data[k]):
            ax.annotate(lab[0], (k, 0), xytext=(3, -2), textcoords="offset points", fontsize=7, va="top")
            ax.annotate(lab[1] + (" log" if len(lab) > 2 else ""), (k, 1), xytext=(3, 2), textcoords="offset points",
                        fontsize=7, va="bottom")
        else:
            span = max(1, len(lab) - 1)
            for c_i, c in enumerate(lab):
                ax.annotate(c, (k, c_i / span), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=15)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(f"parallel coordinates (colour: {objective['metric']}, brighter = better)", fontsize=10)
    return fig


def pareto(trials, objectives: list[dict], front: set[int], reference: list[float] | None) -> Figure | None:
    """The first two objectives of every complete trial, the Pareto front highlighted."""
    done = [t for t in trials if t.state == "COMPLETE" and t.values and len(t.values) >= 2]
    if not done or len(objectives) < 2:
        return None
    fig = Figure(figsize=(5.0, 3.9), layout="constrained")
    ax = fig.subplots()
    rest = [t for t in done if t.number not in front]
    on = sorted([t for t in done if t.number in front], key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], color="#9aa3ad", s=22, label="trial")
    ax.plot([t.values[0] for t in on], [t.values[1] for t in on], color=color(1), marker="o", ms=6, lw=1,
            label="Pareto front")
    for t in done if len(done) <= MAX_LABELS else on:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), xytext=(3, 3), textcoords="offset points", fontsize=7)
    if reference and len(reference) >= 2 and all(is_number(r) for r in reference[:2]):
        ax.scatter([reference[0]], [reference[1]], marker="x", color="black", s=30, label="hypervolume reference")
    _style(ax, "Pareto front" + (f" (first 2 of {len(objectives)} objectives)" if len(objectives) > 2 else ""),
           f"{objectives[0]['metric']} ({objectives[0]['direction']})",
           f"{objectives[1]['metric']} ({objectives[1]['direction']})")
    ax.legend(fontsize=7)
    return fig


def hypervolume_history(points: list[tuple[int, float]]) -> Figure | None:
    if not points:
        return None
    fig = Figure(figsize=(4.8, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.step([p[0] for p in points], [p[1] for p in points], where="post", color=color(0), marker="o", ms=3)
    _style(ax, "hypervolume of the front so far", "trial", "hypervolume")
    return fig


def intermediate(trials, metric: str) -> Figure | None:
    """Intermediate values (what the pruner saw) per trial; pruned trials end with an x."""
    withvals = [t for t in trials if t.intermediate]
    if not withvals:
        return None
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for t in withvals:
        steps = sorted(t.intermediate)
        ys = [t.intermediate[s] for s in steps]
        c = STATE_COLORS.get(t.state, "#7f7f7f")
        ax.plot(steps, ys, color=c, lw=1.1, alpha=0.85, marker="." if len(steps) < 12 else None)
        if t.state == "PRUNED":
            ax.scatter([steps[-1]], [ys[-1]], marker="x", color=c, s=40, zorder=3)
        if len(withvals) <= MAX_LABELS:
            ax.annotate(str(t.number), (steps[-1], ys[-1]), xytext=(3, 0), textcoords="offset points", fontsize=7,
                        color=c)
    from matplotlib.lines import Line2D

    states = sorted({t.state for t in withvals})
    ax.legend(handles=[Line2D([], [], color=STATE_COLORS.get(s, "#7f7f7f"), marker="x" if s == "PRUNED" else None,
                              label=s.lower()) for s in states], fontsize=7)
    _style(ax, f"intermediate values ({metric}); x = pruned there", "step", metric)
    return fig


def timeline(trials) -> Figure | None:
    """One bar per trial from start to end, one row per worker, coloured by state."""
    timed = [t for t in trials if t.start is not None]
    if not timed:
        return None
    import datetime as dt

    workers = sorted({t.worker or "?" for t in timed})
    t0 = min(t.start for t in timed)
    now = max((t.complete or t.start) for t in timed)
    fig = Figure(figsize=(7.0, 1.2 + 0.45 * len(workers)), layout="constrained")
    ax = fig.subplots()
    for t in timed:
        y = workers.index(t.worker or "?")
        start = (t.start - t0).total_seconds()
        end = ((t.complete or now) - t0).total_seconds()
        ax.barh(y, max(end - start, 0.05), left=start, color=STATE_COLORS.get(t.state, "#7f7f7f"), edgecolor="white",
                height=0.6)
        if len(timed) <= MAX_LABELS:
            ax.annotate(str(t.number), (start + max(end - start, 0.05) / 2, y), ha="center", va="center", fontsize=7,
                        color="white")
    from matplotlib.patches import Patch

    states = sorted({t.state for t in timed})
    ax.legend(handles=[Patch(color=STATE_COLORS.get(s, "#7f7f7f"), label=s.lower()) for s in states], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks(range(len(workers)), workers, fontsize=8)
    _style(ax, f"trial timeline (from {t0.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC)", "seconds", "worker")
    return fig


def tuning_vs_test(configs: list[dict], objectives: list[dict]) -> Figure | None:
    """Per best configuration: each tuning seed's and test seed's score, with mean ± std."""
    if not configs:
        return None
    fig = Figure(figsize=(max(4.2, 1.4 * len(configs) + 2.0) * len(objectives), 3.5), layout="constrained")
    axes = fig.subplots(1, len(objectives), squeeze=False)[0]
    for ax, o in zip(axes, objectives):
        m = o["metric"]
        for i, c in enumerate(configs):
            for dx, split, col in ((-0.15, "tuning", color(0)), (0.15, "test", color(3))):
                s = (c.get(split) or {}).get(m) or {}
                ys = [v for v in (s.get("per_seed") or {}).values() if is_number(v)]
                if not ys:
                    continue
                ax.scatter([i + dx] * len(ys), ys, color=col, s=18, alpha=0.7,
                           label=f"{split} seeds" if i == 0 else None)
                if is_number(s.get("mean")):
                    ax.errorbar([i + dx], [s["mean"]], yerr=[s.get("std") or 0.0], fmt="_", color=col, ms=14, capsize=4,
                                lw=1.5)
            gap = (c.get("gap") or {}).get(m)
            if is_number(gap):
                ax.annotate(f"gap {gap:+.3g}", (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                            fontsize=7)
        ax.set_xticks(range(len(configs)), [f"trial {c['trial']}" for c in configs], fontsize=8)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        _style(ax, f"{m}: tuning vs test seeds (mean ± std)", "", m)
        ax.legend(fontsize=7, loc="lower right")
    return fig
