"""TRL's side of the offline DPO benchmark: ``DPOTrainer`` (trl 1.16) on the same SFT model and pairs.

Runs in the TRL venv made by ``bash bench/setup_trl.sh trl116`` (the project is not installed there):

    bench/.venv-trl116/bin/python bench/dpo_trl.py --inputs /tmp/bench/dpo/inputs.json --steps 60 --threads 1 \
        [--precompute] --out bench/results/trl_dpo.json

Same as our side (``bench/dpo_ours.py run``): the SFT model directory, ``train.jsonl``, pairs per
step, ``max_length``, β, sigmoid loss, AdamW (0.9, 0.95, eps 1e-8, no weight decay), constant lr
without warm-up, grad clip 1.0, fp32 on CPU, dropout off, one thread, the held-out evaluation
(``bench/dpo_common.py``) every ``--eval-every`` steps with the clock paused. TRL's
``DPOConfig`` defaults that would differ are set explicitly: ``bf16=False`` (default True),
``gradient_checkpointing=False`` (default True: recomputes activations to save memory, ~30%
slower; ``--gradient-checkpointing`` restores it), ``learning_rate`` (default 1e-6). Both sides read
``train.jsonl`` (shuffled once by ``export``) in file order, so they train on the same batches and
their held-out curves can be compared step for step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dpo_common  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default="/tmp/bench/dpo/inputs.json")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="pairs per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default (off here)")
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.65, help="held-out implicit-reward accuracy target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import importlib.metadata as md

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    heldout = dpo_common.load_heldout(inputs["heldout"])
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(inputs["sft_model_dir"])
    model = AutoModelForCausalLM.from_pretrained(inputs["sft_model_dir"])
    rows = [json.loads(line) for line in Path(inputs["train"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    timer = dpo_common.StepTimer()
    marks: dict = {}

    class Bench(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks["train_start"] = time.perf_counter()
            timer.start()

        def on_step_end(self, a, state, control, model=None, **kw):
            row = timer.step()
            if row["step"] % args.eval_every == 0 or row["step"] == args.steps:
                with timer.paused():
                    row.update(dpo_common.heldout_eval(model, heldout, args.beta))
                print(f"[bench] step {row['step']:3d} {row['step_s']:.3f}s acc {row['heldout_accuracy']:.3f} "
                      f"margin {row['heldout_margin']:+.3f}", flush=True)

    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-dpo-trl-"),
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        beta=args.beta, loss_type=["sigmoid"], max_length=inputs["max_length"],
        precompute_ref_log_probs=args.precompute, gradient_checkpointing=args.gradient_checkpointing,
        bf16=False, fp16=False, use_cpu=True, disable_dropout=True, dataloader_num_workers=0,
        report_to=[], logging_steps=10, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        seed=args.seed, data_seed=args.seed,
        train_sampling_strategy="sequential",  # train.jsonl is pre-shuffled: both sides see the same batches
    )
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok, callbacks=[Bench()])
    trainer.remove_callback(PrinterCallback)
    ds = trainer.train_dataset
    tokens = {"train_prompt_tokens": sum(len(x) for x in ds["prompt_ids"]),
              "train_response_tokens": sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]))}
    trainer.train()
    summary = dpo_common.summarize(
        timer.rows, batch=args.batch, target=args.target, side="trl", precompute=args.precompute,
        threads=torch.get_num_threads(), setup_s=marks["train_start"] - t0,
        gradient_checkpointing=args.gradient_checkpointing,
        versions={p: md.version(p) for p in ("trl", "torch", "transformers", "accelerate", "datasets")},
        same_tokens=all(tokens[k] == inputs[k] for k in tokens), **tokens,
    )
    dpo_common.write_result(args.out, summary, timer.rows, vars(args))


if __name__ == "__main__":
    main()
