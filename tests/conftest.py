"""Shared fixtures: compose configs with Hydra's compose API (as the tuner does)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: small but real: learning is still visible, each stage takes seconds
TINY = [
    "task.num_train_prompts=1000",
    "task.num_eval_prompts=32",
    "sft.batch_size=16",
    "sft.max_epochs=4",
    "eval.num_samples=2",
    "trainer.enable_progress_bar=false",
    "print_summary=false",
]


def compose(overrides: list[str], root: Path, run: str = "run"):
    """Compose the pipeline config like ``python -m pipeline`` would, rooted at ``root``."""
    from pipeline.config import compose as compose_config

    return compose_config(list(overrides), root=root, output_dir=Path(root) / "outputs" / "runs" / run)


@pytest.fixture
def make_cfg(tmp_path):
    def _make(overrides=(), run="run", root=None):
        return compose(list(overrides), Path(root or tmp_path), run)

    return _make


REPO = Path(__file__).resolve().parent.parent


def cli_env(root: Path, **extra: str) -> dict:
    """The environment of a pipeline subprocess: outputs under ``root``, offline, and this
    repository importable (the ``tests`` package holds reward functions the configs name)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PIPELINE_ROOT=str(root), HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=path)
    env.update(extra)
    return env


def sigkill_when(module_args: list[str], root: Path, ready, *, what: str, timeout: float = 300) -> subprocess.Popen:
    """Start ``python -m MODULE_ARGS`` in ``root`` and SIGKILL it as soon as ``ready()`` is true;
    the test fails if the process ends first or ``what`` does not happen within ``timeout``."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=root, env=cli_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the process ended (rc={proc.returncode}) before {what}:\n" + proc.stderr.read()[-2000:])
            if time.time() > deadline:
                pytest.fail(f"no {what} after {timeout}s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in ``cwd`` (artifacts under cwd/outputs)."""
    full_env = cli_env(cwd, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


#: the intransitive task at test size (shared by test_preference_model.py and test_nlhf.py: one SFT and
#: one preference model per session, reused from the artifact cache of INTRANSITIVE_ROOT)
INTRANSITIVE = [
    "task=intransitive",
    "task.num_train_prompts=1000",
    "task.num_pref_prompts=1000",
    "task.num_eval_prompts=64",
    "model.n_layer=2",
    "model.n_embd=64",
    "sft.batch_size=16",
    "preference_model.batch_size=16",
    "preference_model.max_epochs=8",  # fewer epochs can stop at the Bradley-Terry-like plateau
    "preference_model.optim.lr=2e-3",
    "eval.num_samples=4",
    "eval.max_new_tokens=8",
    "trainer.enable_progress_bar=false",
    "print_summary=false",
]


@pytest.fixture(scope="session")
def intransitive_root(tmp_path_factory):
    """Artifact root shared by the modules that train on the intransitive task."""
    return tmp_path_factory.mktemp("intransitive")
