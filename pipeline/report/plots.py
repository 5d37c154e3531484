"""Figures of runs and multiruns, drawn with matplotlib's object API (no pyplot state, Agg
rendering): each function takes plain data and returns a ``matplotlib.figure.Figure`` (or None
when there is nothing to draw)."""
from __future__ import annotations

import math
import re
from typing import Sequence

from matplotlib.figure import Figure

#: training-curve panels: title and a pattern on the metric key; a metric goes to the first panel
#: it matches (timings ``perf/*``, counters and ``*_std`` are not drawn)
CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", r"(^|[/_])loss($|_)"),
    ("accuracy", r"accurac"),
    ("reward", r"reward|score|margin"),
    ("KL", r"(^|/)(approx_)?kl$"),
    ("entropy", r"entropy"),
    ("response length", r"length"),
    ("win rate", r"win_rate"),
    ("EOS rate", r"eos_rate"),
    ("clip fraction", r"clipfrac"),
    ("learning rate", r"(^lr-|/lr$|learning_rate)"),
)
_SKIP = re.compile(r"^(perf/|epoch$|step$)|_std$|/steps$|rollout_step|/pairs$|/examples$|/round$|_init$")

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22")


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def panel_of(key: str) -> str | None:
    if _SKIP.search(key):
        return None
    for title, pattern in CURVE_PANELS:
        if re.search(pattern, key):
            return title
    return None


