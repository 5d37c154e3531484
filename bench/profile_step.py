"""Where one online-RL step spends its time: per phase (timers) and per operation (torch.profiler).

    PYTHONPATH=. .venv/bin/python bench/profile_step.py --algo grpo --threads 1
    PYTHONPATH=. .venv/bin/python bench/profile_step.py --algo ppo --threads 1 --trace /tmp/ppo_trace.json

Runs our ``rl`` stage exactly as ``bench/ours.py`` does (same SFT artifact from
``bench/common.py export``, same config as the TRL comparison), for ``--warmup`` steps,
then ``--steps`` steps timed per phase, then ``--profile-steps`` steps under
``torch.profiler`` (CPU activities) for the per-operation table. Prints two markdown
tables (BENCHMARKS.md, "Where the time goes").

Phases are wall-clock timers around the pieces of ``OnlineRLModule`` (installed by this
script, nothing in the package changes), exclusive of nested phases:
``generation`` (the rollout engine, text decoding included), ``reward`` (scoring),
``reference forward``, ``value forward`` (PPO critic: old values without grad and the
training forward), ``policy forward`` (the training forward: log-probs, entropy),
``loss + advantages`` (policy loss, KL estimate, value loss, advantage estimator), ``backward``, ``grad clip``,
``optimizer`` (step + zero_grad), ``other in training_step`` (Python glue, metrics,
logging) and ``outside training_step`` (Lightning's loop, data loader, callbacks),
which together add up to the wall time between the steps.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ours  # noqa: E402


class PhaseTimer:
    """Exclusive wall time per phase label (a nested phase's time is not counted in its parent)."""

    def __init__(self):
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [label, start, time of nested phases]

    def wrap(self, label: str, fn):
        import torch

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            self._stack.append([label, time.perf_counter(), 0.0])
            try:
                with torch.profiler.record_function(label):
                    return fn(*args, **kwargs)
            finally:
                lab, t0, nested = self._stack.pop()
                dt = time.perf_counter() - t0
                self.totals[lab] += dt - nested
                if self._stack:
                    self._stack[-1][2] += dt

        return inner


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", choices=sorted(ours.MATCH), required=True)
    ap.add_argument("--inputs", default="/tmp/bench/inputs/inputs.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="steps timed per phase")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler (0 = none)")
    ap.add_argument("--top", type=int, default=15, help="rows of the per-operation table")
    ap.add_argument("--trace", default=None, help="write a Chrome trace of the profiled steps here")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    total = args.warmup + args.steps + args.profile_steps
    cfg, _ = ours.compose_cfg(args.algo, inputs, steps=total, threads=args.threads, extra=args.overrides)

    import pipeline.modules.rl as rl_mod
    from pipeline.rollout.engine import HFRolloutEngine

    timer = PhaseTimer()
    M = rl_mod.OnlineRLModule
    HFRolloutEngine.generate = timer.wrap("generation", HFRolloutEngine.generate)
    rl_mod.reference_logprobs = timer.wrap("reference forward", rl_mod.reference_logprobs)
    for name, label in (("_score", "reward"), ("_values", "value forward"), ("policy_logprobs", "policy forward"),
                        ("manual_backward", "backward"), ("clip_gradients", "grad clip"),
                        ("training_step", "other in training_step")):
        setattr(M, name, timer.wrap(label, getattr(M, name)))
    for name in ("value_loss", "agg_loss"):
        setattr(rl_mod, name, timer.wrap("loss + advantages", getattr(rl_mod, name)))

    state = {"step": 0, "prof": None, "last": None, "walls": [], "snap": None}
    original_step = M.training_step

    def training_step(self, rows, batch_idx):
        if state["step"] == 0:  # instance-level pieces exist now
            for attr, label in (("policy_loss", "loss + advantages"), ("kl_fn", "loss + advantages"), ("estimator", "loss + advantages")):
                setattr(self, attr, timer.wrap(label, getattr(self, attr)))
            for opt in self.trainer.optimizers:
                opt.step = timer.wrap("optimizer", opt.step)
                opt.zero_grad = timer.wrap("optimizer", opt.zero_grad)
        s = state["step"]
        if s == args.warmup:
            timer.enabled = True
        if s == args.warmup + args.steps and args.profile_steps:
            state["snap"] = dict(timer.totals)
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            state["prof"].__enter__()
        state["step"] += 1
        return original_step(self, rows, batch_idx)

    M.training_step = training_step

    def hook(stage, step, metrics):
        if stage != "rl" or step <= 0:
            return
        now = time.perf_counter()
        if state["last"] is not None and args.warmup < state["step"] <= args.warmup + args.steps:
            state["walls"].append(now - state["last"])
        state["last"] = now

    ours.run_stage(cfg, inputs, hook)
    timed = dict(state["snap"] or timer.totals)
    prof = state["prof"]
    if prof is not None:
        prof.__exit__(None, None, None)

    # the timed steps: the first one's wall time starts at the previous step's hook
    n = args.steps
    wall = sum(state["walls"]) / max(1, len(state["walls"]))
    per_step = {k: v / n for k, v in timed.items()}
    inside = sum(per_step.values())
    per_step["outside training_step"] = max(0.0, wall - inside)
    order = ["generation", "reward", "reference forward", "value forward", "policy forward", "loss + advantages", "backward",
             "grad clip", "optimizer", "other in training_step", "outside training_step"]
    print(f"\n{args.algo}: {n} steps after {args.warmup} warm-up, {args.threads} thread(s), "
          f"wall {wall * 1e3:.1f} ms/step (median {statistics.median(state['walls']) * 1e3:.1f})\n")
    print("| phase | ms/step | share |")
    print("|---|---|---|")
    for k in order:
        if k in per_step:
            print(f"| {k} | {per_step[k] * 1e3:.1f} | {100 * per_step[k] / wall:.0f}% |")
    result = {"algo": args.algo, "threads": args.threads, "wall_s_per_step": wall, "phases_s_per_step": per_step}
    if prof is not None:
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        ev = [e for e in ev if not e.key.startswith(tuple(order))][: args.top]
        tot = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
        k = args.profile_steps
        print(f"\ntop operations by self CPU time ({k} profiled steps; profiler overhead included)\n")
        print("| operation | calls/step | self ms/step | share |")
        print("|---|---|---|---|")
        for e in ev:
            print(f"| `{e.key}` | {e.count / k:.0f} | {e.self_cpu_time_total / 1e3 / k:.1f} | "
                  f"{100 * e.self_cpu_time_total / tot:.1f}% |")
        result["top_ops"] = [{"op": e.key, "calls_per_step": e.count / k, "self_ms_per_step":
                              e.self_cpu_time_total / 1e3 / k} for e in ev]
        if args.trace:
            prof.export_chrome_trace(args.trace)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
