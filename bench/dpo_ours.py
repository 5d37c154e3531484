"""Our side of the offline DPO benchmark, and the export of the inputs both sides share (project venv).

    .venv/bin/python bench/dpo_ours.py export --sft /tmp/bench/outputs/artifacts/sft-<fp> --out /tmp/bench/dpo
    .venv/bin/python bench/dpo_ours.py run --inputs /tmp/bench/dpo/inputs.json --steps 60 --threads 1 \
        [--precompute] --out bench/results/ours_dpo.json

``export`` writes, from an SFT artifact and its task: ``train.jsonl`` (the task's preference pairs
minus the held-out 10%, the split the ``dpo`` stage makes with seed 0: ``prompt``, ``chosen``,
``rejected``), ``heldout.json`` (the held-out pairs as token ids and the SFT model's log-probs of
them: the reference of the held-out metrics) and ``inputs.json``.

``run`` trains with our ``dpo`` stage itself (``DPOStage.run``: the same data loading, collator,
module and Lightning trainer as ``python -m pipeline pipeline=dpo``) on ``train.jsonl`` with the
benchmark's settings, timing each optimizer step and evaluating on the held-out pairs every
``--eval-every`` steps with the clock paused (``bench/dpo_common.py``). The pairs are read in file
order (``export`` shuffled them once; TRL's side uses ``train_sampling_strategy="sequential"``), so
both sides train on the same batches.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import dpo_common  # noqa: E402


def export(args) -> None:
    from omegaconf import OmegaConf

    from pipeline.config.schema import TaskConfig
    from pipeline.data import split_holdout, tokenize_preferences
    from pipeline.models.loading import load_causal_lm, load_tokenizer
    from pipeline.tasks import build_task

    sft = Path(args.sft).resolve()
    manifest = json.loads((sft / "manifest.json").read_text())
    task_cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), manifest["config"]["task"])
    max_length = manifest["config"]["model"]["max_length"]
    examples = build_task(task_cfg).preference_examples("pref")
    train, val = split_holdout(examples, args.eval_fraction, args.seed)
    if args.train_pairs:
        train = train[:args.train_pairs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for e in train:
            f.write(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n")
    tok = load_tokenizer(str(sft / "model"))
    model = load_causal_lm(sft / "model")
    rows = tokenize_preferences(val, tok, max_length)
    pairs = [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in rows]
    heldout = {"pairs": pairs, "pad_token_id": tok.pad_token_id,
               "ref_logps": dpo_common.heldout_logps(model, pairs, tok.pad_token_id)}
    (out / "heldout.json").write_text(json.dumps(heldout))
    train_rows = tokenize_preferences(train, tok, max_length)
    info = {
        "sft_artifact": str(sft), "sft_model_dir": str(sft / "model"), "task": OmegaConf.to_container(task_cfg),
        "max_length": max_length, "train": str((out / "train.jsonl").resolve()), "train_pairs": len(train),
        "heldout": str((out / "heldout.json").resolve()), "heldout_pairs": len(pairs),
        # the token counts the TRL side must reproduce from the same text (same pairs, same tokens)
        "train_prompt_tokens": sum(len(r["prompt_ids"]) for r in train_rows),
        "train_response_tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows),
    }
    (out / "inputs.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    inputs = json.loads(Path(args.inputs).read_text())
    heldout = dpo_common.load_heldout(inputs["heldout"])

    import pipeline.stages.dpo as dpo_stage
    from pipeline.artifacts import Artifact
    from pipeline.config import compose
    from pipeline.modules.dpo import DPOModule
    from pipeline.run import _setup_env

    root = Path(tempfile.mkdtemp(prefix="bench-dpo-ours-"))  # a fresh store: nothing cached from earlier runs
    overrides = [
        "pipeline=dpo", f"dpo.data.path={inputs['train']}", "dpo.data.eval_fraction=0",
        f"dpo.max_steps={args.steps}", "dpo.max_epochs=-1", f"dpo.batch_size={args.batch}", f"dpo.beta={args.beta}",
        f"dpo.optim.lr={args.lr}", "dpo.optim.scheduler=constant", "dpo.optim.warmup_ratio=0",
        f"dpo.precompute_ref_log_probs={str(args.precompute).lower()}", f"model.max_length={inputs['max_length']}",
        f"trainer.num_threads={args.threads}", "trainer.enable_progress_bar=false", f"seed={args.seed}",
        *args.overrides,
    ]
    cfg = compose(overrides, root=root, output_dir=root / "run")
    timer = dpo_common.StepTimer()
    marks: dict = {}

    class BenchModule(DPOModule):
        def on_train_start(self):
            marks["train_start"] = time.perf_counter()
            timer.start()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            row = timer.step()
            if row["step"] % args.eval_every == 0 or row["step"] == args.steps:
                with timer.paused():
                    row.update(dpo_common.heldout_eval(self.policy, heldout, args.beta))
                print(f"[bench] step {row['step']:3d} {row['step_s']:.3f}s acc {row['heldout_accuracy']:.3f} "
                      f"margin {row['heldout_margin']:+.3f}", flush=True)

    dpo_stage.DPOModule = BenchModule
    resumable = dpo_stage.ResumableLoader

    def in_file_order(*a, shuffle=False, generator=None, **kw):  # train.jsonl is pre-shuffled, as on the TRL side
        return resumable(*a, shuffle=False, **kw)

    dpo_stage.ResumableLoader = in_file_order  # the stage's training loader
    dpo_stage.split_holdout = lambda examples, fraction, seed: (list(examples), [])  # no held-out split, no permutation
    _setup_env()
    spec = next(s for s in cfg.pipeline.stages if s.kind == "dpo")
    work = root / "work"
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    stage = dpo_stage.DPOStage(cfg, spec, {"policy": Artifact.load(Path(inputs["sft_artifact"]))})
    stage.run(work)
    import importlib.metadata as md

    summary = dpo_common.summarize(
        timer.rows, batch=args.batch, target=args.target, side="ours", precompute=args.precompute,
        threads=torch.get_num_threads(), setup_s=marks["train_start"] - t0,
        reference=stage.record["dpo"]["reference"], versions={p: md.version(p) for p in ("torch", "transformers",
                                                                                         "lightning")},
    )
    dpo_common.write_result(args.out, summary, timer.rows, {"overrides": overrides, **vars(args)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="train.jsonl, heldout.json, inputs.json from an SFT artifact")
    ex.add_argument("--sft", required=True, help="an sft-<fingerprint> artifact directory")
    ex.add_argument("--out", default="/tmp/bench/dpo")
    ex.add_argument("--eval-fraction", type=float, default=0.1)
    ex.add_argument("--train-pairs", type=int, default=None, help="default: all")
    ex.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="train with our dpo stage and time it")
    r.add_argument("--inputs", default="/tmp/bench/dpo/inputs.json")
    r.add_argument("--steps", type=int, default=60)
    r.add_argument("--batch", type=int, default=32, help="pairs per optimizer step")
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--beta", type=float, default=0.1)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--precompute", action="store_true", help="precompute reference log-probs before training")
    r.add_argument("--eval-every", type=int, default=3)
    r.add_argument("--target", type=float, default=0.65, help="held-out implicit-reward accuracy target")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default=None)
    r.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args(argv)
    export(args) if args.cmd == "export" else run(args)


if __name__ == "__main__":
    main()
