"""Offline DPO vs TRL's DPOTrainer in one run: same SFT model, pairs, batch, max length, machine, threads.

    python3 bench/dpo_compare.py --steps 60 --threads 1       # TRL then ours, without and with precomputed ref log-probs

For each setting (reference forward pass every step / reference log-probs precomputed before
training) it runs TRL (``bench/dpo_trl.py`` in ``bench/.venv-trl116``) and then ours
(``bench/dpo_ours.py run`` in the project venv), one after the other (never in parallel: the
timings are CPU-bound), and prints a markdown table: median s/step, pairs/s, time to the
held-out implicit-reward accuracy target, the held-out numbers after the last step, and the
ratios ``speedup = TRL s/step / ours s/step`` and ``ttq = TRL time-to-target / ours``.
Needs ``bash bench/setup_trl.sh trl116`` and ``bench/dpo_ours.py export`` (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")


def fmt(v, f=".3f") -> str:
    return "-" if v is None else format(v, f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default="/tmp/bench/dpo/inputs.json")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", nargs="+", default=["live", "precompute"], choices=["live", "precompute"])
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="the project venv's python")
    ap.add_argument("--trl-python", default=str(HERE / ".venv-trl116" / "bin" / "python"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--target", type=float, default=0.65)
    args = ap.parse_args(argv)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    common = ["--inputs", args.inputs, "--steps", str(args.steps), "--batch", str(args.batch),
              "--threads", str(args.threads), "--target", str(args.target)]
    rows, curves = [], []
    for setting in args.settings:
        flag = ["--precompute"] if setting == "precompute" else []
        trl_out, ours_out = res / f"trl_dpo_{setting}.json", res / f"ours_dpo_{setting}.json"
        run([args.trl_python, str(HERE / "dpo_trl.py"), *common, *flag, "--out", str(trl_out)],
            res / f"trl_dpo_{setting}.log")
        run([args.python, str(HERE / "dpo_ours.py"), "run", *common, *flag, "--out", str(ours_out)],
            res / f"ours_dpo_{setting}.log")
        trl_res, ours_res = json.loads(trl_out.read_text()), json.loads(ours_out.read_text())
        rows.append((setting, trl_res["summary"], ours_res["summary"]))
        curves.append((setting, curve_gap(trl_res["steps"], ours_res["steps"])))

    print(f"\n{args.steps} steps x {args.batch} pairs, {args.threads} thread(s), target held-out accuracy {args.target}\n")
    print("| reference log-probs | side | s/step (median) | pairs/s | setup (s) | time to target (s) | step | "
          "held-out acc / margin (last) | speedup per step | time-to-target ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for setting, trl, ours in rows:
        for side, s in (("TRL " + s_ver(trl), trl), ("ours", ours)):
            speed = ttq = ""
            if side == "ours":
                speed = f"**{trl['s_per_step_median'] / s['s_per_step_median']:.2f}x**"
                if trl.get("time_to_target_s") and s.get("time_to_target_s"):
                    ttq = f"**{trl['time_to_target_s'] / s['time_to_target_s']:.2f}x**"
            last = s.get("heldout_final") or {}
            print(f"| {'precomputed' if setting == 'precompute' else 'every step'} | {side} | "
                  f"{fmt(s['s_per_step_median'])} | {fmt(s['pairs_per_s'], '.0f')} | {fmt(s.get('setup_s'), '.1f')} | "
                  f"{fmt(s['time_to_target_s'], '.1f')} | {s.get('step_to_target') or '-'} | "
                  f"{fmt(last.get('heldout_accuracy'))} / {fmt(last.get('heldout_margin'), '+.3f')} | {speed} | {ttq} |")
    same = all(trl.get("same_tokens") for _, trl, _ in rows)
    print(f"\nsame train tokens on both sides: {same}")
    for setting, gap in curves:  # same batches, same math: the held-out curves should agree to float rounding
        print(f"{setting}: largest held-out margin difference between the sides over {gap[1]} evaluations: {gap[0]:.2e}")
        if gap[0] > 1e-4:
            print(f"  WARNING ({setting}): the curves differ by more than float rounding: the sides no longer train on "
                  "the same batches or with the same math (check bench/dpo_ours.py's loader patch)")


def curve_gap(a: list[dict], b: list[dict]) -> tuple[float, int]:
    ea = {r["step"]: r["heldout_margin"] for r in a if "heldout_margin" in r}
    eb = {r["step"]: r["heldout_margin"] for r in b if "heldout_margin" in r}
    common = sorted(set(ea) & set(eb))
    return (max((abs(ea[s] - eb[s]) for s in common), default=float("nan")), len(common))


def s_ver(summary: dict) -> str:
    return summary.get("versions", {}).get("trl", "")


if __name__ == "__main__":
    main()
