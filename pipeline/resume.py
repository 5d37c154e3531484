"""Mid-stage checkpoints: a killed training stage continues from its last checkpoint.

Every ``trainer.checkpoint_every_n_steps`` steps (optimizer steps; rollout steps / iterations for
the online stages ``rl`` and ``nlhf``) a training stage saves what it needs to continue exactly
into its **resume directory**, ``<artifact_dir>/.tmp/<kind>-<fingerprint>.resume/``
(:meth:`pipeline.artifacts.ArtifactStore.resume_path`): keyed by the stage's fingerprint, so a
rerun of the same stage finds it; outside the build directories (which die with their builder);
never taken for an artifact (no manifest, under ``.tmp``); removed once the artifact is published.

What a checkpoint holds (one Lightning checkpoint, loaded with ``weights_only=True``):

- the LightningModule's weights (policy, critic, frozen references), optimizer and LR-scheduler
  states, Lightning's loop counters (global step, epoch, batch within the epoch);
- the training loader's position (:class:`pipeline.data.loader.ResumableLoader`: the shuffle
  generator's state at the epoch start and the batches already trained);
- the RNG states of torch (CPU and CUDA), ``random`` and numpy, and the trainer's last logged
  metrics (``pipeline/resume``, this module's callback);
- whatever the module adds in ``on_save_checkpoint`` (the online RL module: rollout step, KL
  controller, rollout generator; the DPO module: running statistics);

and, next to it, a copy of the files the stage had written into its work directory so far
(``curve.jsonl``, ``completions.jsonl``, the CSV logs), put back into the new work directory on
resume. ``state.json`` names the complete checkpoint; it is replaced only after the checkpoint
and the files are written, so a kill at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("pipeline")

STATE = "state.json"
#: bump when what a checkpoint holds changes (older resume directories are ignored)
FORMAT = 1
#: the callback's entry in a Lightning checkpoint
KEY = "pipeline/resume"
#: work-directory entries not copied with a checkpoint (published outputs, Lightning's own checkpoints)
SKIP = ("model", "checkpoints")


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of(trainer, pl_module) -> int:
    """The stage's step: rollout steps for online modules (``rollout_step``), else optimizer steps."""
    return int(getattr(pl_module, "rollout_step", trainer.global_step))


class ResumeState:
    """The resume directory of one stage: where checkpoints go and where a rerun finds them."""

    def __init__(self, directory: str | Path, every_n_steps: int = 0):
        self.dir = Path(directory)
        self.every = max(0, int(every_n_steps or 0))
        #: the step a resumed run continued from (None: it started from scratch)
        self.resumed_from: int | None = None
        #: the training loaders' positions in the restored checkpoint
        self.loader_states: list[dict] = []

    # ------------------------------------------------------------------ reading
    def latest(self) -> dict | None:
        """``{"step", "checkpoint", "files"}`` of the last complete checkpoint, or None."""
        try:
            state = json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            return None
        if state.get("format") != FORMAT or not (self.dir / str(state.get("checkpoint"))).is_file():
            return None
        return state

    def restore(self, work_dir: Path) -> Path | None:
        """Put the last checkpoint's files back into ``work_dir`` and return the checkpoint to
        resume from (None: no usable checkpoint, train from the start)."""
        state = self.latest()
        if state is None:
            return None
        ckpt = self.dir / state["checkpoint"]
        try:  # a damaged file is reported here, not half-way through restoring the trainer
            saved = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
            self.loader_states = saved["loops"]["fit_loop"]["state_dict"].get("combined_loader", [])
        except Exception as err:  # noqa: BLE001
            log.warning("ignoring the unreadable checkpoint %s (%s: %s); the stage starts from the beginning",
                        ckpt, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None
        files = self.dir / state["files"]
        if files.is_dir():
            shutil.copytree(files, work_dir, dirs_exist_ok=True)
        self.resumed_from = int(state["step"])
        log.info("resuming from step %d (checkpoint %s)", self.resumed_from, ckpt)
        return ckpt

    # ------------------------------------------------------------------ writing
    def commit(self, step: int, ckpt_name: str, work_dir: Path) -> None:
        """After the checkpoint file ``ckpt_name`` is written: copy the work directory's files and
        point ``state.json`` at both (atomically), then drop older checkpoints."""
        files = f"files-{step}"
        staging = self.dir / f".{files}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(work_dir, staging, ignore=lambda d, names: [n for n in names if Path(d) == work_dir
                                                                     and n in SKIP])
        if (self.dir / files).exists():
            shutil.rmtree(self.dir / files)
        os.replace(staging, self.dir / files)
        tmp = self.dir / f".{STATE}.{uuid.uuid4().hex[:6]}"
        tmp.write_text(json.dumps({"format": FORMAT, "step": int(step), "checkpoint": ckpt_name, "files": files}))
        os.replace(tmp, self.dir / STATE)
        for p in self.dir.iterdir():  # earlier checkpoints and anything a killed save left behind
            if p.name not in (STATE, ckpt_name, files):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def callback(self, work_dir: Path) -> "ResumeCallback":
        return ResumeCallback(self, work_dir)


class ResumeCallback(Callback):
    """Writes the stage's checkpoints every ``every_n_steps`` steps and, on resume, restores what a
    Lightning checkpoint does not hold (RNG states, the last logged metrics).

    It must run before any callback that may stop the run at the same step (the tuner's hook):
    :func:`pipeline.training.build_trainer` puts it first."""

    def __init__(self, state: ResumeState, work_dir: Path):
        self.state, self.work_dir = state, Path(work_dir)
        self._last = -1
        self._pending: dict | None = None

    # ------------------------------------------------------------------ saving
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.state.every
        step = step_of(trainer, pl_module)
        if every <= 0 or step <= 0 or step % every or step == self._last:
            return
        self._last = step
        self.save(trainer, pl_module, batch_idx, step)

    def save(self, trainer, pl_module, batch_idx: int, step: int) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_trained"):
            loader.mark_trained(batch_idx + 1)
        for lg in trainer.loggers:  # buffered rows reach the files that are copied
            lg.save()
        self.state.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step}.ckpt"
        partial = self.state.dir / f".{name}.partial"  # a new file, renamed: an existing one (perhaps a
        trainer.save_checkpoint(partial, weights_only=False)  # hard link elsewhere) is never rewritten
        if trainer.is_global_zero:
            os.replace(partial, self.state.dir / name)
            self.state.commit(step, name, self.work_dir)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[KEY] = {"rng": _rng_state(), "step": step_of(trainer, pl_module),
                           "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()
                                       if getattr(v, "numel", lambda: 1)() == 1}}

    # ------------------------------------------------------------------ resuming
    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._pending = checkpoint.get(KEY)

    def on_train_start(self, trainer, pl_module):
        # after the sanity check and the loader's first iter: the RNG streams continue from the
        # checkpoint at the first resumed batch, as in the uninterrupted run
        if self._pending is None:
            return
        self._last = int(self._pending["step"])
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self._pending["metrics"].items()})
        _set_rng_state(self._pending["rng"])
        self._pending = None
