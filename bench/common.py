"""Shared harness for the online-RL benchmarks (ours vs TRL): inputs, metrics, summaries.

Both sides of the comparison must report the same numbers computed the same way, so
the metric code lives here, stdlib only (it is imported from the project venv and from
the TRL venvs, which do not install the project):

- :class:`StepLog` - one record per optimizer/rollout step: wall time since the start
  of training (model loading excluded), the mean *gold* reward of the completions
  sampled that step, peak RSS so far;
- :func:`time_to_target` - first wall time at which the running mean (``window``
  steps) of the batch gold reward reaches the target;
- :func:`summarize` - the JSON summary every benchmark prints: median s/step
  (first, warm-up step excluded), time_to_target, peak_rss_mb, final gold.

It is also a CLI, run in the *project* venv, that prepares the shared inputs:

    PIPELINE_ROOT=/tmp/bench .venv/bin/python -m pipeline pipeline=rm_eval trainer.enable_progress_bar=false
    .venv/bin/python bench/common.py export --artifacts /tmp/bench/outputs/artifacts --out /tmp/bench/inputs

``export`` writes ``prompts.jsonl`` (the lexicon task's ``rl`` split: ``prompt`` and
``topic`` columns), measures the SFT model's gold reward (the baseline the
time-to-quality target is set above) and writes ``inputs.json`` with the SFT / RM
directories, the baseline and a default target (baseline + ``--target-delta``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------- metrics


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB). Linux reports KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


@dataclass
class StepLog:
    """Per-step records of one benchmark run. Call :meth:`start` right before the first
    step (after model loading) and :meth:`step` once per optimizer step."""

    t0: float | None = None
    rows: list[dict] = field(default_factory=list)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._cpu0 = self._cpu_last = cpu_seconds()

    def step(self, gold: Sequence[float] | float, **extra) -> dict:
        """``gold``: the gold rewards of the completions sampled this step (or their mean)."""
        now, cpu = time.perf_counter(), cpu_seconds()
        if self.t0 is None:
            raise RuntimeError("StepLog.start() was not called")
        gold = [float(gold)] if isinstance(gold, (int, float)) else [float(g) for g in gold]
        row = {
            "step": len(self.rows) + 1,
            "wall_s": now - self.t0,
            "step_s": now - self._last,
            # CPU seconds of this process in the step: less sensitive than wall time to
            # other jobs on a shared machine (but >= wall x threads when it has the cores)
            "cpu_s": cpu - self._cpu_last,
            "gold_mean": statistics.fmean(gold) if gold else float("nan"),
            "n_samples": len(gold),
            "peak_rss_mb": peak_rss_mb(),
            "rss_mb": current_rss_mb(),
            **extra,
        }
        self._last, self._cpu_last = now, cpu
        self.rows.append(row)
        return row


def running_mean(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def time_to_target(rows: Sequence[dict], target: float, window: int = 3) -> tuple[float | None, int | None]:
    """(wall seconds, step) at which the ``window``-step running mean of the batch gold
    reward first reaches ``target``; (None, None) if it never does. The first
    ``window - 1`` steps use a shorter window only once ``window`` steps exist, so a
    single lucky first batch does not count."""
    means = running_mean([r["gold_mean"] for r in rows], window)
    for i, m in enumerate(means):
        if i + 1 >= window and m >= target:
            return rows[i]["wall_s"], rows[i]["step"]
    return None, None


def summarize(rows: Sequence[dict], *, target: float | None, window: int = 3,
              rss_before_train_mb: float | None = None, **meta) -> dict:
    """``rss_before_train_mb``: peak RSS right before the first step (libraries, models,
    data loaded); the training delta is reported as ``peak_rss_train_delta_mb``, which
    does not depend on how heavy each side's imports are."""
    step_s = [r["step_s"] for r in rows[1:]] or [r["step_s"] for r in rows]
    cpu_s = [r["cpu_s"] for r in rows[1:] if "cpu_s" in r] or [r["cpu_s"] for r in rows if "cpu_s" in r]
    tt, ts = time_to_target(rows, target, window) if target is not None else (None, None)
    last = rows[-window:] if rows else []
    out = {
        **meta,
        "steps": len(rows),
        "s_per_step_median": statistics.median(step_s) if step_s else None,
        "s_per_step_mean": statistics.fmean(step_s) if step_s else None,
        "cpu_s_per_step_median": statistics.median(cpu_s) if cpu_s else None,
        "first_step_s": rows[0]["step_s"] if rows else None,
        "total_train_s": rows[-1]["wall_s"] if rows else None,
        "target_gold": target,
        "target_window": window,
        "time_to_target_s": tt,
        "step_to_target": ts,
        # contention-robust estimate: steps to target x median step time (wall spikes from
        # other jobs on a shared machine hit time_to_target_s directly)
        "time_to_target_est_s": ts * statistics.median(step_s) if ts and step_s else None,
        "gold_first": rows[0]["gold_mean"] if rows else None,
        "gold_final": statistics.fmean(r["gold_mean"] for r in last) if last else None,
        "gold_max_running": max(running_mean([r["gold_mean"] for r in rows], window)) if rows else None,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows) if rows else peak_rss_mb(),
    }
    out["peak_rss_before_train_mb"] = rss_before_train_mb
    out["peak_rss_train_delta_mb"] = (out["peak_rss_mb"] - rss_before_train_mb
                                      if rss_before_train_mb is not None else None)
    return out


