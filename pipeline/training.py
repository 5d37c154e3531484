"""Lightning Trainer factory shared by every training stage."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from pipeline.config import plain
from pipeline.tracking import build_loggers

log = logging.getLogger("pipeline")

#: hook(stage_name, step, metrics) - receives intermediate metrics; may raise to stop
#: the run (e.g. optuna.TrialPruned)
MetricsHook = Callable[[str, int, dict], None]


class MetricsHookCallback(Callback):
    """Forwards logged metrics to the runner's hook (the tuner prunes trials from it).

    The hook is called every ``every_n_steps`` steps with the logged metrics, and at every
    step where the module ran a held-out evaluation: a module exposing ``last_eval =
    {"step": s, **metrics}`` (the online-RL module's ``eval/*`` curve) has those metrics
    added at step ``s``, so the held-out curve reaches the hook.
    """

    def __init__(self, stage: str, hook: MetricsHook, every_n_steps: int = 10):
        self.stage, self.hook, self.every = stage, hook, max(1, every_n_steps)

    def _metrics(self, trainer) -> dict:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # online RL counts rollout steps; Lightning's global_step counts optimizer steps
        step = getattr(pl_module, "rollout_step", trainer.global_step)
        fresh = getattr(pl_module, "last_eval", None) or {}
        evaluated = fresh.get("step") == step
        if trainer.is_global_zero and (step % self.every == 0 or evaluated):
            metrics = self._metrics(trainer)
            if evaluated:
                metrics.update({k: v for k, v in fresh.items() if k != "step"})
            self.hook(self.stage, step, metrics)

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.hook(self.stage, trainer.global_step, self._metrics(trainer))


class RecordSteps(Callback):
    """Puts the optimizer step count into ``callback_metrics`` (``train/steps``) when fit ends.

    With ``strategy=ddp_spawn`` training runs in worker processes: the driver's trainer
    gets back the weights and ``callback_metrics`` but keeps ``global_step == 0``.
    """

    def on_train_end(self, trainer, pl_module):
        trainer.callback_metrics["train/steps"] = torch.tensor(float(trainer.global_step))


class FinishWandb(Callback):
    """Finishes the W&B run when fit ends, so each training stage gets its own run.

    Lightning's ``WandbLogger`` silently reuses a run that is still active, so without
    this the reward stage would log into the SFT stage's run (inside the SFT artifact,
    after that directory was published).
    """

    @staticmethod
    def _finish(trainer, exit_code: int = 0) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
                lg._experiment.finish(exit_code=exit_code)
                lg._experiment = None

    def teardown(self, trainer, pl_module, stage):
        self._finish(trainer)

    def on_exception(self, trainer, pl_module, exception):  # e.g. a pruned tuner trial: the next one starts afresh
        self._finish(trainer, exit_code=1)


def fit(trainer: L.Trainer, module, train_loader, val_loader=None) -> None:
    """``trainer.fit``, continuing from the stage's last mid-stage checkpoint when there is one
    (:mod:`pipeline.resume`; its files are put back into the work directory first)."""
    from pipeline.resume import ResumeCallback

    ckpt = None
    for cb in trainer.callbacks:
        if isinstance(cb, ResumeCallback):
            ckpt = cb.state.restore(cb.work_dir)
            # the loader's position now: Lightning iterates the loader before it restores the fit
            # loop's state when configure_optimizers asks for estimated_stepping_batches
            if ckpt is not None and cb.state.loader_states and hasattr(train_loader, "load_state_dict"):
                train_loader.load_state_dict(cb.state.loader_states[0])
    with warnings.catch_warnings():
        if ckpt is not None:  # the restored CSV log is appended to, not deleted as Lightning warns
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)


def trained_steps(trainer) -> int:
    """Optimizer steps of the last fit (also under ddp_spawn, with :class:`RecordSteps`)."""
    v = trainer.callback_metrics.get("train/steps")
    return int(v) if v is not None else int(trainer.global_step)


def build_trainer(cfg, *, stage: str, work_dir: Path, max_epochs: int = -1, max_steps: int = -1,
                  accumulate_grad_batches: int = 1, hook: MetricsHook | None = None, checkpoint: bool = False,
                  callbacks: list[Callback] | None = None, gradient_clip: bool = True, resume=None,
                  **kwargs) -> L.Trainer:
    """The stage's Trainer. ``resume`` (a :class:`pipeline.resume.ResumeState`) adds the mid-stage
    checkpoints, first among the callbacks (a hook that stops the run at a step finds that step's
    checkpoint written); start training with :func:`fit`, which resumes from it."""
    tcfg = cfg.trainer
    if tcfg.num_threads:
        torch.set_num_threads(int(tcfg.num_threads))
    cbs: list[Callback] = [resume.callback(work_dir)] if resume is not None else []
    cbs += list(callbacks or [])
    show_bar = bool(tcfg.enable_progress_bar) and sys.stderr.isatty()
    if show_bar:
        cbs.append(RichProgressBar(leave=False))
    if hook is not None and "spawn" in str(tcfg.strategy):
        # spawned workers would need to pickle the hook (often a closure); the driver
        # still calls it with each stage's final metrics
        log.warning("trainer.strategy=%s: intermediate metrics are not sent to the hook", tcfg.strategy)
    elif hook is not None:
        cbs.append(MetricsHookCallback(stage, hook, tcfg.log_every_n_steps))
    if checkpoint:
        cbs.append(ModelCheckpoint(dirpath=str(work_dir / "checkpoints"), save_last=True, save_top_k=0))
    cbs.append(FinishWandb())
    loggers = build_loggers(cfg.logger, save_dir=work_dir, stage=stage, run_name=str(cfg.run_name),
                            group=cfg.logger.wandb.group or Path(str(cfg.paths.output_dir)).name, config=plain(cfg))
    return L.Trainer(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        strategy=tcfg.strategy,
        num_nodes=tcfg.num_nodes,
        precision=tcfg.precision,
        gradient_clip_val=tcfg.gradient_clip_val if gradient_clip else None,
        log_every_n_steps=tcfg.log_every_n_steps,
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate_grad_batches,
        deterministic=tcfg.deterministic,
        logger=loggers,
        callbacks=cbs,
        enable_progress_bar=show_bar,
        enable_checkpointing=checkpoint,
        enable_model_summary=False,
        default_root_dir=str(work_dir),
        **kwargs,
    )
