"""End-of-run summary (Rich): one row per stage, then policies x evaluation metrics."""
from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

#: headline metrics per stage kind (everything else stays in results.json)
HEADLINE = {
    "sft": ["val/loss", "val/loss_init", "train/steps"],
    "reward": ["val/accuracy", "val/loss", "train/pairs"],
    "evaluate": ["eval/rm_accuracy"],
    "policy": ["rollout/reward_mean", "rollout/gold_reward", "policy/kl", "eval/gold_reward", "eval/proxy_reward",
               "eval/kl", "train/steps"],
}
POLICY_COLUMNS = ["gold_reward", "proxy_reward", "kl", "response_length", "eos_rate"]
_POLICY_KEY = re.compile(r"^eval/([^/]+)/(\w+)$")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_summary(results: dict, run_info: dict, run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"pipeline {results['pipeline']!r} (seed {results['seed']})")
    for col in ("stage", "kind", "cached", "seconds", "headline metrics"):
        table.add_column(col)
    policies: dict[str, dict] = {}
    for name, st in results["stages"].items():
        metrics = st["metrics"]
        keys = HEADLINE.get(st["kind"], [])
        keys = keys + [k for k in metrics if k.startswith("eval/rm_accuracy/")]
        shown = "  ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
        info = run_info["stages"][name]
        table.add_row(name, st["kind"], "yes" if info["reused"] else "no", f"{info['seconds']:.1f}", shown)
        for k, v in metrics.items():
            m = _POLICY_KEY.match(k)
            if m and m.group(2) in POLICY_COLUMNS:
                policies.setdefault(m.group(1), {})[m.group(2)] = v
    console.print(table)
    if policies:
        pt = Table(title="policies on held-out prompts (KL to the reference policy)")
        pt.add_column("policy")
        cols = [c for c in POLICY_COLUMNS if any(c in p for p in policies.values())]
        for c in cols:
            pt.add_column(c, justify="right")
        order = ["base"] + list(results["stages"])
        for name, vals in sorted(policies.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
            pt.add_row(name, *[_fmt(vals.get(c, float("nan"))) for c in cols])
        console.print(pt)
    console.print(f"outputs: {run_dir}")
