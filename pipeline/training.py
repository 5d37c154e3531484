"""Lightning Trainer factory shared by every training stage."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

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
    """Finishes a W&B run the trainer's ``WandbLogger`` started itself when fit ends, so each
    training stage gets its own run. (Under the runner the stage's run is opened and finished by
    :func:`pipeline.tracking.wandb_runs.stage_run`, which adds the final metrics and tables: that
    one is left open here.)

    Lightning's ``WandbLogger`` silently reuses a run that is still active, so without
    this the reward stage would log into the SFT stage's run (inside the SFT artifact,
    after that directory was published).
    """

    @staticmethod
    def _finish(trainer, exit_code: int = 0) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from pipeline.tracking.wandb_runs import active_run

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
                # the runner's run is finished by the runner; a run a spawned DDP worker attached to
                # (``_attach_id``) by the process that created it (finishing it here hangs that one)
                if lg._experiment is not active_run() and getattr(lg, "_attach_id", None) is None:
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


class StageProgress(Callback):
    """A Rich progress bar for a training stage: optimizer steps done of the planned total, elapsed
    time, ETA and the headline metric(s): what the module logs with ``prog_bar=True`` (losses,
    validation accuracy) or, for the online stages, the held-out gold reward and the rollout
    reward (two at most: the line fits 80 columns). Only on a terminal (:func:`build_trainer` adds
    it when stderr is a TTY)."""

    #: shown when the module logs nothing with prog_bar=True (online RL logs its metrics itself)
    FALLBACK = ("eval/gold_reward", "rollout/reward_mean", "train/loss")

    def __init__(self, stage: str, console=None):
        self.stage, self.console = stage, console
        self.progress = self.task = None

    def _text(self, trainer, pl_module) -> str:
        metrics = dict(trainer.progress_bar_metrics)
        if not metrics:  # the online stages' held-out evaluation (``last_eval``), then their rollout metrics
            known = {**trainer.callback_metrics, **(getattr(pl_module, "last_eval", None) or {})}
            metrics = {k: known[k] for k in self.FALLBACK if k in known}
        return "  ".join(f"{k}={float(v):.4g}" for k, v in list(metrics.items())[:2])

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        total = trainer.estimated_stepping_batches
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[metrics]}"), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task(f"{self.stage}", total=None if total == float("inf") else int(total),
                                           metrics="")

    def _update(self, trainer, pl_module) -> None:
        if self.progress is not None:
            text = self._text(trainer, pl_module)
            room = self.progress.console.width - len(self.stage) - 58  # the metrics give way, not the bar or ETA
            if len(text) > room:
                text = text[:max(room - 1, 0)] + "…" if room > 1 else ""
            self.progress.update(self.task, completed=trainer.global_step, metrics=text)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._update(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._update(trainer, pl_module)

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def on_exception(self, trainer, pl_module, exception):
        self._stop()


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
    if bool(tcfg.enable_progress_bar) and sys.stderr.isatty():  # quiet in logs and CI
        cbs.append(StageProgress(stage))
    cbs.append(LearningRateMonitor(logging_interval="step"))  # lr-<optimizer> in the metrics (and reports)
    if hook is not None and "spawn" in str(tcfg.strategy):
        # spawned workers would need to pickle the hook (often a closure); the driver
        # still calls it with each stage's final metrics
        log.warning("trainer.strategy=%s: intermediate metrics are not sent to the hook", tcfg.strategy)
    elif hook is not None:
        cbs.append(MetricsHookCallback(stage, hook, tcfg.log_every_n_steps))
    if checkpoint:
        cbs.append(ModelCheckpoint(dirpath=str(work_dir / "checkpoints"), save_last=True, save_top_k=0))
    cbs.append(FinishWandb())
    from pipeline.tracking.wandb_runs import default_group

    loggers = build_loggers(cfg.logger, save_dir=work_dir, stage=stage, run_name=str(cfg.run_name),
                            group=cfg.logger.wandb.group or default_group(cfg), config=plain(cfg))
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
        enable_progress_bar=False,  # StageProgress instead of Lightning's bar
        enable_checkpointing=checkpoint,
        enable_model_summary=False,
        default_root_dir=str(work_dir),
        **kwargs,
    )
