"""Population-based training vs the Optuna tuner (TPE, random search) at equal compute.

    .venv/bin/python bench/pbt_vs_tpe.py                 # both settings, 3 seeds, PBT + PB2 + TPE + random
    .venv/bin/python bench/pbt_vs_tpe.py --smoke         # smoke run: tiny model, 8 RL steps, 3 members / trials, 1 seed
    .venv/bin/python bench/pbt_vs_tpe.py --settings arithmetic --methods pbt tpe --seeds 0

Settings: ``overoptimization`` (``experiment=overoptimization``: a proxy reward model trained on
noisy labels, PPO whose gold reward peaks and falls back with little KL penalty) and
``arithmetic`` (``experiment=arithmetic_grpo``: GRPO on the verifiable exact-match reward), both with
``rl.total_steps`` steps and the held-out evaluation every ``rl.eval_every``. One search space for
every method: ``algorithm.kl_coef``, ``rl.optim.lr``, ``algorithm.temperature``, ``algorithm.cliprange``.

Equal compute = equal total rollout steps: a population of N members trains N x total_steps; TPE
and random search run N trials of total_steps each, without pruning (pruning would change the
budget). SFT and the reward model are trained once per setting and shared through the cache (not
counted: a warm-up run trains them before anything is timed). Per (setting, seed, method) the script reports the best final held-out gold reward of
any member / trial (the evaluation stage's ``eval/gold_reward``), the KL to the SFT policy at which
that member / trial reached it (``eval/kl``), and the wall time; then mean and std over seeds.
PBT members rank by the rl stage's held-out gold reward at each segment end (``segment_steps``).

Results: ``bench/results/pbt_vs_tpe.json`` and a Markdown table on stdout (for BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SETTINGS = {
    "overoptimization": ["experiment=overoptimization"],
    "arithmetic": ["experiment=arithmetic_grpo"],
}
SPACE = """space:
  algorithm.kl_coef: {type: float, low: 0.005, high: 0.5, log: true}
  rl.optim.lr: {type: float, low: 3.0e-5, high: 1.0e-3, log: true}
  algorithm.temperature: {type: float, low: 0.6, high: 1.2}
  algorithm.cliprange: {type: float, low: 0.1, high: 0.3}
objectives: {eval/gold_reward: maximize}
"""
SMOKE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "task.num_train_prompts=256",
         "task.num_pref_prompts=256", "task.num_eval_prompts=16", "sft.max_epochs=2", "reward.max_steps=8",
         "rl.prompts_per_step=8", "rl.eval_prompts=16", "eval.num_samples=1", "algorithm.max_new_tokens=12"]


def sweep_file(directory: Path, method: str, args) -> Path:
    """The sweep of one method (a YAML file in the results directory)."""
    if method in ("pbt", "pb2"):
        extra = (f"pbt: {{method: {method}, population: {args.population}, segment_steps: {args.segment_steps}, "
                 "quantile: 0.25}\ntune: {seeds: [0], test_seeds: [], progress: false}\n")
    else:
        startup = max(2, args.population // 3)
        sampler = f"{{name: tpe, options: {{n_startup_trials: {startup}}}}}" if method == "tpe" else "random"
        extra = (f"tune: {{n_trials: {args.population}, sampler: {sampler}, pruner: none, seeds: [0], "
                 "test_seeds: [], progress: false}\n")
    path = directory / f"pbt_vs_tpe_{method}.yaml"
    path.write_text(f"description: pbt_vs_tpe {method}\nbase: []\n{SPACE}{extra}")
    return path


def _final_runs(study_dir: Path, method: str) -> list[dict]:
    """Every member's / trial's final pipeline run: its gold reward and KL (evaluation stage)."""
    if method in ("pbt", "pb2"):
        state = json.loads((study_dir / "population.json").read_text())
        last = str(state["segments"] - 1)
        dirs = [Path(m["segments"][last]["run_dir"]) for m in state["members"]
                if m["segments"].get(last, {}).get("state") == "done"]
    else:
        dirs = sorted(p.parent for p in study_dir.glob("trials/*/seed-*/results.json"))
    out = []
    for d in dirs:
        stages = json.loads((d / "results.json").read_text())["stages"]
        metrics = next(s["metrics"] for s in reversed(list(stages.values())) if "eval/gold_reward" in s["metrics"])
        out.append({"run_dir": str(d), "gold": metrics["eval/gold_reward"], "kl": metrics.get("eval/kl")})
    return out


def overrides_of(setting: str, args) -> list[str]:
    out = SETTINGS[setting] + [f"rl.total_steps={args.total_steps}", f"rl.eval_every={args.eval_every}",
                               "trainer.enable_progress_bar=false"] + (SMOKE if args.smoke else [])
    return out + ([f"trainer.num_threads={args.threads}"] if args.threads else [])


def warm_up(root: Path, setting: str, args) -> None:
    """Train the setting's upstream stages (SFT, reward model) once, before anything is timed."""
    from pipeline.config import compose
    from pipeline.run import run_pipeline

    run_pipeline(compose(overrides_of(setting, args) + ["rl.total_steps=1", "rl.eval_every=0", "print_summary=false"],
                         root=root, output_dir=root / "outputs" / "runs" / "warm-up"))


