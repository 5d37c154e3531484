"""End-of-run summary (Rich): one row per stage with its declared headline metrics, then
the policies of each evaluate stage side by side and their win-rate matrices (read from its
``evaluation.json``)."""
from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def headline_keys(metrics: dict, keys) -> list[str]:
    """Metrics named in ``keys``; a key ending in ``/`` selects every metric under that prefix.
    (Also read by the reports: this module imports nothing heavy at import time.)"""
    shown = []
    for key in keys:
        if key.endswith("/"):
            shown += sorted(k for k in metrics if k.startswith(key))
        elif key in metrics:
            shown.append(key)
    return shown


def print_summary(results: dict, run_info: dict, run_dir: Path, *, headline: dict[str, tuple] | None = None,
                  evaluations: dict[str, dict] | None = None, console: Console | None = None) -> None:
    from pipeline.evaluation import POLICY_METRICS

    # piped output (logs, CI) gets a wide table instead of rich's 80-column default
    console = console or (Console() if sys.stdout.isatty() else Console(width=160))
    table = Table(title=f"pipeline {results['pipeline']!r} (seed {results['seed']})")
    for col in ("stage", "kind", "cached", "seconds", "headline metrics"):
        table.add_column(col)
    for name, st in results["stages"].items():
        metrics = st["metrics"]
        shown = "  ".join(f"{k}={_fmt(metrics[k])}" for k in headline_keys(metrics, (headline or {}).get(name, ())))
        info = run_info["stages"][name]
        table.add_row(name, st["kind"], "yes" if info["reused"] else "no", f"{info['seconds']:.1f}", shown)
    console.print(table)
    for stage, ev in (evaluations or {}).items():
        data = ev.get("data") or {}
        user_data = data.get("prompts") and not str(data["prompts"]).startswith("task ")
        for judge, src in (data.get("pairs") or {}).items():  # where each accuracy comes from
            if not str(src).startswith("task "):
                console.print(f"{stage}: accuracy of {judge!r} on {src}", style="italic")
        policies = ev.get("policies") or {}
        if not policies:
            continue
        ref = ev.get("reference")
        title = f"{stage}: policies on held-out prompts" + (f" (KL to {ref!r})" if ref else "")
        if user_data:  # say which data each number comes from; gold metrics exist only on built-in tasks
            console.print(f"{stage}: prompts: {data['prompts']}", style="italic")
        pt = Table(title=title)
        pt.add_column("policy")
        cols = [c for c in POLICY_METRICS if any(c in p for p in policies.values())]
        for c in cols:
            pt.add_column(_HEADERS.get(c, c), justify="right")
        for name, vals in policies.items():
            pt.add_row(name, *[_fmt(vals.get(c, float("nan"))) for c in cols])
        console.print(pt)
        for judge, matrix in (ev.get("win_rates") or {}).items():
            if matrix:  # the title on its own line: a table title wraps to the table's width
                console.print(f"{stage}: win rate of row over column ({_JUDGES.get(judge, judge)})", style="italic")
                console.print(win_rate_table(matrix))
    console.print(f"outputs: {run_dir}")


_HEADERS = {"regularized_exploitability": "β-exploitability", "response_length": "length"}
_JUDGES = {"gold_preference": "gold preference, ± 95% CI", "preference_model": "learned preference model, ± 95% CI",
           "class_game": "class game, exact from the class distributions"}


def win_rate_table(matrix: dict) -> Table:
    """Rows beat columns with the given probability (``mean`` ± ``ci95`` when there is one)."""
    names = list(matrix)
    cols = list(dict.fromkeys(b for row in matrix.values() for b in row))
    t = Table()
    t.add_column("")
    for c in cols:
        t.add_column(c, justify="right")
    for a in names:
        cells = []
        for b in cols:
            cell = matrix[a].get(b)
            if cell is None:
                cells.append("-")
            else:
                cells.append(f"{cell['mean']:.3f}" + (f"±{cell['ci95']:.3f}" if "ci95" in cell else ""))
        t.add_row(a, *cells)
    return t
