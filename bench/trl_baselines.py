"""TRL baselines for the online-RL benchmark: GRPO / RLOO (trl 1.16) and PPO (trl 1.12).

Runs in one of the isolated TRL venvs made by ``bench/setup_trl.sh`` (the project is
not installed there): inputs come as files written by ``bench/common.py export`` (a
prompts jsonl, the SFT model dir, the RM member dir), the gold reward is the
project's own ``pipeline.tasks`` code (importable without the project's heavy deps), and the per-step metrics / summary are
computed by ``bench/common.py`` exactly as for our side.

    I=/tmp/bench/inputs/inputs.json
    bench/.venv-trl116/bin/python bench/trl_baselines.py --algo grpo --inputs $I --steps 30 --out bench/results/trl_grpo.json
    bench/.venv-trl116/bin/python bench/trl_baselines.py --algo rloo --inputs $I --steps 30 --out bench/results/trl_rloo.json
    bench/.venv-trl112/bin/python bench/trl_baselines.py --algo ppo  --inputs $I --steps 30 --out bench/results/trl_ppo.json

``--inputs`` fills ``--model-dir``, ``--rm-dir``, ``--rm-offset``, ``--prompts`` and
``--target-gold``; each can also be given (or overridden) on its own.

What is recorded per step (one optimizer step for GRPO/RLOO = one rollout batch;
one PPO "update" = rollout + ``ppo_epochs x num_mini_batches`` optimizer steps):
wall time since training began (model loading excluded, it is reported as
``setup_s``), the mean gold reward of the completions sampled in that step, peak
RSS. GRPO/RLOO train on the gold reward (the reward function is the gold scorer, so
the batch gold is what the trainer saw); PPO trains on the RM (``--rm-dir`` is both
reward and value model, as TRL's PPO requires) and the gold reward is computed on
the same sampled completions by wrapping TRL's ``get_reward``.

Matched settings (defaults = the project's ``conf/algorithm`` presets where they exist):
P=``--batch`` prompts per step x G=``--num-generations`` completions (PPO: G=1),
``--max-new-tokens`` 24, temperature 1.0, top-k 0, top-p 1, AdamW(0.9, 0.95, eps 1e-8,
wd 0), constant lr, no warm-up, grad-clip 1.0 (GRPO/RLOO; TRL's PPO loop does not
clip), CPU, fp32, no vLLM, gradient accumulation 1, dataloader workers 0, logging to
nothing. GRPO: ``loss_type=grpo`` (seq-mean-token-mean), group-std scaling, k3 KL in
the loss (beta 0.04). RLOO: k1 sequence KL in the reward (beta 0.05), unnormalised
advantages. PPO: 4 epochs x 2 minibatches, k1 KL in the reward (0.05), GAE(1.0, 0.95),
value clip 0.2, vf_coef 0.1, missing-EOS penalty 1.0, stop at EOS.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import StepLog, peak_rss_mb, summarize, write_result  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's task code (light imports)


_GOLD: list = []


def use_task(task_cfg: dict) -> None:
    """Score with the project's own task code (pipeline.tasks: light imports, no copy)."""
    from types import SimpleNamespace

    from pipeline.tasks import build_task

    _GOLD[:] = [build_task(SimpleNamespace(**task_cfg)).gold_reward]


def gold_reward(prompts, completions):
    if not _GOLD:  # no --inputs: the lexicon task with its defaults
        use_task({"name": "lexicon", "seed": 1234, "num_train_prompts": 2000, "num_pref_prompts": 2000,
                  "num_eval_prompts": 128, "bt_beta": 4.0, "label_noise": 0.0, "demo_quality": 0.3, "options": {}})
    return _GOLD[0](list(prompts), list(completions))

