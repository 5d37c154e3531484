"""End-of-run summary table (Rich)."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

#: metrics shown per stage kind, in order (others stay in results.json)
HEADLINE = {
    "sft": ["val/loss", "val/loss_init", "train/loss"],
    "reward": ["val/accuracy", "val/loss"],
    "policy": ["train/gold_reward", "train/reward", "policy/kl"],
}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_summary(results: dict, run_info: dict, run_dir: Path) -> None:
    console = Console()
    table = Table(title=f"pipeline {results['pipeline']!r} (seed {results['seed']})")
    for col in ("stage", "kind", "cached", "seconds", "metrics"):
        table.add_column(col)
    for name, st in results["stages"].items():
        metrics = st["metrics"]
        keys = HEADLINE.get(st["kind"]) or [k for k in metrics if not k.startswith("examples")]
        shown = [f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics]
        info = run_info["stages"][name]
        table.add_row(name, st["kind"], "yes" if info["reused"] else "no", f"{info['seconds']:.1f}", "\n".join(shown))
    console.print(table)
    console.print(f"outputs: {run_dir}")
