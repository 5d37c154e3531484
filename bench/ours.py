"""Our side of the TRL comparison: the same SFT model, prompts, gold reward and batch.

    PIPELINE_ROOT=/tmp/bench .venv/bin/python bench/ours.py --algo grpo --steps 30 --threads 1 \
        --out bench/results/ours_grpo.json

Runs our ``rl`` stage (``rl.reward_source=gold``) on exactly the SFT artifact
``bench/common.py export`` recorded (the one the TRL side loads), and records per-step
wall time / gold reward / RSS with ``bench/common.py``'s StepLog (started right before
the first rollout, as on the TRL side).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

#: the TRL side's settings (bench/trl_baselines.py), in our config names
MATCH = {
    "grpo": ["algorithm=grpo", "algorithm.kl_coef=0.04"],
    "rloo": ["algorithm=rloo", "algorithm.kl_coef=0.05"],
    "ppo": ["algorithm=ppo", "algorithm.kl_coef=0.05", "algorithm.temperature=1.0", "rl.prompts_per_step=16"],
    "remax": ["algorithm=remax", "rl.prompts_per_step=64"],
    "reinforce_pp": ["algorithm=reinforce_pp", "rl.prompts_per_step=64"],
}


def compose_cfg(algo: str, inputs: dict, *, steps: int, threads: int, lr: float = 3e-4, seed: int = 0,
                extra=()) -> tuple:
    """(config, overrides) of our ``rl`` stage with the TRL side's settings, on the exported SFT model."""
    from hydra import compose, initialize_config_dir

    from pipeline.config.schema import register_configs
    from pipeline.run import CONF_DIR

    root = Path(inputs["sft_model_dir"]).parents[3]  # <root>/outputs/artifacts/sft-*/model
    overrides = [
        f"paths.root_dir={root}", f"paths.output_dir={root}/outputs/runs/bench-ours-{algo}",
        "pipeline=rl_gold", "rl.reward_source=gold", f"rl.total_steps={steps}",
        f"rl.optim.lr={lr}", "rl.eval_every=0", "rl.log_completions_every=0",
        "algorithm.temperature=1.0", "algorithm.max_new_tokens=24", f"trainer.num_threads={threads}",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "print_summary=false",
        f"seed={seed}", *MATCH[algo], *extra,
    ]
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return cfg, overrides


def run_stage(cfg, inputs: dict, hook) -> None:
    """Our ``rl`` stage's own ``run()`` on the exported SFT artifact (a fresh work dir, nothing cached)."""
    from pipeline.artifacts import Artifact
    from pipeline.run import _setup_env
    from pipeline.stages.rl import RLStage

    _setup_env()
    sft = Artifact.load(Path(inputs["sft_model_dir"]).parent)
    spec = next(s for s in cfg.pipeline.stages if s.kind == "rl")
    work = Path(cfg.paths.output_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    RLStage(cfg, spec, {"policy": sft}, hook=hook).run(work)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", choices=sorted(MATCH), required=True)
    ap.add_argument("--inputs", default="/tmp/bench/inputs/inputs.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    cfg, overrides = compose_cfg(args.algo, inputs, steps=args.steps, threads=args.threads, lr=args.lr,
                                 seed=args.seed, extra=args.overrides)

    from pipeline.modules.rl import OnlineRLModule

    log = common.StepLog()
    rss_before: dict = {}
    original = OnlineRLModule.on_fit_start

    def on_fit_start(self):
        original(self)
        rss_before["mb"] = common.peak_rss_mb()
        log.start()

    OnlineRLModule.on_fit_start = on_fit_start

    def hook(stage, step, metrics):
        if stage == "rl" and step > 0 and "rollout/gold_reward" in metrics:
            log.step(metrics["rollout/gold_reward"], reward=metrics.get("rollout/reward_mean"),
                     kl=metrics.get("policy/kl"), gen_s=metrics.get("perf/gen_time_s"),
                     update_s=metrics.get("perf/update_time_s"))

    run_stage(cfg, inputs, hook)
    summary = common.summarize(log.rows, target=inputs["target_gold"], rss_before_train_mb=rss_before.get("mb"),
                               side="ours", algo=args.algo, reward="gold", threads=args.threads,
                               sft_gold=inputs["sft_gold_mean"])
    common.write_result(args.out, summary, log.rows, {"overrides": overrides})


if __name__ == "__main__":
    main()
