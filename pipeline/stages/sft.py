"""SFT stage: fine-tune the base policy on demonstrations (completion-only loss)."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from pipeline.data import ResumableLoader, SFTCollator, load_sft_examples, seeded_generator, split_holdout, tokenize_sft
from pipeline.errors import DataError
from pipeline.models.loading import check_model_config, count_parameters, resolve_tokenizer, save_pretrained
from pipeline.models.policy import apply_lora, base_policy
from pipeline.modules.sft import SFTModule, heldout_nll
from pipeline.stages.base import STAGES, Stage
from pipeline.tasks import build_task
from pipeline.training import RecordSteps, build_trainer, fit, trained_steps


@STAGES.register("sft")
class SFTStage(Stage):
    kind = "sft"
    produces = "policy"
    roles = {}
    config_keys = ("task", "model", "sft", "trainer")
    ignored_task_fields = ("num_pref_prompts", "num_eval_prompts", "bt_beta", "label_noise")
    headline = ("val/loss", "val/loss_init", "train/steps")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        check_model_config(cfg.model)

    @classmethod
    def check_data(cls, cfg, spec) -> None:
        if cfg.sft.data.path:  # the user's file: format, columns, prompt lengths (tokenizer resolved as in run)
            _user_rows(cfg)

    def run(self, work_dir: Path) -> dict:
        cfg, scfg = self.cfg, self.cfg.sft
        max_len = cfg.model.max_length
        if cfg.sft.data.path:
            train_rows, val_rows, tokenizer, corpus = _user_rows(cfg)
        else:
            task = build_task(cfg.task)
            tokenizer, corpus = None, task.corpus
        model, tokenizer = base_policy(cfg.model, corpus, tokenizer=tokenizer)
        if not cfg.sft.data.path:
            train_rows, val_rows = (tokenize_sft(task.sft_examples(split), tokenizer, max_len,
                                                 completion_only=scfg.completion_only_loss, where="sft.data")
                                    for split in ("sft", "eval"))
        if not train_rows:
            raise DataError("no training examples left after tokenization", where="sft.data")
        collate = SFTCollator(tokenizer.pad_token_id)
        gen = seeded_generator(cfg.seed)  # picklable: ddp_spawn ships the loaders to workers
        train_loader = ResumableLoader(train_rows, batch_size=scfg.batch_size, shuffle=True, collate_fn=collate,
                                       generator=gen)
        val_loader = DataLoader(val_rows, batch_size=64, collate_fn=collate) if val_rows else None

        init_nll = heldout_nll(model, val_loader) if val_loader else None
        model = apply_lora(model, cfg.model.lora)
        module = SFTModule(model, scfg.optim)
        trainer = build_trainer(cfg, stage=self.name, work_dir=work_dir, max_epochs=scfg.max_epochs,
                                max_steps=scfg.max_steps, accumulate_grad_batches=scfg.gradient_accumulation_steps,
                                hook=self.hook, checkpoint=scfg.checkpoint, callbacks=[RecordSteps()],
                                resume=self.resume)
        fit(trainer, module, train_loader, val_loader)
        trained = module.model
        if hasattr(trained, "merge_and_unload"):
            trained = trained.merge_and_unload()
        final_nll = heldout_nll(trained, val_loader) if val_loader else None
        save_pretrained(trained, tokenizer, work_dir / "model")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if val_loader is not None:  # no held-out split: no validation metrics (not NaN)
            metrics.update({"val/loss": final_nll, "val/loss_init": init_nll})
        metrics.update({
            "train/examples": len(train_rows),
            "train/steps": trained_steps(trainer),
            "model/parameters": count_parameters(trained),
        })
        self.record["model"] = {"arch": trained.config.model_type, "parameters": count_parameters(trained)}
        return metrics


def _user_rows(cfg):
    """(train rows, held-out rows, tokenizer, corpus fn) from ``sft.data``: every example is
    tokenized before the split, so a too-long prompt is reported at its first line in the file."""
    dcfg = cfg.sft.data
    # a tokenizer only to render chat templates of conversational rows
    fmt_tok = resolve_tokenizer(cfg.model, lambda: ["a"])
    examples = load_sft_examples(dcfg, tokenizer=fmt_tok, key="sft.data")
    corpus = lambda: [e.prompt + e.completion for e in examples]  # noqa: E731
    tokenizer = resolve_tokenizer(cfg.model, corpus)
    rows = tokenize_sft(examples, tokenizer, cfg.model.max_length, completion_only=cfg.sft.completion_only_loss,
                        where="sft.data", on_long_prompt=dcfg.on_long_prompt)
    train, val = split_holdout(rows, dcfg.eval_fraction, cfg.seed)
    return train, val, tokenizer, corpus
