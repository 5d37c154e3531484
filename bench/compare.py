"""Online RL vs TRL in one run: same task, initial model, batch, machine and thread count.

    python3 bench/compare.py                      # grpo, rloo (trl 1.16), ppo (trl 1.12) + remax, reinforce_pp
    python3 bench/compare.py --algos grpo --steps 30 --threads 1

For each algorithm it runs TRL's trainer and then ours (``bench/ours.py``), one after
the other (never in parallel: timings are CPU-bound), and prints a markdown table with
per-step time, time to the gold-reward target, peak memory, and the ratios
``speedup = TRL s/step / ours s/step`` and ``ttq = TRL time-to-target / ours``.
Needs ``bash bench/setup_trl.sh`` and ``bench/common.py export`` (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: our algorithm -> (TRL venv, TRL flags); None = no TRL peer (ours only)
PEERS = {
    "grpo": ("trl116", ["--algo", "grpo"]),
    "rloo": ("trl116", ["--algo", "rloo"]),
    "ppo": ("trl112", ["--algo", "ppo", "--ppo-reward", "gold"]),
    "remax": None,
    "reinforce_pp": None,
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def summary(path: Path) -> dict:
    return json.loads(path.read_text())["summary"]


def fmt(v, f=".3f") -> str:
    return "-" if v is None else format(v, f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=list(PEERS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inputs", default="/tmp/bench/inputs/inputs.json")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    common = ["--inputs", args.inputs, "--steps", str(args.steps), "--threads", str(args.threads)]
    rows = []
    for algo in args.algos:
        peer = PEERS[algo]
        trl = None
        if peer:
            venv, flags = peer
            out = res / f"trl_{algo}.json"
            run([str(HERE / f".venv-{venv}" / "bin" / "python"), str(HERE / "trl_baselines.py"), *flags, *common,
                 "--out", str(out)], res / f"trl_{algo}.log")
            trl = summary(out)
        out = res / f"ours_{algo}.json"
        run([str(ROOT / ".venv" / "bin" / "python"), str(HERE / "ours.py"), "--algo", algo, *common, "--out", str(out)],
            res / f"ours_{algo}.log")
        ours = summary(out)
        rows.append((algo, trl, ours))

    print(f"\n{args.steps} steps, {args.threads} thread(s), target gold {rows[0][2]['target_gold']:.3f} "
          f"(SFT {rows[0][2]['sft_gold']:.3f} + 0.5)\n")
    print("| algorithm | side | s/step | time to target (s) | step | final gold | peak RSS (MiB) | RSS growth (MiB) | speedup/step | time-to-target ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for algo, trl, ours in rows:
        for side, s in (("TRL", trl), ("ours", ours)):
            if s is None:
                continue
            speed = ttq = ""
            if side == "ours" and trl:
                speed = f"{trl['s_per_step_median'] / s['s_per_step_median']:.2f}x"
                if trl.get("time_to_target_s") and s.get("time_to_target_s"):
                    ttq = f"{trl['time_to_target_s'] / s['time_to_target_s']:.2f}x"
            print(f"| {algo} | {side} {s.get('trl', '')} | {fmt(s['s_per_step_median'])} | {fmt(s['time_to_target_s'], '.1f')} "
                  f"| {s.get('step_to_target') or '-'} | {fmt(s['gold_final'])} | {fmt(s['peak_rss_mb'], '.0f')} "
                  f"| {fmt(s['peak_rss_train_delta_mb'], '.0f')} | {speed} | {ttq} |")


if __name__ == "__main__":
    main()