#: defaults mirroring conf/algorithm/{grpo,rloo,ppo}.yaml
ALGO_DEFAULTS = {
    "grpo": {"num_generations": 4, "beta": 0.04},
    "rloo": {"num_generations": 4, "beta": 0.05},
    "ppo": {"num_generations": 1, "beta": 0.05},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=sorted(ALGO_DEFAULTS), required=True)
    ap.add_argument("--inputs", help="inputs.json from `bench/common.py export` (fills the paths and target)")
    ap.add_argument("--model-dir", help="SFT model (HF GPT-2 dir with tokenizer)")
    ap.add_argument("--rm-dir", help="reward model member dir (GPT2ForSequenceClassification), PPO only")
    ap.add_argument("--rm-offset", type=float, default=None,
                    help="subtracted from RM scores like our RewardScorer (default: inputs.json's rm_offset)")
    ap.add_argument("--prompts", help="jsonl with a `prompt` column")
    ap.add_argument("--steps", type=int, default=30, help="rollout steps (= optimizer steps for GRPO/RLOO)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per step (P)")
    ap.add_argument("--num-generations", type=int, default=None, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", "--kl-coef", dest="beta", type=float, default=None, help="KL coefficient")
    ap.add_argument("--ppo-reward", choices=["rm", "gold"], default="rm",
                    help="PPO's training reward: the RM (TRL's way) or the gold reward (like GRPO/RLOO here); "
                         "the value model is initialised from --rm-dir either way")
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--num-mini-batches", type=int, default=2)
    ap.add_argument("--missing-eos-penalty", type=float, default=1.0, help="PPO only; <0 disables")
    ap.add_argument("--target-gold", type=float, default=None, help="default: inputs.json's target_gold")
    ap.add_argument("--window", type=int, default=3, help="running-mean window for time-to-target")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-samples", type=int, default=0, help="print N completions per step")
    ap.add_argument("--out", help="write {summary, config, steps} JSON here")
    args = ap.parse_args(argv)

    if args.inputs:
        info = json.loads(Path(args.inputs).read_text())
        use_task(info["task"])
        args.model_dir = args.model_dir or info["sft_model_dir"]
        args.rm_dir = args.rm_dir or info.get("rm_dir")
        args.prompts = args.prompts or info["prompts"]
        if args.rm_offset is None:
            args.rm_offset = info.get("rm_offset", 0.0)
        if args.target_gold is None:
            args.target_gold = info.get("target_gold")
        args.sft_gold = info.get("sft_gold_mean")
    else:
        args.sft_gold = None
    if args.rm_offset is None:
        args.rm_offset = 0.0
    for k, v in ALGO_DEFAULTS[args.algo].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.model_dir or not args.prompts:
        ap.error("--model-dir and --prompts (or --inputs) are required")
    if args.algo == "ppo":
        if not args.rm_dir:
            ap.error("--rm-dir (or --inputs) is required for ppo")
        if args.num_generations != 1:
            ap.error("TRL's PPO samples one completion per prompt: --num-generations 1")
    elif args.num_generations < 2:
        ap.error(f"{args.algo} needs --num-generations >= 2")
    return args


def load_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_callback(log: StepLog, pending: list[float], samples: list):
    from transformers import TrainerCallback

    trl_logs: dict[int, dict] = {}

    class BenchCallback(TrainerCallback):
        """Times each optimizer step and attaches the gold rewards gathered during it."""

        def on_train_begin(self, args, state, control, **kw):
            log.start()

        def on_step_end(self, args, state, control, **kw):
            row = log.step(list(pending))
            pending.clear()
            print(f"[bench] step {row['step']:3d}  {row['step_s']:6.2f}s  gold {row['gold_mean']:+.3f}  "
                  f"cpu {row['cpu_s']:6.2f}s  rss {row['rss_mb']:.0f} MiB", flush=True)
            for text, g in samples:
                print(f"    {g:+.2f} {text!r}", flush=True)
            samples.clear()

        def on_log(self, args, state, control, logs=None, **kw):
            # GRPO/RLOO log after on_step_end, PPO before it: key by TRL's step counter
            keep = ("reward", "kl", "objective/kl", "objective/scores", "objective/rlhf_reward",
                    "completions/mean_length", "loss", "policy/approxkl_avg", "val/num_eos_tokens")
            if logs:
                trl_logs.setdefault(state.global_step, {}).update(
                    {f"trl/{k}": v for k, v in logs.items() if k in keep})

        def on_train_end(self, args, state, control, **kw):
            for row in log.rows:
                row.update(trl_logs.get(row["step"], {}))

    return BenchCallback()


def common_training_args(args, output_dir: str) -> dict:
    """TrainingArguments shared by all three trainers (same optimizer, no logging, CPU, fp32)."""
    return dict(
        output_dir=output_dir,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_accumulation_steps=1,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )


def build_grpo_rloo(args, prompts, tokenizer, log, pending, samples, output_dir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    if args.algo == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer

        extra = dict(loss_type="grpo", scale_rewards="group")
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

        extra = dict(normalize_advantages=False)

    def gold(prompts, completions, **kwargs):
        r = gold_reward(prompts, completions)
        pending.extend(r)
        samples[:] = list(zip(completions, r))[: args.print_samples]
        return r

    cfg = Config(
        **common_training_args(args, output_dir),
        per_device_train_batch_size=args.batch * args.num_generations,  # counted in completions
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        num_iterations=1,
        max_steps=args.steps,
        use_vllm=False,
        log_completions=False,
        disable_dropout=True,
        **extra,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    return Trainer(model=model, reward_funcs=gold, args=cfg, train_dataset=dataset, processing_class=tokenizer,
                   callbacks=[make_callback(log, pending, samples)])


def build_ppo(args, prompts, tokenizer, log, pending, samples, output_dir):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:  # trl 1.x: experimental; trl 0.x: top level
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        import trl.experimental.ppo.ppo_trainer as ppo_mod
    except ImportError:
        from trl import PPOConfig, PPOTrainer
        import trl.trainer.ppo_trainer as ppo_mod

    policy = AutoModelForCausalLM.from_pretrained(args.model_dir)
    ref = AutoModelForCausalLM.from_pretrained(args.model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(args.rm_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(args.rm_dir, num_labels=1)
    for m in (rm, value):
        m.config.pad_token_id = tokenizer.pad_token_id

    # Score with the gold reward the same completions the RM scores (after truncation at
    # the first EOS), and apply our RewardScorer's offset to the RM score.
    orig_get_reward = ppo_mod.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        out = orig_get_reward(model, query_responses, pad_token_id, context_length)
        if model is rm:
            q = tokenizer.batch_decode(query_responses[:, :context_length], skip_special_tokens=True)
            c = tokenizer.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
            g = gold_reward(q, c)
            pending.extend(g)
            samples[:] = list(zip(c, g))[: args.print_samples]
            if args.ppo_reward == "gold":  # train on the gold reward (the RM only initialises the critic)
                out = (out[0], torch.tensor(g, dtype=out[1].dtype, device=out[1].device), out[2])
            elif args.rm_offset:
                out = (out[0], out[1] - args.rm_offset, out[2])
        return out

    ppo_mod.get_reward = get_reward

    def tokenize(row):
        return {"input_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]}

    dataset = Dataset.from_list([{"prompt": p} for p in prompts]).map(tokenize, remove_columns=["prompt"])
    cfg = PPOConfig(
        **common_training_args(args, output_dir),
        per_device_train_batch_size=args.batch,  # rollout batch (grad accumulation 1)
        num_mini_batches=args.num_mini_batches,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.steps * args.batch,
        response_length=args.max_new_tokens,
        stop_token="eos",
        temperature=args.temperature,
        kl_coef=args.beta,
        kl_estimator="k1",
        missing_eos_penalty=args.missing_eos_penalty if args.missing_eos_penalty >= 0 else None,
        local_rollout_forward_batch_size=max(64, args.batch),
        num_sample_generations=0,
        whiten_rewards=False,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
    )
    return PPOTrainer(args=cfg, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=rm,
                      value_model=value, train_dataset=dataset, eval_dataset=dataset.select(range(args.batch)),
                      callbacks=[make_callback(log, pending, samples)])


def main(argv=None):
    args = parse_args(argv)
    import importlib.metadata as md

    import torch
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_setup = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.padding_side = "left"
    prompts = load_prompts(args.prompts)
    log, pending, samples = StepLog(), [], []
    output_dir = tempfile.mkdtemp(prefix=f"trl-{args.algo}-")
    build = build_ppo if args.algo == "ppo" else build_grpo_rloo
    trainer = build(args, prompts, tokenizer, log, pending, samples, output_dir)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our callback prints one line per step
    setup_s = time.perf_counter() - t_setup
    rss_before_train = peak_rss_mb()
    load_before = os.getloadavg()[0]
    trainer.train()

    versions = {p: md.version(p) for p in ("trl", "torch", "transformers", "accelerate", "datasets")}
    config = {k: v for k, v in vars(args).items()}
    config.update(versions=versions, torch_threads=torch.get_num_threads(),
                  samples_per_step=args.batch * args.num_generations)
    summary = summarize(
        log.rows, target=args.target_gold, window=args.window,
        side="trl", algo=args.algo, reward=args.ppo_reward if args.algo == "ppo" else "gold",
        trl=versions["trl"], threads=torch.get_num_threads(), setup_s=setup_s,
        rss_before_train_mb=rss_before_train, sft_gold=args.sft_gold,
        prompts_per_step=args.batch, num_generations=args.num_generations,
        loadavg_1m_before=load_before, loadavg_1m_after=os.getloadavg()[0], cpu_count=os.cpu_count(),
    )
    write_result(args.out, summary, log.rows, config)


if __name__ == "__main__":
    main()
