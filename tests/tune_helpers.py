"""Helpers for the tuner tests: tiny sweeps, reward functions with known outcomes, W&B offline files."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import cli_env

#: a whole default pipeline (SFT -> RM -> PPO -> eval) in about a second per trial (after SFT/RM)
BASE = ["pipeline=default", "algorithm=ppo", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "task.num_train_prompts=128", "task.num_pref_prompts=128", "task.num_eval_prompts=8",
        "sft.max_epochs=3", "sft.batch_size=16", "reward.max_steps=4",
        "rl.total_steps=4", "rl.prompts_per_step=4", "algorithm.ppo_epochs=1", "algorithm.num_mini_batches=1",
        "algorithm.max_new_tokens=8", "rl.eval_every=2", "rl.eval_prompts=8",
        "eval.max_new_tokens=8", "eval.num_samples=1", "trainer.num_threads=1"]

SPACE = {"algorithm.kl_coef": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
         "rl.optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}


def write_sweep(directory: Path, name: str, *, base=None, space=None, objectives=None, tune=None, **extra) -> Path:
    doc = {"description": f"test sweep {name}", "base": list(BASE) + list(base or []),
           "space": space if space is not None else SPACE,
           "objectives": objectives or {"eval/gold_reward": "maximize"},
           "tune": {"n_trials": 3, "seeds": [0], "test_seeds": [5], "pruner": "none", **(tune or {})}, **extra}
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- reward functions
def high(prompts, completions, **_):
    return [1.0] * len(completions)


def low(prompts, completions, **_):
    return [-1.0] * len(completions)


def nan_reward(prompts, completions, **_):
    return [float("nan")] * len(completions)


def broken_reward(prompts, completions, **_):
    raise RuntimeError("reward service unavailable")


def slow_high(prompts, completions, **_):
    """Slow enough to kill a worker in the middle of a trial."""
    import time

    time.sleep(0.5)
    return [1.0] * len(completions)


# ----------------------------------------------------------------------------- processes
def run_tune(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full = cli_env(cwd, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline.tune", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def load_study(study_dir: Path, name: str, storage: str | None = None):
    import optuna

    from pipeline.tune.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage, Path(study_dir)))


# ----------------------------------------------------------------------------- W&B offline files
def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file (LevelDB log format)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        off = pos % block
        if block - off < 7:
            pos += block - off
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - off
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
            buf = b""
    records = []
    for chunk in out:
        r = pb.Record()
        r.ParseFromString(chunk)
        records.append(r)
    return records


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def start_postgres():
    """Start a throwaway PostgreSQL server; returns (url, stop) or raises RuntimeError(reason).

    ``PIPELINE_TEST_POSTGRES_URL`` (set by .ci/run when it started a server) is used as it is.
    Otherwise a cluster is created in a temporary directory with the server binaries on this
    machine (``initdb``, ``pg_ctl``: the ``postgresql`` system package), as the ``postgres``
    user when running as root."""
    import shutil
    import socket
    import tempfile

    url = os.environ.get("PIPELINE_TEST_POSTGRES_URL")
    if url:
        return url, lambda: None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise RuntimeError("the psycopg driver is not installed (pip install 'psycopg[binary]')") from None
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl); install the postgresql package")
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if not runuser:
            raise RuntimeError("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if as_user:
        shutil.chown(base, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, sock = base / "data", base

    def sh(*cmd, timeout=120):
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=timeout)

    r = sh(initdb, "-D", str(data), "-A", "trust", "-U", "postgres")
    if r.returncode:
        raise RuntimeError(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    r = sh(pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-o",
           f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=100", "start")
    if r.returncode:
        raise RuntimeError(f"pg_ctl start failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    createdb = _pg_bin("createdb")
    r = sh(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
    if r.returncode:
        sh(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        raise RuntimeError(f"createdb failed: {r.stderr.strip()}")

    def stop():
        sh(pg_ctl, "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(base, ignore_errors=True)

    return f"postgresql://postgres@127.0.0.1:{port}/optuna", stop
