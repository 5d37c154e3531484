"""Reward-model stage: Bradley-Terry on preference pairs, optional K-member ensemble."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from pipeline.algorithms.reward_losses import bradley_terry_loss
from pipeline.data import PairCollator, ResumableLoader, load_preference_examples, seeded_generator, split_holdout, tokenize_pairs
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import heldout_source, write_heldout
from pipeline.models.loading import check_model_config, count_parameters, resolve_tokenizer
from pipeline.models.reward import META, RewardEnsemble, RewardScorer, classifier_source
from pipeline.modules.reward import RewardModule
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task
from pipeline.training import RecordSteps, build_trainer, fit, trained_steps

INIT_CHOICES = ("sft", "model")


@STAGES.register("reward")
class RewardStage(Stage):
    kind = "reward"
    produces = "reward_model"
    #: the SFT policy is the backbone with reward.init_from=sft (the default)
    roles = {"policy": Role({"policy"}, required=False)}
    config_keys = ("task", "reward", "trainer")
    ignored_task_fields = ("num_train_prompts", "num_eval_prompts")
    headline = ("val/accuracy", "val/loss", "train/pairs")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        rcfg = cfg.reward
        if rcfg.init_from not in INIT_CHOICES:
            raise ConfigError(f"unknown value {rcfg.init_from!r}; choose one of {INIT_CHOICES}", where="reward.init_from")
        if rcfg.init_from == "sft" and "policy" not in spec.inputs:
            raise ConfigError(f"stage {spec.name!r} starts from the SFT policy (reward.init_from=sft) but has no "
                              "`policy` input", where=f"pipeline.stages.{spec.name}.inputs",
                              fix="add `policy: sft`, or set reward.init_from=model with reward.model.*")
        if rcfg.ensemble_size < 1:
            raise ConfigError("must be >= 1", where="reward.ensemble_size")
        if rcfg.init_from == "model":
            check_model_config(rcfg.model, "reward.model")

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        if cfg.reward.init_from == "sft":  # the backbone (and its max_length) come from the SFT model
            out["reward"].pop("model", None)
            out["max_length"] = cfg.model.max_length
        return out

    # ------------------------------------------------------------------ model
    def _members(self, k_members: int):
        rcfg = self.cfg.reward
        make, tokenizer, max_length = classifier_source(
            rcfg.init_from, policy_dir=self.input("policy").model_dir if rcfg.init_from == "sft" else None,
            model_cfg=rcfg.model, corpus_fn=lambda: build_task(self.cfg.task).corpus(),
            max_length=self.cfg.model.max_length, key="reward")
        members = []
        for k in range(k_members):
            L.seed_everything(self.cfg.seed + k, verbose=False)  # members differ in head init
            members.append(make())
        return members, tokenizer, max_length

    # ------------------------------------------------------------------- data
    @classmethod
    def check_data(cls, cfg, spec) -> None:
        """The user's preference file: format and columns; prompt lengths when the reward
        model's tokenizer is known before SFT has run (a pretrained backbone)."""
        rcfg = cfg.reward
        if not rcfg.data.path:
            return
        mcfg, max_length = (rcfg.model, rcfg.model.max_length) if rcfg.init_from == "model" else \
            (cfg.model, cfg.model.max_length)
        known = bool(mcfg.name_or_path or mcfg.tokenizer)
        tokenizer = resolve_tokenizer(mcfg, lambda: ["a"], key="reward.model" if rcfg.init_from == "model" else "model")
        examples = load_preference_examples(rcfg.data, tokenizer=tokenizer, key="reward.data")
        if known:
            tokenize_pairs(examples, tokenizer, max_length, where="reward.data", on_long_prompt=rcfg.data.on_long_prompt)

    def _data(self, tokenizer, max_length: int):
        """(train rows, held-out rows, reference (prompt, response) pairs for the N+ offset).
        Every pair is tokenized before the split: a too-long prompt is named at its first line."""
        rcfg = self.cfg.reward
        if rcfg.data.path:
            examples = load_preference_examples(rcfg.data, tokenizer=tokenizer, key="reward.data")
        else:
            task = build_task(self.cfg.task)
            examples = task.preference_examples("pref")
        rows = tokenize_pairs(examples, tokenizer, max_length, where="reward.data",
                              on_long_prompt=rcfg.data.on_long_prompt)
        train, val = split_holdout(rows, rcfg.data.eval_fraction, self.cfg.seed)
        if rcfg.data.path:
            used = [examples[r["index"]] for r in train]
            reference = [(e.prompt, e.chosen) for e in used] + [(e.prompt, e.rejected) for e in used]
            self.heldout_pairs = [examples[r["index"]] for r in val]  # evaluation follows the user's data
        else:
            reference = [(e.prompt, e.completion) for e in task.sft_examples("eval")]
        # bootstrap weights are keyed by the position in the training set
        train = [dict(r, index=j) for j, r in enumerate(train)]
        return train, val, reference

    def run(self, work_dir: Path) -> dict:
        rcfg = self.cfg.reward
        members, tokenizer, max_length = self._members(rcfg.ensemble_size)
        self.heldout_pairs = None
        train, val, reference = self._data(tokenizer, max_length)
        if not train:
            raise DataError("no preference pairs to train on", where="reward.data")
        if self.heldout_pairs is not None:
            write_heldout(work_dir, pairs=self.heldout_pairs, source=heldout_source(
                rcfg.data.path, rcfg.data.eval_fraction, len(self.heldout_pairs)))
        collate = PairCollator(tokenizer.pad_token_id)
        gen = seeded_generator(self.cfg.seed)  # picklable: ddp_spawn ships the loaders to workers
        train_loader = ResumableLoader(train, batch_size=rcfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
        val_loader = DataLoader(val, batch_size=64, collate_fn=collate) if val else None
        ensemble = RewardEnsemble(members)
        module = RewardModule(ensemble, rcfg.optim, center_coef=rcfg.center_rewards_coefficient,
                              use_margin=rcfg.use_margin, seed=self.cfg.seed)
        trainer = build_trainer(self.cfg, stage=self.name, work_dir=work_dir, max_epochs=rcfg.max_epochs,
                                max_steps=rcfg.max_steps, accumulate_grad_batches=rcfg.gradient_accumulation_steps,
                                hook=self.hook, checkpoint=rcfg.checkpoint, callbacks=[RecordSteps()],
                                resume=self.resume)
        fit(trainer, module, train_loader, val_loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

        ensemble = module.ensemble.cpu().eval()
        if val_loader is not None:  # also when max_steps ended training before any validation pass
            metrics.update(heldout_pair_metrics(module, val_loader))
        scorer = RewardScorer(ensemble, tokenizer, [0.0] * len(members), max_length)
        offsets = [0.0] * len(members)
        if rcfg.normalize_to_sft and reference:
            ref = reference[:512]
            offsets = scorer.member_scores([p for p, _ in ref], [c for _, c in ref]).mean(1).tolist()
        names = []
        for k, member in enumerate(ensemble.members):
            name = f"model/member_{k}"
            member.save_pretrained(work_dir / name, safe_serialization=True)
            tokenizer.save_pretrained(work_dir / name)
            names.append(name)
        meta = {"members": names, "offsets": offsets, "max_length": max_length}
        (work_dir / META).write_text(json.dumps(meta, indent=2))
        metrics.update({"train/pairs": len(train), "train/steps": trained_steps(trainer), "val/pairs": len(val),
                        "reward/offset_mean": sum(offsets) / len(offsets),
                        "model/parameters": count_parameters(ensemble)})
        self.record["reward_model"] = {"ensemble_size": len(members), "init_from": rcfg.init_from}
        return metrics


@torch.no_grad()
def heldout_pair_metrics(module: RewardModule, loader) -> dict:
    """``val/loss`` (Bradley-Terry, no margin) and ``val/accuracy`` of the ensemble mean on held-out pairs.

    Computed on the final weights after fit, as SFT's ``val/loss`` is: Lightning validates
    only at epoch ends, so a ``max_steps`` run stopped mid-epoch would report nothing.
    """
    chosen, rejected = [], []
    for batch in loader:
        r_c, r_r = module._scores(batch)
        chosen.append(r_c.mean(0))
        rejected.append(r_r.mean(0))
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)
    return {"val/loss": float(bradley_terry_loss(r_c, r_r)), "val/accuracy": float((r_c > r_r).float().mean())}

