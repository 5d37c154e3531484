"""Pairwise preference model stage (kind ``preference_model``, settings ``preference_model.*``).

Learns P(a ≻ b | x) directly from preference pairs (the task's pairs, labelled by sampling
its gold preference, or a user's ``prompt``/``chosen``/``rejected`` file). Unlike a
Bradley-Terry reward model it reads both responses together, so it can represent
intransitive (cyclic) preferences; it is antisymmetric by construction
(:mod:`pipeline.models.preference`). Usable wherever a judge is accepted (the ``nlhf``
stage's ``judge`` input, the evaluate stage's ``preference`` input).

Held-out metrics (a ``preference_model.data.eval_fraction`` split of the pairs):
``val/accuracy``, ``val/loss`` (logistic NLL), ``val/ece`` (expected calibration error) and,
on the task's own pairs, ``val/gold_mae`` (mean |P − P*| against the gold preference).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.algorithms.preference_losses import logistic_nll
from pipeline.data import PairCollator, ResumableLoader, load_preference_examples, seeded_generator, split_holdout, tokenize_comparisons
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import expected_calibration_error, heldout_source, write_heldout
from pipeline.models.loading import count_parameters, resolve_tokenizer
from pipeline.models.preference import META, PreferenceModel
from pipeline.models.reward import classifier_source
from pipeline.modules.preference import PreferenceModule
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task
from pipeline.training import RecordSteps, build_trainer, fit, trained_steps

INIT_CHOICES = ("sft", "model")


def comparison_rows(examples, tokenizer, max_length: int, where: str, on_long_prompt: str = "error") -> list[dict]:
    """PairCollator rows: ``chosen_input_ids`` = the comparison with the chosen response first,
    ``rejected_input_ids`` = the same comparison in the other order."""
    ab, ba = tokenize_comparisons([e.prompt for e in examples], [e.chosen for e in examples],
                                  [e.rejected for e in examples], tokenizer, max_length, where, on_long_prompt,
                                  sources=[getattr(e, "where", None) for e in examples])
    return [{"chosen_input_ids": x, "rejected_input_ids": y, "index": i, "subset": e.subset}
            for i, (e, x, y) in enumerate(zip(examples, ab, ba)) if x is not None]


@STAGES.register("preference_model")
class PreferenceModelStage(Stage):
    kind = "preference_model"
    produces = "preference_model"
    #: the SFT policy is the backbone with preference_model.init_from=sft (the default)
    roles = {"policy": Role({"policy"}, required=False)}
    config_keys = ("task", "preference_model", "trainer")
    ignored_task_fields = ("num_train_prompts", "num_eval_prompts")
    headline = ("val/accuracy", "val/ece", "val/gold_mae", "train/pairs")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        pcfg = cfg.preference_model
        if pcfg.init_from not in INIT_CHOICES:
            raise ConfigError(f"unknown value {pcfg.init_from!r}; choose one of {INIT_CHOICES}",
                              where="preference_model.init_from")
        if pcfg.init_from == "sft" and "policy" not in spec.inputs:
            raise ConfigError(f"stage {spec.name!r} starts from the SFT policy (preference_model.init_from=sft) but "
                              "has no `policy` input", where=f"pipeline.stages.{spec.name}.inputs",
                              fix="add `policy: sft`, or set preference_model.init_from=model with preference_model.model.*")
        if pcfg.calibration_bins < 1:
            raise ConfigError("must be >= 1", where="preference_model.calibration_bins")

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        if cfg.preference_model.init_from == "sft":  # the backbone comes from the SFT model
            out["preference_model"].pop("model", None)
        return out

    @classmethod
    def check_data(cls, cfg, spec) -> None:
        """The user's preference file (format, columns), before any stage trains."""
        pcfg = cfg.preference_model
        if pcfg.data.path:
            mcfg, key = (pcfg.model, "preference_model.model") if pcfg.init_from == "model" else (cfg.model, "model")
            tokenizer = resolve_tokenizer(mcfg, lambda: ["a"], key=key)  # renders chat data like the real one
            load_preference_examples(pcfg.data, tokenizer=tokenizer, key="preference_model.data")

    def _data(self, tokenizer):
        pcfg = self.cfg.preference_model
        if pcfg.data.path:
            examples = load_preference_examples(pcfg.data, tokenizer=tokenizer, key="preference_model.data")
            return *split_holdout(examples, pcfg.data.eval_fraction, self.cfg.seed), None
        task = build_task(self.cfg.task)
        train, val = split_holdout(task.preference_examples("pref"), pcfg.data.eval_fraction, self.cfg.seed)
        return train, val, task

    def run(self, work_dir: Path) -> dict:
        pcfg = self.cfg.preference_model
        make, tokenizer, _ = classifier_source(
            pcfg.init_from, policy_dir=self.input("policy").model_dir if pcfg.init_from == "sft" else None,
            model_cfg=pcfg.model, corpus_fn=lambda: build_task(self.cfg.task).corpus(),
            max_length=self.cfg.model.max_length, key="preference_model")
        backbone = make()
        max_length = pcfg.max_length or _position_limit(backbone.config)
        train, val, task = self._data(tokenizer)
        if not train:
            raise DataError("no preference pairs to train on", where="preference_model.data")
        if pcfg.data.path:  # evaluation follows the user's data
            write_heldout(work_dir, pairs=val, source=heldout_source(pcfg.data.path, pcfg.data.eval_fraction, len(val)))
        where = "preference_model.data"
        collate = PairCollator(tokenizer.pad_token_id)
        gen = seeded_generator(self.cfg.seed)
        rows = lambda ex: comparison_rows(ex, tokenizer, max_length, where, pcfg.data.on_long_prompt)
        train_loader = ResumableLoader(rows(train), batch_size=pcfg.batch_size, shuffle=True, collate_fn=collate,
                                  generator=gen)
        val_rows = rows(val) if val else []
        val_loader = DataLoader(val_rows, batch_size=64, collate_fn=collate) if val_rows else None
        module = PreferenceModule(PreferenceModel(backbone), pcfg.optim)
        trainer = build_trainer(self.cfg, stage=self.name, work_dir=work_dir, max_epochs=pcfg.max_epochs,
                                max_steps=pcfg.max_steps, accumulate_grad_batches=pcfg.gradient_accumulation_steps,
                                hook=self.hook, checkpoint=pcfg.checkpoint, callbacks=[RecordSteps()],
                                resume=self.resume)
        fit(trainer, module, train_loader, val_loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        model = module.model.cpu().eval()
        if val_loader is not None:
            kept = [val[r["index"]] for r in val_rows]
            metrics.update(heldout_metrics(module, val_loader, pcfg.calibration_bins, kept, task))
        model.backbone.save_pretrained(work_dir / "model", safe_serialization=True)
        tokenizer.save_pretrained(work_dir / "model")
        (work_dir / META).write_text(json.dumps({"max_length": max_length}, indent=2))
        metrics.update({"train/pairs": len(train), "val/pairs": len(val), "train/steps": trained_steps(trainer),
                        "model/parameters": count_parameters(model)})
        self.record["preference_model"] = {"init_from": pcfg.init_from, "max_length": max_length}
        return metrics


def _position_limit(config) -> int:
    for attr in ("n_positions", "max_position_embeddings"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ConfigError("cannot tell the backbone's maximum length", where="preference_model.max_length",
                      fix="set preference_model.max_length")


@torch.no_grad()
def heldout_metrics(module: PreferenceModule, loader, bins: int, examples, task) -> dict:
    """``val/loss``, ``val/accuracy``, ``val/ece`` on held-out pairs from the final weights (as the
    reward stage computes its ``val/*``) and, for the task's own pairs, ``val/gold_mae``."""
    z = torch.cat([module.logits(batch) for batch in loader]).double()
    p = torch.sigmoid(z)
    out = {"val/loss": float(logistic_nll(z, label_smoothing=0.0).mean()), "val/accuracy": float((z > 0).double().mean()),
           "val/ece": expected_calibration_error(p, torch.ones_like(p), bins)}
    if task is not None:
        gold = torch.tensor(task.gold_preference([e.prompt for e in examples], [e.chosen for e in examples],
                                                 [e.rejected for e in examples]), dtype=torch.float64)
        out["val/gold_mae"] = float((p - gold).abs().mean())
    return out
