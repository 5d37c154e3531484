"""Cost of a hyperparameter study: the tuner (stage reuse + pruning) vs the same sweep run
naively (every trial recomputes SFT and the reward model, no pruning), and TPE vs random
search at equal budget.

    .venv/bin/python bench/tune_cost.py cost       # 16-trial PPO sweep: ours vs naive (wall time, best score)
    .venv/bin/python bench/tune_cost.py samplers   # TPE vs random, 3 studies each, equal budget
    .venv/bin/python bench/tune_cost.py all --quick   # smoke run: tiny model, 4 trials, short RL

The sweep is ``sweeps/ppo.yaml`` (its search space, objective, sampler and pruner) with
``--trials`` trials and ``--seeds`` tuning seeds. "Naive" is that study with ``pruner=none`` and
``force=true`` (every stage of every trial recomputed: what a sweep without a stage cache does).
Each side runs in its own root (its own artifact cache, starting cold), sequentially, with one
worker; the wall time covers the trials only. Each study's best configuration is then re-run on
the test seeds (not timed) so that the scores compare configurations, not tuning luck.
TPE and random studies with the same index share the sampler seed, so TPE's random start-up
trials are the random study's first trials (paired comparison).
Results: ``bench/results/tune_cost.json`` and a Markdown table on stdout (for BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUICK = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "task.num_train_prompts=256",
         "task.num_pref_prompts=256", "task.num_eval_prompts=16", "sft.max_epochs=2", "reward.max_steps=8",
         "rl.total_steps=6", "rl.prompts_per_step=8", "rl.eval_every=2", "rl.eval_prompts=16", "eval.num_samples=1"]


def study(root: Path, name: str, args, *, tune: list[str], overrides: list[str]) -> dict:
    """Run one study (trials timed, then the test seeds) and return its figures."""
    from pipeline.tune import run_study

    tune = [f"study_name={name}", f"n_trials={args.trials}", f"seeds=[{','.join(map(str, range(args.seeds)))}]",
            f"test_seeds=[{','.join(map(str, args.test_seeds))}]", "progress=false",
            *(["pruner.options.min_resource=2"] if args.quick else []), *tune]
    overrides = ["trainer.enable_progress_bar=false", *(QUICK if args.quick else []), *overrides]
    t0 = time.perf_counter()
    run_study(args.sweep, tune=tune + ["phase=trials"], overrides=overrides, root=root)
    wall = time.perf_counter() - t0
    result = run_study(args.sweep, tune=tune + ["phase=report"], overrides=overrides, root=root)
    doc = result.summary
    metric = doc["objectives"][0]["metric"]
    test = next(iter((result.tests or {}).values()), None)
    out = {"study": name, "wall_s": round(wall, 1), "trials": doc["trials"],
           "best_tuning": doc.get("best", {}).get("value"), "best_trial": doc.get("best", {}).get("trial"),
           "best_sampled": doc.get("best", {}).get("sampled"),
           "best_test_mean": test["test"][metric]["mean"] if test and metric in test["test"] else None,
           "best_test_std": test["test"][metric]["std"] if test and metric in test["test"] else None,
           "study_dir": str(result.study_dir)}
    print(json.dumps(out), flush=True)
    return out


def cost(args, base: Path) -> dict:
    ours = study(base / "ours", "ours", args, tune=[], overrides=[])
    naive = study(base / "naive", "naive", args, tune=["pruner=none"], overrides=["force=true"])
    return {"ours": ours, "naive": naive, "cost_ratio": round(ours["wall_s"] / naive["wall_s"], 3)}


def samplers(args, base: Path) -> dict:
    out: dict = {}
    for sampler in ("tpe", "random"):
        runs = [study(base / "samplers", f"{sampler}{k}", args, tune=[f"sampler.name={sampler}", f"sampler.seed={k}"],
                      overrides=[]) for k in range(args.studies)]
        best = [r["best_tuning"] for r in runs if r["best_tuning"] is not None]
        test = [r["best_test_mean"] for r in runs if r["best_test_mean"] is not None]
        out[sampler] = {"studies": runs,
                        "best_tuning_mean": statistics.mean(best) if best else None,
                        "best_tuning_std": statistics.stdev(best) if len(best) > 1 else 0.0,
                        "best_test_mean": statistics.mean(test) if test else None,
                        "best_test_std": statistics.stdev(test) if len(test) > 1 else 0.0}
    return out


def table(res: dict) -> str:
    lines = []
    if "cost" in res:
        c = res["cost"]
        lines += ["| study | wall time (s) | trials complete / pruned / failed | best gold (tuning seeds) | "
                  "best config on test seeds (mean +- std) |", "|---|---|---|---|---|"]
        for k in ("ours", "naive"):
            r = c[k]
            t = r["trials"]
            lines.append(f"| {k} | {r['wall_s']} | {t['COMPLETE']} / {t['PRUNED']} / {t['FAIL']} | "
                         f"{r['best_tuning']:.4f} | {r['best_test_mean']:.4f} +- {r['best_test_std']:.4f} |")
        lines.append(f"\ncost ratio ours / naive: **{c['cost_ratio']:.0%}** (goal <= 35% with an equal or "
                     f"better best score)\n")
    if "samplers" in res:
        lines += ["| sampler | best gold per study (tuning seeds) | mean +- std | best config on test seeds, "
                  "mean +- std over studies |", "|---|---|---|---|"]
        for k, r in res["samplers"].items():
            per = ", ".join(f"{s['best_tuning']:.4f}" for s in r["studies"] if s["best_tuning"] is not None)
            lines.append(f"| {k} | {per} | {r['best_tuning_mean']:.4f} +- {r['best_tuning_std']:.4f} | "
                         f"{r['best_test_mean']:.4f} +- {r['best_test_std']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["cost", "samplers", "all"])
    ap.add_argument("--sweep", default="ppo")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=1, help="tuning seeds per trial (0..n-1)")
    ap.add_argument("--test-seeds", type=int, nargs="*", default=[100, 101, 102])
    ap.add_argument("--studies", type=int, default=3, help="studies per sampler")
    ap.add_argument("--root", type=Path, default=None, help="where the studies run (default: a new temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, short RL (4 trials unless --trials)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tune_cost.json")
    args = ap.parse_args()
    if args.quick and "--trials" not in sys.argv:
        args.trials = 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:
        os.environ["PIPELINE_TUNE_THREADS"] = str(args.threads)
    base = (args.root or Path(tempfile.mkdtemp(prefix="tune-bench-"))).resolve()
    # warm-up, not timed: imports (torch, Lightning, transformers) and the sweep's checks
    from pipeline.tune.spec import load_spec
    from pipeline.tune.study import Tuner

    Tuner(load_spec(args.sweep), QUICK if args.quick else [], root=base / "warmup")
    res: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "root": str(base)}
    if args.what in ("cost", "all"):
        res["cost"] = cost(args, base)
    if args.what in ("samplers", "all"):
        res["samplers"] = samplers(args, base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"\nresults: {args.out}  (studies in {base})")


if __name__ == "__main__":
    main()
