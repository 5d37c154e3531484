"""DPO-family stage (kind ``dpo``): offline preference optimisation of a policy on preference pairs,
with any pairwise loss of ``PREFERENCE_LOSSES`` or a weighted mix (settings ``dpo.*``).

Inputs: ``policy`` (the initial policy, and the reference unless ``reference`` is given) and,
optionally, ``reference`` (another policy the implicit reward is measured against). Data:
``dpo.data.path`` (a preference file in any supported format) or, when unset, the task's
preference pairs; ``dpo.data.eval_fraction`` of them are held out (the same split the reward
stage makes with the same seed).

Publishes the trained policy (HF format, LoRA merged). With ``dpo.precompute_ref_log_probs`` the
reference log-probs of every pair are computed once, before training, into a content-addressed
``ref_logps-<fingerprint>`` entry of the artifact store (keyed by the reference's fingerprint, the
exact token ids of the pairs and the numeric setup, so a rerun that changes only loss settings
reuses them) and copied into this stage's artifact as ``ref_logps.safetensors``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from torch.utils.data import DataLoader

from pipeline.algorithms.preference_losses import OPTION_NAMES, PREFERENCE_LOSSES, validate_loss_config
from pipeline.artifacts import ArtifactStore, fingerprint
from pipeline.config import plain
from pipeline.config.schema import DPOConfig
from pipeline.data import (
    PreferenceCollator,
    ResumableLoader,
    load_preference_examples,
    seeded_generator,
    split_holdout,
    tokenize_preferences,
)
from pipeline.data.collate import check_on_long_prompt
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation import heldout_source, write_heldout
from pipeline.models.loading import count_parameters, resolve_tokenizer, save_pretrained
from pipeline.models.policy import apply_lora, disable_dropout, policy_from_artifact
from pipeline.modules.dpo import DPOModule, LossSpec, heldout_metrics, reference_logps
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task
from pipeline.training import RecordSteps, build_trainer, fit, trained_steps

#: artifact-store kind of cached reference log-probs, and the file holding them
REF_KIND = "ref_logps"
REF_FILE = "ref_logps.safetensors"
#: the schema's defaults of the loss options (an option equal to its default counts as unset)
OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DPOConfig) if f.name in OPTION_NAMES}


def loss_spec(dcfg, key: str = "dpo") -> LossSpec:
    """The validated loss configuration of a ``dpo`` section (ConfigError on an invalid combination)."""
    loss_type = plain(dcfg.loss_type)
    if not (isinstance(loss_type, str) or (isinstance(loss_type, list) and all(isinstance(t, str) for t in loss_type))):
        raise ConfigError(f"must be a loss name or a list of names, got {loss_type!r}", where=f"{key}.loss_type",
                          fix=f"e.g. {key}.loss_type=sigmoid or {key}.loss_type=[sigmoid,sft]")
    options = {name: plain(dcfg[name]) for name in OPTION_NAMES}
    types, weights = validate_loss_config(loss_type, plain(dcfg.loss_weights), options, key=key,
                                          defaults=OPTION_DEFAULTS, data="pair")
    spec = LossSpec(tuple(types), tuple(weights), options, bool(dcfg.use_margin))
    if spec.use_margin and not any(PREFERENCE_LOSSES.meta(n)["margin"] for n in spec.names):
        takes = [n for n in PREFERENCE_LOSSES if PREFERENCE_LOSSES.meta(n)["margin"]]
        raise ConfigError(f"use_margin=true has no effect with loss_type {types} (a silent no-op is an error)",
                          where=f"{key}.use_margin", fix=f"remove it, or use a loss that reads margins: {', '.join(takes)}")
    return spec


def _rows_digest(*row_lists) -> str:
    """Hash of the exact token ids of tokenized pairs (what reference log-probs depend on, besides the model)."""
    h = hashlib.sha256()
    for rows in row_lists:
        for r in rows:
            h.update(json.dumps([r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]], separators=(",", ":")).encode())
        h.update(b"|")
    return h.hexdigest()


@STAGES.register("dpo")
class DPOStage(Stage):
    kind = "dpo"
    produces = "policy"
    roles = {"policy": Role({"policy"}), "reference": Role({"policy"}, required=False)}
    config_keys = ("task", "dpo", "trainer")
    ignored_task_fields = ("num_train_prompts", "num_eval_prompts")
    headline = ("val/rewards/accuracies", "val/rewards/margins", "val/loss", "train/steps")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        dcfg = cfg.dpo
        loss = loss_spec(dcfg)
        for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps"):
            if dcfg[key] < 1:
                raise ConfigError(f"must be >= 1, got {dcfg[key]}", where=f"dpo.{key}")
        check_on_long_prompt(dcfg.data.on_long_prompt, "dpo.data.on_long_prompt")
        if not loss.uses_reference:
            why = ("reference_free=true" if dcfg.reference_free
                   else f"loss_type {list(loss.types)} never reads reference log-probs")
            if dcfg.precompute_ref_log_probs:
                raise ConfigError(f"precompute_ref_log_probs=true has no effect: {why} (a silent no-op is an error)",
                                  where="dpo.precompute_ref_log_probs", fix="remove it")
            if "reference" in spec.inputs:
                raise ConfigError(f"stage {spec.name!r} has a `reference` input, but {why}",
                                  where=f"pipeline.stages.{spec.name}.inputs.reference",
                                  fix="remove the reference input, or use a loss that reads the reference")

    @classmethod
    def check_data(cls, cfg, spec) -> None:
        """The user's preference file: format and columns; prompt lengths when the policy's
        tokenizer is known before SFT has run (a pretrained model)."""
        dcfg = cfg.dpo.data
        if not dcfg.path:
            return
        known = bool(cfg.model.name_or_path or cfg.model.tokenizer)
        tokenizer = resolve_tokenizer(cfg.model, lambda: ["a"], key="model")
        examples = load_preference_examples(dcfg, tokenizer=tokenizer, key="dpo.data")
        if known:
            tokenize_preferences(examples, tokenizer, cfg.model.max_length, where="dpo.data",
                                 on_long_prompt=dcfg.on_long_prompt)

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        out["max_length"] = cfg.model.max_length  # tokenization
        if cfg.dpo.data.path:  # the user's pairs: the task's settings do not matter
            out.pop("task", None)
        return out

    # ------------------------------------------------------------------ data
    def _pairs(self, tokenizer):
        dcfg = self.cfg.dpo.data
        if dcfg.path:
            examples = load_preference_examples(dcfg, tokenizer=tokenizer, key="dpo.data")
        else:
            examples = build_task(self.cfg.task).preference_examples("pref")
        train, val = split_holdout(examples, dcfg.eval_fraction, self.cfg.seed)
        self.heldout_pairs = val if dcfg.path else None  # evaluation follows the user's data
        tok = lambda ex: tokenize_preferences(ex, tokenizer, self.cfg.model.max_length, where="dpo.data",
                                              on_long_prompt=dcfg.on_long_prompt) if ex else []
        return tok(train), tok(val)

    def _reference_model(self, loss: LossSpec, tokenizer):
        """The reference model, or None: adapters-off reference (LoRA) or no reference needed."""
        if not loss.uses_reference:
            return None
        if "reference" in self.inputs:
            ref, ref_tok = policy_from_artifact(self.inputs["reference"])
            if ref_tok.get_vocab() != tokenizer.get_vocab():
                raise ConfigError(f"the reference {self.spec.inputs['reference']!r} uses another tokenizer than the "
                                  f"policy {self.spec.inputs['policy']!r}",
                                  where=f"pipeline.stages.{self.name}.inputs.reference",
                                  fix="use a reference that shares the policy's tokenizer (e.g. its SFT model)")
            return disable_dropout(ref)
        if self.cfg.dpo.lora.enabled:  # the same model with its adapters disabled
            return None
        return disable_dropout(policy_from_artifact(self.input("policy"))[0])

    def _precompute(self, work_dir: Path, train_rows, val_rows, policy, ref_model, collate) -> dict:
        """Attach ``ref_chosen`` / ``ref_rejected`` to every row from the store's cache (computed once)."""
        import torch
        from safetensors.torch import load_file, save_file

        ref_art = self.inputs.get("reference") or self.input("policy")
        model = ref_model if ref_model is not None else policy
        accelerator = str(self.cfg.trainer.accelerator)
        device = "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        config = {"tokens": _rows_digest(train_rows, val_rows), "rows": [len(train_rows), len(val_rows)],
                  "device": device, "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__}
        inputs = {"reference": ref_art.fingerprint}
        fp = fingerprint(REF_KIND, config, inputs)
        store = ArtifactStore(self.cfg.paths.artifact_dir)
        t0 = time.time()
        with store.lock(REF_KIND, fp):
            art = store.lookup(REF_KIND, fp)
            reused = art is not None
            if not reused:
                manifest = {"stage": self.name, "inputs": {"reference": {"fingerprint": ref_art.fingerprint}},
                            "config": config}
                with store.build(REF_KIND, fp, manifest) as (work, record):
                    bs = self.cfg.dpo.eval_batch_size
                    model.to(device)  # on the accelerator when training uses one (Lightning moves the policy anyway)
                    save_file({"train": reference_logps(train_rows, policy, ref_model, collate, bs),
                               "val": reference_logps(val_rows, policy, ref_model, collate, bs)}, str(work / REF_FILE))
                    model.to("cpu")
                    record["metrics"] = {"train/pairs": len(train_rows), "val/pairs": len(val_rows),
                                         "seconds": round(time.time() - t0, 3)}
                art = store.lookup(REF_KIND, fp)
        tensors = load_file(str(art.path / REF_FILE))
        for split, rows in (("train", train_rows), ("val", val_rows)):
            values = tensors[split].tolist()
            if len(values) != len(rows):  # the key covers the row counts: only a corrupted cache gets here
                raise RuntimeError(f"{art.path / REF_FILE}: {len(values)} {split} rows, expected {len(rows)}")
            for row, (c, r) in zip(rows, values):
                row["ref_chosen"], row["ref_rejected"] = c, r
        shutil.copyfile(art.path / REF_FILE, work_dir / REF_FILE)
        return {"cache": str(art.path), "fingerprint": fp, "reused": reused, "seconds": round(time.time() - t0, 3)}

    # ------------------------------------------------------------------ run
    def run(self, work_dir: Path) -> dict:
        cfg, dcfg = self.cfg, self.cfg.dpo
        loss = loss_spec(dcfg)
        policy, tokenizer = policy_from_artifact(self.input("policy"))
        disable_dropout(policy)
        train_rows, val_rows = self._pairs(tokenizer)
        if not train_rows:
            raise DataError("no preference pairs to train on", where="dpo.data")
        if self.heldout_pairs is not None:
            write_heldout(work_dir, pairs=self.heldout_pairs, source=heldout_source(
                dcfg.data.path, dcfg.data.eval_fraction, len(self.heldout_pairs)))
        ref_model = self._reference_model(loss, tokenizer)
        policy = apply_lora(policy, dcfg.lora)
        collate = PreferenceCollator(tokenizer.pad_token_id, row_length=cfg.model.max_length)
        reference = "none" if not loss.uses_reference else "model" if ref_model is not None else "adapters_off"
        if dcfg.precompute_ref_log_probs:
            self.record["reference_logps"] = self._precompute(work_dir, train_rows, val_rows, policy, ref_model, collate)
            ref_model = None  # not kept in memory while training
            reference = f"precomputed ({reference})"
        gen = seeded_generator(cfg.seed)  # picklable: ddp_spawn ships the loaders to workers
        train_loader = ResumableLoader(train_rows, batch_size=dcfg.batch_size, shuffle=True, collate_fn=collate,
                                  generator=gen)
        val_loader = (DataLoader(val_rows, batch_size=dcfg.eval_batch_size, collate_fn=collate) if val_rows else None)
        module = DPOModule(policy, loss, dcfg.optim, ref_model=ref_model)
        trainer = build_trainer(cfg, stage=self.name, work_dir=work_dir, max_epochs=dcfg.max_epochs,
                                max_steps=dcfg.max_steps, accumulate_grad_batches=dcfg.gradient_accumulation_steps,
                                hook=self.hook, checkpoint=dcfg.checkpoint, callbacks=[RecordSteps()],
                                resume=self.resume)
        fit(trainer, module, train_loader, val_loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if val_loader is not None:
            metrics.update(heldout_metrics(module, val_loader))
        trained = module.policy
        if hasattr(trained, "merge_and_unload"):  # LoRA: publish the merged model
            trained = trained.merge_and_unload()
        save_pretrained(trained, tokenizer, work_dir / "model")
        metrics.update({"train/pairs": len(train_rows), "train/steps": trained_steps(trainer),
                        "model/parameters": count_parameters(trained)})
        self.record["dpo"] = {"loss_type": list(loss.types), "loss_weights": list(loss.weights), "reference": reference}
        return metrics