def _finite(xs) -> list[float]:
    return [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def _grid(n: int, ncols: int = 3, w: float = 4.0, h: float = 2.8) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _style(ax, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)


# ----------------------------------------------------------------------------- runs
def _base(key: str) -> str:
    return re.sub(r"^(train|val|eval|rollout)/", "", key)


def training_curves(series: dict[str, list[tuple[float, float]]], title: str) -> tuple[Figure | None, list[str]]:
    """One panel per kind of metric (loss, reward, KL, entropy, length, learning rate...), one
    line per metric (validation metrics dashed with markers). Returns (figure, metrics not drawn)."""
    panels: dict[str, list[str]] = {}
    skipped = []
    for key in sorted(series):
        p = panel_of(key)
        if p is None or not series[key]:
            skipped.append(key)
        else:
            panels.setdefault(p, []).append(key)
    order = [t for t, _ in CURVE_PANELS if t in panels]
    if not order:
        return None, skipped
    fig, axes = _grid(len(order))
    fig.suptitle(title, fontsize=11)
    for ax, p in zip(axes, order):
        # train/x, val/x (and rollout/x, eval/x) share a colour: solid while training, dashed when held out
        bases = list(dict.fromkeys(_base(k) for k in panels[p]))
        for key in panels[p]:
            pts = series[key]
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            val = key.startswith(("val/", "eval/"))
            ax.plot(xs, ys, color=color(bases.index(_base(key))), lw=1.2, ls="--" if val else "-",
                    marker="o" if val or len(pts) < 3 else None, ms=3, label=key)
        if p == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        _style(ax, p, "step")
        ax.legend(fontsize=7, loc="best")
    return fig, skipped


def overoptimisation(curves: dict[str, list[dict]], final: dict[str, dict] | None = None) -> Figure | None:
    """Held-out gold and proxy reward against KL to the reference, one line per online stage (points
    in step order, first and last step labelled); the evaluation's policies as stars."""
    curves = {k: v for k, v in curves.items() if any("eval/kl" in p and "eval/gold_reward" in p for p in v)}
    if not curves:
        return None
    panels = [(k, t) for k, t in (("eval/gold_reward", "gold reward (held-out)"),
                                  ("eval/proxy_reward", "proxy reward (held-out)"),
                                  ("eval/win_rate", "gold win rate vs the starting policy (held-out)"))
              if any(k in p for pts in curves.values() for p in pts)]
    fig, axes = _grid(len(panels), ncols=len(panels), w=5.2, h=3.8)
    for ax, (key, title) in zip(axes, panels):
        for i, (stage, pts) in enumerate(curves.items()):
            pts = [p for p in pts if key in p and "eval/kl" in p]
            if not pts:
                continue
            xs, ys = [p["eval/kl"] for p in pts], [p[key] for p in pts]
            ax.plot(xs, ys, color=color(i), marker="o", ms=3.5, lw=1.3, label=stage)
            for p, x, y in ((pts[0], xs[0], ys[0]), (pts[-1], xs[-1], ys[-1])):
                ax.annotate(f"{p.get('step', '')}", (x, y), fontsize=7, color=color(i), xytext=(3, 3),
                            textcoords="offset points")
        if key == "eval/gold_reward" and final:
            stages = list(curves)
            for name, m in final.items():
                if "kl" in m and "gold_reward" in m:  # a policy trained here in its stage's colour
                    c = color(stages.index(name)) if name in stages else "black"
                    ax.errorbar([m["kl"]], [m["gold_reward"]], yerr=[m.get("gold_reward_ci95", 0.0)], fmt="*", ms=10,
                                color=c, alpha=0.75, capsize=2)
                    ax.annotate(name, (m["kl"], m["gold_reward"]), fontsize=7, xytext=(4, -9), textcoords="offset points")
        if key == "eval/win_rate":
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        _style(ax, title, "KL(π ‖ π_ref) [nats]", "win rate" if key == "eval/win_rate" else "reward")
        ax.legend(fontsize=7, loc="best")
    return fig


#: policy metrics of evaluation.json drawn as bars: (key, title, CI key)
POLICY_PANELS = (("gold_reward", "gold reward (± 95% CI)", "gold_reward_ci95"), ("proxy_reward", "proxy reward", None),
                 ("kl", "KL to the reference [nats]", None), ("win_rate", "gold win rate vs reference (± 95% CI)",
                                                                 "win_rate_ci95"),
                 ("response_length", "response length [tokens]", None), ("eos_rate", "EOS rate", None),
                 ("exploitability", "exploitability", None), ("regularized_exploitability", "β-exploitability", None))


def policy_comparison(policies: dict[str, dict], reference: str | None = None) -> Figure | None:
    panels = [p for p in POLICY_PANELS if any(isinstance(m.get(p[0]), (int, float)) for m in policies.values())]
    if not panels or not policies:
        return None
    names = list(policies)
    fig, axes = _grid(len(panels), ncols=3, w=max(3.6, 0.55 * len(names) + 1.6), h=2.9)
    for ax, (key, title, ci) in zip(axes, panels):
        vals = [policies[n].get(key) for n in names]
        ys = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in vals]
        err = [policies[n].get(ci, 0.0) or 0.0 for n in names] if ci else None
        ax.bar(range(len(names)), ys, yerr=err, capsize=3, color=[color(i) for i in range(len(names))], alpha=0.85)
        for i, v in enumerate(vals):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                ax.annotate("reference" if names[i] == reference else "n/a", (i, 0), ha="center", fontsize=7,
                            color="gray")
        if key in ("win_rate",):
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3
                      else "center", fontsize=8)
        _style(ax, title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.grid(False, axis="x")
    return fig


def win_rate_matrix(matrix: dict[str, dict[str, dict]], title: str) -> Figure | None:
    rows = list(matrix)
    cols = list(dict.fromkeys(b for r in matrix.values() for b in r))
    if not rows or not cols:
        return None
    import numpy as np

    data = np.full((len(rows), len(cols)), np.nan)
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            cell = matrix[a].get(b)
            if cell is not None:
                data[i, j] = cell["mean"]
    fig = Figure(figsize=(1.0 + 0.9 * len(cols), 0.9 + 0.55 * len(rows)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(data, cmap="RdBu", vmin=0, vmax=1, aspect="auto")
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            cell = matrix[a].get(b)
            if cell is not None:
                txt = f"{cell['mean']:.2f}" + (f"\n±{cell['ci95']:.2f}" if "ci95" in cell else "")
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if abs(cell["mean"] - 0.5) > 0.3 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    return fig


def accuracy_by_subset(models: dict[str, dict]) -> Figure | None:
    """Pairwise accuracy of each reward / preference model, overall and per subset."""
    if not models:
        return None
    subsets = sorted({s for m in models.values() for s in (m.get("by_subset") or {})})
    groups = ["all"] + subsets
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(models)) * 0.6 + 2), 3.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(models)
    for k, (name, m) in enumerate(models.items()):
        vals = [m.get("accuracy")] + [(m.get("by_subset") or {}).get(s) for s in subsets]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(groups))]
        ys = [v if isinstance(v, (int, float)) else 0.0 for v in vals]
        bars = ax.bar(xs, ys, width=width * 0.95, color=color(k), label=name)
        for b, v in zip(bars, vals):
            if isinstance(v, (int, float)):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_ylim(0, 1.08)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    _style(ax, "pairwise accuracy on held-out gold-labelled pairs", "", "accuracy")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def calibration(models: dict[str, dict]) -> Figure | None:
    """Reliability diagram: accuracy against confidence per bin (marker area ~ count)."""
    models = {k: m for k, m in models.items() if (m.get("calibration") or {}).get("bins")}
    if not models:
        return None
    fig = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0.5, 1], [0.5, 1], color="gray", ls=":", lw=1, label="calibrated")
    for k, (name, m) in enumerate(models.items()):
        bins = m["calibration"]["bins"]
        total = sum(b["count"] for b in bins) or 1
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=color(k), lw=1)
        ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], color=color(k),
                   s=[10 + 200 * b["count"] / total for b in bins], label=f"{name} (ECE {m['calibration']['ece']:.3f})")
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(0, 1.02)
    _style(ax, "calibration (reliability diagram)", "confidence", "accuracy")
    ax.legend(fontsize=7, loc="lower right")
    return fig


