"""Mid-stage checkpoints: a training stage killed with SIGKILL continues from its last checkpoint
and ends with the same results (bit-identical on CPU) as an uninterrupted run.

Each killed run is a real ``python -m pipeline`` process, killed as soon as the stage's first
checkpoint is on disk; the rerun (in this process) must say where it resumed (``run.json``:
``resumed_from_step``) and match the uninterrupted run's results.json, curve and weights. Two roots
are shared by the module: U (uninterrupted runs) and K (killed + resumed runs), so the SFT stage
the later tests need is built once in each.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from pipeline.run import run_pipeline
from tests.conftest import compose, sigkill_when

TINY = ["model.n_layer=1", "model.n_embd=32", "task.num_train_prompts=200", "task.num_pref_prompts=200",
        "task.num_eval_prompts=16", "eval.num_samples=1", "eval.max_new_tokens=8", "trainer.num_threads=1",
        "trainer.enable_progress_bar=false", "print_summary=false"]
SFT = ["sft.batch_size=16", "sft.max_epochs=100", "sft.max_steps=150"]  # 13 batches per epoch: several epochs
RL = ["pipeline=rl_gold", "sft.max_steps=30", "algorithm=ppo", "algorithm.value_init=policy",
      "algorithm.kl_controller=adaptive", "algorithm.kl_target=0.5", "algorithm.kl_horizon=50",
      "algorithm.max_new_tokens=8", "rl.prompts_per_step=8", "rl.total_steps=40", "rl.eval_every=5",
      "rl.eval_prompts=16", "rl.log_completions_every=3",
      # a schedule with changes before and after the checkpoint: re-applied / applied after resuming
      "rl.schedule=[{step:2,overrides:['algorithm.temperature=0.8','rl.optim.lr=0.0003']},"
      "{step:12,overrides:['algorithm.kl_coef=0.3','algorithm.cliprange=0.1']}]"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("killed")


def _resume_dirs(root: Path, kind: str) -> list[Path]:
    tmp = root / "outputs" / "artifacts" / ".tmp"
    return sorted(tmp.glob(f"{kind}-*.resume")) if tmp.is_dir() else []


def _checkpoint_step(root: Path, kind: str) -> int:
    for d in _resume_dirs(root, kind):
        try:
            return int(json.loads((d / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass
    return 0


def kill_after_checkpoint(args: list[str], root: Path, kind: str, timeout: float = 300) -> int:
    """Run ``python -m pipeline args`` in ``root``; SIGKILL it once stage ``kind`` has a checkpoint.
    Returns the checkpoint's step."""
    seen = []  # the checkpoint step seen just before the kill
    proc = sigkill_when(["pipeline", *args], root, lambda: seen.append(_checkpoint_step(root, kind)) or seen[-1] > 0,
                        what=f"stage {kind} wrote a checkpoint", timeout=timeout)
    step = seen[-1]
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not list((root / "outputs" / "artifacts").glob(f"{kind}-*/manifest.json"))  # nothing published
    return step


def _artifact_files(results: dict, run_dir: Path, stage: str) -> dict:
    """``{path: sha256}`` of a stage's published files, but logs (timings) and Lightning's own
    ``checkpoints/last.ckpt`` (``sft.checkpoint``: it records its build directory's name)."""
    link = run_dir / "stages" / stage
    manifest = json.loads((link / "manifest.json").read_text())
    return {k: v["sha256"] for k, v in manifest["files"].items() if not k.startswith(("logs/", "checkpoints/"))}


def check_resume(roots, args: list[str], stage: str, kind: str, name: str) -> dict:
    """Kill a run of ``args`` in the K root after stage ``stage``'s first checkpoint, resume it, compare
    with the same run in the U root."""
    u_root, k_root = roots
    cfg = compose(args, u_root, f"{name}-uninterrupted")
    want = run_pipeline(cfg)
    u_dir = Path(cfg.paths.output_dir)

    step = kill_after_checkpoint(args, k_root, kind)
    assert step > 0
    cfg = compose(args, k_root, f"{name}-resumed")
    got = run_pipeline(cfg)
    k_dir = Path(cfg.paths.output_dir)
    info = json.loads((k_dir / "run.json").read_text())["stages"][stage]
    assert not info["reused"] and info["resumed_from_step"] >= step  # it continued, it did not start over
    assert got == want  # results.json: every final metric of every stage
    assert _artifact_files(got, k_dir, stage) == _artifact_files(want, u_dir, stage)  # weights, curve, samples
    assert not _resume_dirs(k_root, kind)  # the checkpoints go once the artifact is published
    return info


def test_sft_killed_mid_stage_resumes_bit_identically(roots):
    info = check_resume(roots, TINY + SFT + ["pipeline=sft", "trainer.checkpoint_every_n_steps=10"], "sft", "sft",
                        "sft")
    assert 0 < info["resumed_from_step"] < 150


def test_reward_model_killed_mid_stage_resumes_bit_identically(roots):
    args = TINY + SFT + ["pipeline=reward", "sft.max_steps=30", "reward.batch_size=8", "reward.max_epochs=20",
                         "reward.max_steps=120", "trainer.checkpoint_every_n_steps=10"]
    check_resume(roots, args, "rm", "reward", "rm")


