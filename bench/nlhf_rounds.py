"""Time per round of online DPO and of each Nash method (the ``nlhf`` stage), on one machine.

Runs ``pipeline=nlhf`` once per algorithm (the SFT policy and the preference model are trained
once and reused from the artifact cache), one round = one iteration (``nlhf.steps_per_round=1``:
sample -> judge -> update), and reads the stage's per-iteration ``perf/*`` metrics from its
``logs/metrics.csv``. Prints a markdown table (BENCHMARKS.md) and writes it as JSON.

    PYTHONPATH=. python bench/nlhf_rounds.py --root /tmp/nlhf_bench --rounds 20
    PYTHONPATH=. python bench/nlhf_rounds.py --task intransitive --threads 1

Columns: optimizer steps per round (extragradient methods take two half steps of
``inner_steps`` each), median seconds per round, and its split into sampling + judging
(``perf/sample_and_judge_time_s``, summed over the round's steps) and the update
(``perf/update_time_s``). The first two rounds are dropped (warm-up).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

ALGORITHMS = ["online_dpo", "nash_md", "nash_mp", "online_ipo", "egpo", "inpo"]


def stage_times(run_dir: Path, warmup: int = 2) -> dict:
    rows = list(csv.DictReader(open(run_dir / "stages" / "nash" / "logs" / "metrics.csv")))
    steps = [r for r in rows if r.get("perf/step_time_s")]
    steps = steps[warmup:] or steps
    med = lambda k: statistics.median(float(r[k]) for r in steps)
    return {"rounds_timed": len(steps), "s_per_round": med("perf/step_time_s"),
            "sample_and_judge_s": med("perf/sample_and_judge_time_s"), "update_s": med("perf/update_time_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/nlhf_bench", help="artifact cache and run directories")
    ap.add_argument("--task", default="lexicon")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (trainer.num_threads)")
    ap.add_argument("--algorithms", nargs="*", default=ALGORITHMS)
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. model.n_layer=2")
    args = ap.parse_args()

    from pipeline.config import compose
    from pipeline.run import plan, run_pipeline

    root = Path(args.root)
    common = [f"task={args.task}", "pipeline=nlhf", f"nlhf.rounds={args.rounds}", "nlhf.steps_per_round=1",
              "nlhf.eval_every=0", "eval.num_samples=1", "trainer.enable_progress_bar=false", "print_summary=false",
              *([f"trainer.num_threads={args.threads}"] if args.threads else []), *args.extra]
    table = {}
    for algo in args.algorithms:
        run = root / "runs" / algo
        cfg = compose(common + [f"algorithm={algo}"], root=root, output_dir=run)
        run_pipeline(cfg)
        acfg = next(s.cfg.algorithm for s in plan(cfg) if s.name == "nash")
        per_round = 2 * acfg.inner_steps if acfg.update_rule == "extragradient" else 1
        table[algo] = {"optimizer_steps_per_round": per_round, **stage_times(run)}
        print(f"{algo}: {table[algo]}", file=sys.stderr)
    (root / "nlhf_rounds.json").write_text(json.dumps(table, indent=2))
    print(f"| algorithm | optimizer steps / round | s / round | sample + judge s | update s |  ({args.task}, "
          f"{args.rounds} rounds)")
    print("|---|---|---|---|---|")
    for algo, t in table.items():
        print(f"| `{algo}` | {t['optimizer_steps_per_round']} | {t['s_per_round']:.3f} | {t['sample_and_judge_s']:.3f} "
              f"| {t['update_s']:.3f} |")


if __name__ == "__main__":
    main()