# ----------------------------------------------------------------------------- parameters vs objectives
def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positions(values: Sequence) -> tuple[list[float], list[str] | None, bool]:
    """x positions for parameter values: numbers as they are (log scale when they span a decade or more
    and are positive), anything else as categories. Returns (xs, category labels, log)."""
    if all(is_number(v) for v in values if v is not None):
        xs = [float(v) if v is not None else math.nan for v in values]
        pos = [x for x in xs if x > 0]
        log = len(pos) == len(_finite(xs)) and pos and max(pos) / min(pos) >= 9.99
        return xs, None, bool(log)
    cats = list(dict.fromkeys(str(v) for v in values))
    return [float(cats.index(str(v))) for v in values], cats, False


def objective_vs_params(rows: list[dict], params: list[str], objectives: list[str], *,
                        colors: list | None = None, title: str = "", marks: list[str] | None = None) -> Figure | None:
    """Grid of scatter plots: one row per objective, one column per parameter (a slice plot).
    ``rows`` are ``{"params": {...}, "values": {...}}``; ``colors`` optional per-row values (e.g.
    the trial number) for a colour scale; ``marks`` optional per-row marker ("o", "x" ...)."""
    objectives = [o for o in objectives if any(is_number(r["values"].get(o)) for r in rows)]
    if not params or not objectives or not rows:
        return None
    fig = Figure(figsize=(3.2 * len(params) + 0.6, 2.6 * len(objectives) + 0.4), layout="constrained")
    axes = fig.subplots(len(objectives), len(params), squeeze=False)
    if title:
        fig.suptitle(title, fontsize=11)
    sc = None
    for i, o in enumerate(objectives):
        for j, p in enumerate(params):
            ax = axes[i][j]
            keep = [k for k, r in enumerate(rows) if is_number(r["values"].get(o)) and r["params"].get(p) is not None]
            xs, cats, log = _positions([rows[k]["params"].get(p) for k in keep])
            ys = [rows[k]["values"][o] for k in keep]
            row_marks = marks or ["o"] * len(rows)
            for mark in sorted({row_marks[k] for k in keep}):
                sel = [n for n, k in enumerate(keep) if row_marks[k] == mark]
                style = dict(marker=mark, s=26, alpha=0.85)
                if colors:
                    style.update(c=[colors[keep[n]] for n in sel], cmap="viridis", vmin=min(colors), vmax=max(colors))
                else:
                    style.update(color=color(0))
                sc = ax.scatter([xs[n] for n in sel], [ys[n] for n in sel], **style)
            if cats is not None:
                ax.set_xticks(range(len(cats)), cats, fontsize=8, rotation=20 if len(cats) > 3 else 0)
                ax.set_xlim(-0.5, len(cats) - 0.5)
            elif log:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            _style(ax, "", p if i == len(objectives) - 1 else "", o if j == 0 else "")
    if colors and sc is not None:
        fig.colorbar(sc, ax=axes, shrink=0.6, label="trial").ax.tick_params(labelsize=7)
    return fig
