"""The command line: help, printing the resolved config, presets, and a Hydra multirun sharing artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import compose, run_cli

GROUPS = ("task", "model", "pipeline", "trainer", "logger", "experiment", "paths", "algorithm")
FAST = [
    "pipeline=rm_eval", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "task.num_train_prompts=64", "task.num_pref_prompts=64", "task.num_eval_prompts=8",
    "sft.max_epochs=1", "sft.batch_size=16", "reward.max_steps=3",
    "eval.max_new_tokens=8", "trainer.enable_progress_bar=false", "print_summary=false",
]


def test_help_lists_the_config_groups_and_main_commands(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "rlhf-pipeline" in out
    for group in GROUPS:
        assert f"\n{group}: " in out, f"group {group} missing from --help:\n{out}"
    assert "llama_tiny" in out and "noisy_labels" in out and "rm_eval" in out
    assert "--cfg job" in out and "-m " in out  # how to print the config / sweep
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_the_resolved_config_without_running(tmp_path):
    proc = run_cli(["--cfg", "job", "experiment=quick", "sft.optim.lr=0.0123"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert set(GROUPS) - {"experiment"} <= set(cfg)  # every section; experiment is a preset, not a section
    assert cfg["task"]["num_train_prompts"] == 400 and cfg["sft"]["max_epochs"] == 2  # quick preset
    assert cfg["sft"]["optim"]["lr"] == 0.0123 and cfg["sft"]["batch_size"] == 32  # override + schema default
    assert not (tmp_path / "outputs").exists()


def test_experiment_presets_apply_and_command_line_wins(tmp_path):
    quick = compose(["experiment=quick"], tmp_path)
    assert (quick.task.num_train_prompts, quick.task.num_pref_prompts, quick.task.num_eval_prompts) == (400, 400, 32)
    assert quick.sft.max_epochs == 2 and quick.eval.num_samples == 1
    noisy = compose(["experiment=noisy_labels"], tmp_path)
    assert noisy.task.label_noise == 0.25 and noisy.reward.ensemble_size == 3
    assert noisy.eval.reward_aggregation == "wco"
    default = compose([], tmp_path)
    assert default.task.label_noise == 0.0 and default.reward.ensemble_size == 1 and default.sft.max_epochs == 4
    both = compose(["experiment=noisy_labels", "task.label_noise=0.1"], tmp_path)
    assert both.task.label_noise == 0.1 and both.reward.ensemble_size == 3


def test_multirun_sweeps_eval_setting_and_shares_upstream_artifacts(tmp_path):
    proc = run_cli(["-m", "eval.temperature=0.7,1.0", "experiment=quick"] + FAST, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    results = [json.loads((j / "results.json").read_text()) for j in jobs]
    temps = [yaml.safe_load((j / "config.yaml").read_text())["eval"]["temperature"] for j in jobs]
    assert temps == [0.7, 1.0]
    fps = [{name: s["fingerprint"] for name, s in r["stages"].items()} for r in results]
    assert fps[0]["sft"] == fps[1]["sft"] and fps[0]["rm"] == fps[1]["rm"] and fps[0]["eval"] != fps[1]["eval"]
    second = json.loads((jobs[1] / "run.json").read_text())["stages"]
    assert second["sft"]["reused"] and second["rm"]["reused"] and not second["eval"]["reused"]
    arts = sorted(p.name.split("-")[0] for p in (tmp_path / "outputs" / "artifacts").iterdir()
                  if not p.name.startswith("."))
    assert arts == ["evaluate", "evaluate", "reward", "sft"]
    assert not any((tmp_path / "outputs" / "artifacts" / ".tmp").iterdir())