def run_one(root: Path, setting: str, method: str, seed: int, args) -> dict:
    from pipeline.tune import run_study

    sweep = sweep_file(root, method, args)
    name = f"{setting}_{method}_s{seed}"
    tune = [f"study_name={name}", f"seeds=[{seed}]", f"sampler.seed={seed}"]
    overrides = overrides_of(setting, args)
    if method in ("pbt", "pb2"):  # the population's own seed follows the training seed
        text = sweep.read_text().replace("quantile: 0.25}", f"quantile: 0.25, seed: {seed}}}")
        sweep.write_text(text)
    t0 = time.perf_counter()
    result = run_study(str(sweep), tune=tune, overrides=overrides, root=root)
    wall = time.perf_counter() - t0
    runs = _final_runs(result.study_dir, method)
    best = max(runs, key=lambda r: r["gold"])
    doc = {"setting": setting, "method": method, "seed": seed, "wall_s": round(wall, 1), "runs": len(runs),
           "rollout_steps": args.population * args.total_steps, "best_gold": best["gold"], "kl_at_best": best["kl"],
           "best_run": best["run_dir"], "study_dir": str(result.study_dir)}
    if method in ("pbt", "pb2"):
        doc["exploits"] = result.summary.get("exploits")
    print(json.dumps(doc), flush=True)
    return doc


def _stat(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def table(results: list[dict]) -> str:
    lines = ["| setting | method | best final gold (mean ± std over seeds) | KL at the best | wall time (s) | "
             "seeds | rollout steps per study |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["setting"], r["method"]) for r in results}, key=lambda k: (k[0], METHODS.index(k[1])))
    for setting, method in keys:
        rs = [r for r in results if r["setting"] == setting and r["method"] == method]
        lines.append(f"| {setting} | {method} | {_stat([r['best_gold'] for r in rs])} | "
                     f"{_stat([r['kl_at_best'] for r in rs])} | {_stat([r['wall_s'] for r in rs], 1)} | "
                     f"{len(rs)} | {rs[0]['rollout_steps']} |")
    return "\n".join(lines)


METHODS = ["pbt", "pb2", "tpe", "random"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--population", type=int, default=8, help="PBT members = TPE / random trials")
    ap.add_argument("--total-steps", type=int, default=60)
    ap.add_argument("--segment-steps", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="trainer.num_threads (default: torch's)")
    ap.add_argument("--root", type=Path, default=REPO / "bench" / "results" / "pbt_vs_tpe")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 8 RL steps, 3 members / trials, seed 0")
    args = ap.parse_args()
    if args.smoke:
        args.population, args.total_steps, args.segment_steps, args.eval_every = 3, 8, 4, 2
        args.seeds = args.seeds[:1]
        args.root = args.root.with_name(args.root.name + "_smoke")
    results = []
    for setting in args.settings:
        root = args.root / setting  # one artifact cache per setting: SFT and the RM are shared
        root.mkdir(parents=True, exist_ok=True)
        warm_up(root, setting, args)
        for seed in args.seeds:
            for method in args.methods:
                results.append(run_one(root, setting, method, seed, args))
    out = args.root.parent / ("pbt_vs_tpe_smoke.json" if args.smoke else "pbt_vs_tpe.json")
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