def test_online_rl_killed_mid_stage_resumes_bit_identically(roots):
    """PPO with a critic, an adaptive KL controller and a schedule: weights, optimizer, critic, controller,
    the rollout generator, the prompt order and the scheduled settings all continue from the checkpoint."""
    info = check_resume(roots, TINY + SFT + RL + ["trainer.checkpoint_every_n_steps=5"], "rl", "rl", "rl")
    assert info["resumed_from_step"] % 5 == 0


def test_resumable_loader_continues_mid_epoch_and_across_epochs():
    """The loader's saved position replays the rest of the epoch and the next epochs exactly, also
    when the checkpoint closed an epoch."""
    from pipeline.data import ResumableLoader, seeded_generator

    def loader():
        return ResumableLoader(list(range(50)), batch_size=8, shuffle=True, generator=seeded_generator(3),
                               collate_fn=list)

    full = loader_epochs(loader(), 3)  # 3 epochs of 7 batches
    for trained in (3, 7):  # mid-epoch; the epoch's last batch
        first = loader()
        it = iter(first)
        seen = [next(it) for _ in range(trained)]
        first.mark_trained(trained)
        again = loader()
        again.load_state_dict(first.state_dict())
        assert (seen + loader_epochs(again, 3))[:len(full)] == full


def loader_epochs(loader, epochs: int) -> list:
    return [b for _ in range(epochs) for b in loader]


# ----------------------------------------------------------------------------- in-process stops
class _Stop(Exception):
    pass


def _stop_at(stage: str, step: int):
    def hook(name, s, metrics):
        if name == stage and s >= step:
            raise _Stop(f"{name} at {s}")
    return hook


def _stopped_then_resumed(root: Path, args: list[str], stage: str, step: int) -> tuple[dict, dict]:
    with pytest.raises(_Stop):
        run_pipeline(compose(args, root, "stopped"), hook=_stop_at(stage, step))
    cfg = compose(args, root, "resumed")
    got = run_pipeline(cfg)
    return got, json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())["stages"][stage]


def test_damaged_checkpoint_is_ignored_and_force_starts_over(tmp_path):
    """An unreadable checkpoint: a warning and a run from the start (same results); force=true
    discards a killed run's checkpoints."""
    args = TINY + SFT + ["pipeline=sft", "sft.max_steps=40", "trainer.checkpoint_every_n_steps=10",
                         "trainer.log_every_n_steps=1"]
    want = run_pipeline(compose(args, tmp_path / "u", "u"))
    root = tmp_path / "k"
    with pytest.raises(_Stop):
        run_pipeline(compose(args, root, "stopped"), hook=_stop_at("sft", 25))
    (ckpt,) = _resume_dirs(root, "sft")[0].glob("*.ckpt")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    cfg = compose(args, root, "damaged")
    assert run_pipeline(cfg) == want
    assert "resumed_from_step" not in json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())["stages"]["sft"]

    with pytest.raises(_Stop):
        run_pipeline(compose(args + ["force=true"], root, "stopped2"), hook=_stop_at("sft", 25))
    assert _checkpoint_step(root, "sft") == 20
    cfg = compose(args + ["force=true"], root, "forced")
    assert run_pipeline(cfg)["stages"]["sft"] == want["stages"]["sft"]
    assert "resumed_from_step" not in json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())["stages"]["sft"]


def test_dpo_with_running_statistics_resumes_bit_identically(tmp_path):
    args = TINY + SFT + ["pipeline=dpo", "sft.max_steps=30", "dpo.batch_size=8", "dpo.loss_type=bco_pair",
                         "dpo.max_steps=40", "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=1"]
    want = run_pipeline(compose(args, tmp_path / "u", "u"))
    got, info = _stopped_then_resumed(tmp_path / "k", args, "dpo", 25)
    assert info["resumed_from_step"] == 20 and got == want


def test_nlhf_resumes_bit_identically_mid_round(tmp_path):
    """Online DPO with 2-iteration rounds and a reference updated every round, stopped mid-round, with a
    schedule changing settings before and after the checkpoint."""
    args = TINY + SFT + ["pipeline=nlhf", "sft.max_steps=30", "preference_model.max_steps=10",
                         "stages.nash.algorithm=online_dpo", "nlhf.rounds=6", "nlhf.steps_per_round=2",
                         "nlhf.ref_update_every=1", "nlhf.prompts_per_step=8", "nlhf.eval_every=4",
                         "nlhf.eval_prompts=16", "algorithm.max_new_tokens=8", "trainer.checkpoint_every_n_steps=3",
                         "trainer.log_every_n_steps=1",
                         "nlhf.schedule=[{step:1,overrides:['algorithm.beta=0.3']},"
                         "{step:4,overrides:['nlhf.optim.lr=0.0005','algorithm.temperature=0.9']}]"]
    want = run_pipeline(compose(args, tmp_path / "u", "u"))
    got, info = _stopped_then_resumed(tmp_path / "k", args, "nash", 5)
    assert info["resumed_from_step"] == 3 and got == want  # iteration 3: the middle of round 1
