"""SFT and reward-model stages under 2-process DDP on CPU (gloo, ``trainer=ddp`` = ddp_spawn)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

#: 64 SFT demonstrations / 2 ranks / batch 8 = 4 optimizer steps an epoch
FAST = [
    "pipeline=rm_eval", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "task.num_train_prompts=64", "task.num_pref_prompts=64", "task.num_eval_prompts=8",
    "sft.max_epochs=2", "sft.batch_size=8", "sft.optim.lr=3e-3", "reward.max_steps=3", "reward.batch_size=8",
    "eval.num_samples=1", "eval.max_new_tokens=8", "trainer.enable_progress_bar=false", "print_summary=false",
    "trainer.log_every_n_steps=1",
]


# Seen failing once in ~10 full-suite runs on a loaded 2-core box and never alone; the
# rerun keeps the first failure's output in the report for diagnosis.
@pytest.mark.flaky(reruns=1)
@pytest.mark.timeout(540)
@pytest.mark.slow  # > 20 s: in the slow suite (make test-slow, CI)
def test_ddp_spawn_two_cpu_processes_publish_one_artifact_per_stage(tmp_path):
    proc = run_cli(["trainer=ddp"] + FAST, tmp_path, timeout=520)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "distributed_backend=gloo" in out and "Starting with 2 processes" in out  # really 2 ranks

    arts = tmp_path / "outputs" / "artifacts"
    published = sorted(p.name.split("-")[0] for p in arts.iterdir() if not p.name.startswith("."))
    assert published == ["evaluate", "reward", "sft"]  # exactly one each: rank 1 published nothing
    assert not any((arts / ".tmp").iterdir())

    (run_dir,) = list((tmp_path / "outputs" / "runs").glob("*/*"))
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    sft, rm = stages["sft"]["metrics"], stages["rm"]["metrics"]
    manifest = json.loads((run_dir / "stages" / "sft" / "manifest.json").read_text())
    assert manifest["config"]["trainer"]["strategy"] == "ddp_spawn" and manifest["config"]["trainer"]["devices"] == 2
    # each rank sees half of the data: 2 epochs x 64 / (2 x 8) steps; the count survives the spawn
    assert sft["train/examples"] == 64 and sft["train/steps"] == 8
    assert sft["val/loss"] < sft["val/loss_init"]  # the driver saved the trained (rank 0) weights
    assert rm["train/steps"] == 3 and 0.0 <= rm["val/accuracy"] <= 1.0
    assert 0.0 <= stages["eval"]["metrics"]["eval/rm_accuracy"] <= 1.0
    for name in ("sft", "rm"):
        csv = (run_dir / "stages" / name / "logs" / "metrics.csv").read_text().splitlines()
        assert "train/loss" in csv[0] and len(csv) > 1
    assert (run_dir / "stages" / "sft" / "model" / "model.safetensors").is_file()
    assert (run_dir / "stages" / "rm" / "model" / "member_0" / "model.safetensors").is_file()
