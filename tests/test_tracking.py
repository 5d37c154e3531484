"""Experiment tracking: W&B mode resolution, secret scrubbing, offline W&B, TensorBoard, CSV."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.run import run_pipeline
from pipeline.tracking import build_loggers, resolve_wandb_mode, scrub_secrets
from tests.conftest import compose

FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "task.num_train_prompts=64", "task.num_pref_prompts=64", "task.num_eval_prompts=8",
    "sft.max_epochs=1", "sft.batch_size=16", "reward.max_steps=3", "reward.batch_size=16",
    "eval.num_samples=1", "eval.max_new_tokens=8", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "print_summary=false",
]


# --------------------------------------------------------------------------- W&B mode
@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    """No W&B variables and an empty HOME (no ~/.netrc)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _netrc(home: Path, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password 0123456789abcdef\n")
    (home / ".netrc").chmod(0o600)


def test_wandb_mode_offline_without_credentials(no_wandb_env):
    assert resolve_wandb_mode(None) == "offline"


def test_wandb_mode_online_with_api_key_or_netrc(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    _netrc(no_wandb_env, "api.wandb.ai")  # what `wandb login` writes
    assert resolve_wandb_mode(None) == "online"


def test_wandb_mode_netrc_must_match_the_server(no_wandb_env, monkeypatch):
    _netrc(no_wandb_env, "wandb.example.com")
    assert resolve_wandb_mode(None) == "offline"  # credentials for another host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert resolve_wandb_mode(None) == "online"


def test_wandb_mode_precedence_explicit_then_env_then_credentials(no_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(None) == "offline"  # env beats credentials
    assert resolve_wandb_mode("disabled") == "disabled"  # explicit config beats env
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_wandb_mode(None) == "online"
    assert resolve_wandb_mode("offline") == "offline"


# --------------------------------------------------------------------------- secrets
def test_scrub_secrets_hides_secret_values_everywhere():
    cfg = {
        "wandb": {"project": "p", "api_key": "KEY-123", "tags": ["a"]},
        "hub_token": "TOK-456",
        "model": {"name_or_path": "org/model", "auth": {"HF_TOKEN": "TOK-789", "password": "PW"}},
        "extra": [{"secret": "S-1", "keep": 1}],
        "lr": 0.1,
    }
    out = scrub_secrets(cfg)
    assert out["wandb"] == {"project": "p", "api_key": "***", "tags": ["a"]}
    assert out["hub_token"] == "***" and out["model"]["auth"] == {"HF_TOKEN": "***", "password": "***"}
    assert out["extra"] == [{"secret": "***", "keep": 1}] and out["lr"] == 0.1
    assert out["model"]["name_or_path"] == "org/model"
    for value in ("KEY-123", "TOK-456", "TOK-789", "PW", "S-1"):
        assert value not in repr(out)
    assert cfg["wandb"]["api_key"] == "KEY-123"  # the input is not modified


def test_wandb_logger_gets_scrubbed_config_and_resolved_mode(no_wandb_env, monkeypatch, tmp_path):
    import lightning.pytorch.loggers as pl_loggers

    seen = {}

    class FakeWandbLogger(pl_loggers.CSVLogger):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(save_dir=str(tmp_path), name="fake")

    monkeypatch.setattr(pl_loggers, "WandbLogger", FakeWandbLogger)
    cfg = compose(["logger=wandb", "logger.wandb.tags=[x]"], tmp_path)
    config = {"logger": {"wandb": {"api_key": "KEY-123"}}, "seed": 0}
    loggers = build_loggers(cfg.logger, save_dir=tmp_path, stage="rm", run_name="exp", group="g", config=config)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "FakeWandbLogger"]
    assert seen["mode"] == "offline" and seen["name"] == "exp/rm" and seen["group"] == "g" and seen["tags"] == ["x"]
    assert seen["config"] == {"logger": {"wandb": {"api_key": "***"}}, "seed": 0}


def test_unknown_logger_backend_is_a_config_error(tmp_path):
    cfg = compose(["logger.backends=[csv,mlflow]"], tmp_path)
    with pytest.raises(ConfigError, match="unknown logger backend 'mlflow'") as e:
        build_loggers(cfg.logger, save_dir=tmp_path, stage="sft", run_name="r", group="g")
    assert e.value.where == "logger.backends"


# --------------------------------------------------------------------------- runs
def _event_tags(path: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_csv_metrics_are_always_written_and_tensorboard_on_request(tmp_path):
    cfg = compose(FAST + ["pipeline=sft", "logger.backends=[tensorboard]"], tmp_path)  # csv not even listed
    run_pipeline(cfg)
    sft = Path(cfg.paths.output_dir) / "stages" / "sft"
    header = (sft / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "val/loss" in header
    (events,) = list((sft / "tensorboard").glob("events.out.tfevents.*"))
    assert {"train/loss", "val/loss"} <= _event_tags(events)


def test_wandb_offline_run_never_prompts_and_each_stage_gets_its_own_run(tmp_path):
    """`logger=many` (csv + wandb + tensorboard) with WANDB_MODE=offline, no credentials, stdin closed."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), HOME=str(home), WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", WANDB_SILENT="false")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "logger=many", "pipeline=rm_eval", *FAST],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "wandb login" not in out and "API key" not in out and "Enter your choice" not in out
    assert "already in progress" not in out  # the RM stage did not reuse the SFT stage's W&B run

    arts = tmp_path / "outputs" / "artifacts"
    for kind in ("sft", "reward", "evaluate"):
        (art,) = list(arts.glob(f"{kind}-*"))
        runs = list((art / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{kind}: {runs}"
        (log,) = list(runs[0].glob("run-*.wandb"))
        assert log.stat().st_size > 0
        if kind == "evaluate":  # no training: the run holds the evaluation's summary and tables
            continue
        assert "train/loss" in (art / "logs" / "metrics.csv").read_text().splitlines()[0]
        (events,) = list((art / "tensorboard").glob("events.out.tfevents.*"))
        assert "train/loss" in _event_tags(events)
    assert not any((arts / ".tmp").iterdir())  # nothing written after the artifacts were published


# --------------------------------------------------------------------------- W&B: one run per stage
def _records(run_dir: Path) -> list:
    """The protobuf records of an offline run (wandb's own record definitions, LevelDB-log framing)."""
    from tests.tune_helpers import wandb_records

    (log,) = list(run_dir.glob("run-*.wandb"))
    return wandb_records(log)


def _updates(records, kind: str) -> dict:
    import json

    out = {}
    for r in records:
        if r.WhichOneof("record_type") == kind:
            for u in getattr(r, kind).update:
                out[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return out


def test_wandb_stage_runs_offline_with_a_fake_key(tmp_path, monkeypatch):
    """Every stage (the evaluation too) is one offline W&B run grouped by the pipeline run with the stage as
    job type; config, history, final metrics in the summary and the stage's tables are in the run files;
    the API key is written nowhere; run.json carries the `wandb sync` command."""
    import json

    key = "fake" + "0123456789abcdef" * 2 + "0000"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = compose(FAST + ["logger=wandb", "logger.wandb.tags=[test]", "rl.total_steps=4", "rl.prompts_per_step=4",
                          "algorithm.ppo_epochs=1", "algorithm.num_mini_batches=1", "algorithm.max_new_tokens=8",
                          "rl.eval_every=2", "rl.eval_prompts=8", "rl.log_completions_every=2"], tmp_path)
    results = run_pipeline(cfg)
    run_dir = Path(cfg.paths.output_dir)
    info = json.loads((run_dir / "run.json").read_text())
    group = str(run_dir.relative_to(tmp_path / "outputs"))
    runs = {}
    for stage in ("sft", "rm", "rl", "eval"):
        (offline,) = list((run_dir / "stages" / stage).resolve().glob("wandb/offline-run-*"))
        runs[stage] = offline
        records = _records(offline)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.job_type, run.display_name) == (group, stage, f"default/{stage}")
        assert list(run.tags) == ["test", f"kind:{results['stages'][stage]['kind']}"]
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["seed"] == 0 and config["pipeline"]["name"] == "default" and config["model"]["n_embd"] == 32
        summary = _updates(records, "summary")
        for k, v in results["stages"][stage]["metrics"].items():  # the final metrics
            assert summary[k] == pytest.approx(v), (stage, k)
    assert info["wandb"]["sync"] == "wandb sync " + " ".join(str(runs[s]) for s in ("sft", "rm", "rl", "eval"))
    # training history (Lightning's WandbLogger logs into the stage's run)
    history = {k for r in _records(runs["rl"]) if r.WhichOneof("record_type") == "history"
               for k in (i.key or "/".join(i.nested_key) for i in r.history.item)}
    assert {"rollout/reward_mean", "policy/kl", "eval/gold_reward", "trainer/global_step"} <= history
    # tables: the over-optimisation curve, the completions, the evaluation's policies and examples
    curve = [json.loads(line) for line in (run_dir / "stages" / "rl" / "curve.jsonl").read_text().splitlines()]
    (table,) = list(runs["rl"].glob("files/media/table/overoptimisation_*.table.json"))
    data = json.loads(table.read_text())
    assert data["columns"] == ["step", "eval/kl", "eval/gold_reward", "eval/proxy_reward"]
    assert [row[0] for row in data["data"]] == [p["step"] for p in curve]
    completions = (run_dir / "stages" / "rl" / "completions.jsonl").read_text().splitlines()
    last = max(runs["rl"].glob("files/media/table/completions_*.table.json"), key=lambda p: int(p.name.split("_")[1]))
    assert len(json.loads(last.read_text())["data"]) == len(completions)
    (policies,) = list(runs["eval"].glob("files/media/table/policies_*.table.json"))
    assert [row[0] for row in json.loads(policies.read_text())["data"]] == ["sft", "rl"]
    assert list(runs["eval"].glob("files/media/table/examples_*.table.json"))
    # the key is nowhere: not in a config, a log, a run file or an artifact
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and home not in path.parents:
            assert key.encode() not in path.read_bytes(), path


def test_wandb_online_without_credentials_is_a_config_error_not_a_prompt(no_wandb_env):
    from pipeline.tracking.wandb_runs import check_mode

    with pytest.raises(ConfigError, match="no credentials") as err:
        check_mode("online")
    assert err.value.where == "logger.wandb.mode" and "wandb login" in err.value.fix
    check_mode("offline")


def test_wandb_online_without_credentials_stops_before_training(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), HOME=str(home), WANDB_MODE="online", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "logger=wandb", "pipeline=sft", *FAST], cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: logger.wandb.mode: W&B is set to run online but no credentials" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "outputs" / "artifacts").glob("sft-*"))  # nothing published


# --------------------------------------------------------------------------- progress
def test_stage_progress_bar_on_a_terminal_only(tmp_path, monkeypatch):
    """A terminal gets a Rich bar with the step count, ETA and the module's prog_bar metric; logs and CI
    (no TTY) get none."""
    import io

    import lightning as L
    import torch
    from rich.console import Console

    from pipeline.training import StageProgress, build_trainer

    cfg = compose(["trainer.enable_progress_bar=true"], tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not any(isinstance(c, StageProgress) for c in build_trainer(cfg, stage="sft", work_dir=tmp_path,
                                                                         max_steps=1).callbacks)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert any(isinstance(c, StageProgress) for c in build_trainer(cfg, stage="sft", work_dir=tmp_path,
                                                                     max_steps=1).callbacks)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, i):
            loss = (self.w * batch[0]).pow(2).mean()
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StageProgress("sft", console=console)])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.ones(6, 1), batch_size=1))
    text = out.getvalue()
    assert "sft" in text and "ETA" in text and "train/loss=" in text and "/6" in text


@pytest.mark.slow  # > 20 s: in the slow suite (make test-slow, CI)
def test_wandb_stage_run_with_ddp_spawn_workers(tmp_path):
    """The runner opens the stage's run in the driver; spawned DDP workers attach to it and log the training
    history; the driver adds the final metrics and finishes it (a worker finishing it would hang the driver)."""
    import json

    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), HOME=str(home), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "logger=wandb", "trainer=ddp", "trainer.devices=2",
                           "pipeline=sft", *FAST], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (offline,) = list((tmp_path / "outputs" / "artifacts").glob("sft-*/wandb/offline-run-*"))
    records = _records(offline)
    history = {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
               for i in r.history.item}
    assert {"train/loss", "val/loss"} <= history  # from the rank-0 worker
    (run_dir,) = list((tmp_path / "outputs" / "runs").glob("*/*"))
    metrics = json.loads((run_dir / "results.json").read_text())["stages"]["sft"]["metrics"]
    assert _updates(records, "summary")["train/steps"] == metrics["train/steps"]  # from the driver
    assert any(r.WhichOneof("record_type") == "exit" for r in records)