def write_result(path: str | os.PathLike | None, summary: dict, rows: Sequence[dict], config: dict) -> None:
    out = {"summary": summary, "config": config, "steps": list(rows)}
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


# ---------------------------------------------------------------------------- export inputs


def _latest(artifacts: Path, prefix: str) -> Path:
    cands = [p for p in artifacts.glob(f"{prefix}-*") if (p / "model").is_dir()]
    if not cands:
        raise SystemExit(f"no {prefix}-*/model under {artifacts}: run the default pipeline first")
    return max(cands, key=lambda p: (p / "model").stat().st_mtime)


def _reward_for(artifacts: Path, sft: Path) -> Path:
    """Newest reward-* artifact whose manifest names ``sft`` as its input policy."""
    fp = json.loads((sft / "manifest.json").read_text()).get("fingerprint") if (sft / "manifest.json").exists() else None
    cands = []
    for p in artifacts.glob("reward-*"):
        try:
            man = json.loads((p / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if (p / "model").is_dir() and (fp is None or man.get("inputs", {}).get("policy", {}).get("fingerprint") == fp):
            cands.append(p)
    if not cands:
        raise SystemExit(f"no reward-* artifact trained on {sft.name} under {artifacts}: pass --rm")
    return max(cands, key=lambda p: (p / "model").stat().st_mtime)


def export(args) -> None:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config.schema import TaskConfig
    from pipeline.tasks import build_task

    artifacts = Path(args.artifacts)
    sft = Path(args.sft) if args.sft else _latest(artifacts, "sft")
    rm = Path(args.rm) if args.rm else _reward_for(artifacts, sft)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    task_cfg = OmegaConf.structured(TaskConfig)
    manifest = sft / "manifest.json"
    if manifest.exists():  # the task settings the SFT model was trained with
        task_cfg = OmegaConf.merge(task_cfg, json.loads(manifest.read_text())["config"]["task"])
    if args.task_override:
        task_cfg = OmegaConf.merge(task_cfg, OmegaConf.from_dotlist(args.task_override))
    task = build_task(task_cfg)
    if task.name != "lexicon":
        raise SystemExit("the TRL baselines only ship a standalone gold reward for the lexicon task")
    rows = task.prompts("rl", args.num_prompts)
    with open(out / "prompts.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "topic": r["topic"]}) + "\n")

    # SFT baseline: the same sampling as the RL rollouts (temperature 1, no top-k/p).
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(sft / "model")
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(sft / "model").eval()
    eval_prompts = [r["prompt"] for r in rows[: args.baseline_prompts]]
    prompts, completions = [], []
    with torch.no_grad():
        for i in range(0, len(eval_prompts), 64):
            chunk = [p for p in eval_prompts[i:i + 64] for _ in range(args.baseline_samples)]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            prompts += chunk
            completions += texts
    gold = task.gold_reward(prompts, completions)
    mean = statistics.fmean(gold)
    std = statistics.pstdev(gold)
    info = {
        "task": OmegaConf.to_container(task_cfg),
        "sft_model_dir": str((sft / "model").resolve()),
        "rm_dir": str((rm / "model" / "member_0").resolve()),
        # our RewardScorer subtracts offsets[k] from member k (SFT demos score 0 on average)
        "rm_offset": json.loads((rm / "reward_meta.json").read_text())["offsets"][0]
        if (rm / "reward_meta.json").exists() else 0.0,
        "prompts": str((out / "prompts.jsonl").resolve()),
        "num_prompts": len(rows),
        "sft_gold_mean": mean,
        "sft_gold_std": std,
        "sft_gold_samples": len(gold),
        "sft_gold_sem": std / math.sqrt(len(gold)),
        "target_delta": args.target_delta,
        "target_gold": round(mean + args.target_delta, 3),
        "sampling": {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "top_k": 0, "top_p": 1.0},
        "examples": [{"prompt": p, "completion": c, "gold": g} for p, c, g in list(zip(prompts, completions, gold))[:6]],
    }
    (out / "inputs.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k not in ("examples", "task")}, indent=1))


TABLE_COLUMNS = [
    ("side", "side", "s"), ("algo", "algo", "s"), ("reward", "reward", "s"), ("threads", "threads", "d"),
    ("samples/step", "samples_per_step", "d"),
    ("s/step (median)", "s_per_step_median", ".3f"), ("time to target (s)", "time_to_target_s", ".1f"),
    ("step", "step_to_target", "d"), ("est. (s)", "time_to_target_est_s", ".1f"),
    ("gold first", "gold_first", "+.3f"), ("gold final", "gold_final", "+.3f"),
    ("peak RSS (MiB)", "peak_rss_mb", ".0f"), ("train delta (MiB)", "peak_rss_train_delta_mb", ".0f"),
]


def table(paths: Sequence[str]) -> str:
    """Markdown table of result files (``{"summary": ...}`` as written by write_result)."""
    lines = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    target = set()
    for p in paths:
        s = dict(json.loads(Path(p).read_text())["summary"])
        s.setdefault("samples_per_step", (s.get("prompts_per_step") or 0) * (s.get("num_generations") or 1))
        target.add(s.get("target_gold"))
        cells = []
        for _, key, f in TABLE_COLUMNS:
            v = s.get(key)
            cells.append("-" if v is None else format(v, f) if f != "s" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\ntarget gold: {', '.join(map(str, sorted(t for t in target if t is not None)))}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="prompts.jsonl + inputs.json (SFT/RM dirs, SFT gold baseline, target)")
    ex.add_argument("--artifacts", default="/tmp/bench/outputs/artifacts")
    ex.add_argument("--sft", help="sft-* artifact dir (default: newest under --artifacts)")
    ex.add_argument("--rm", help="reward-* artifact dir (default: newest one trained on the SFT model)")
    ex.add_argument("--out", default="/tmp/bench/inputs")
    ex.add_argument("--task-override", nargs="*", default=[], help="dotlist, e.g. seed=1234 demo_quality=0.3")
    ex.add_argument("--num-prompts", type=int, default=None, help="default: the task's num_train_prompts")
    ex.add_argument("--baseline-prompts", type=int, default=256)
    ex.add_argument("--baseline-samples", type=int, default=4)
    ex.add_argument("--max-new-tokens", type=int, default=24)
    ex.add_argument("--temperature", type=float, default=1.0)
    ex.add_argument("--target-delta", type=float, default=0.5,
                    help="time-to-quality target = SFT gold mean + this")
    ex.add_argument("--seed", type=int, default=0)
    tb = sub.add_parser("table", help="markdown table of result JSON files")
    tb.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        export(args)
    elif args.cmd == "table":
        print(table(args.results))


if __name__ == "__main__":
    main()
