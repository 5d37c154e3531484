"""Failures a user can trust: a cache many processes can share, signals, filesystem faults,
secrets, model paths, and one-step checks of the online-RL math (KL shaping, temperature)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import ArtifactStore
from pipeline.errors import ConfigError, DataError, PipelineError, TrainingError
from pipeline.run import run_pipeline
from tests.conftest import ROOT, compose, run_cli

FAST = [
    "pipeline=sft", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "task.num_train_prompts=64", "task.num_eval_prompts=8", "sft.max_epochs=1", "sft.batch_size=16",
    "eval.num_samples=1", "eval.max_new_tokens=8", "trainer.enable_progress_bar=false", "print_summary=false",
]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """One SFT run; tests copy or re-read its cache."""
    root = tmp_path_factory.mktemp("cache")
    res = run_pipeline(compose(FAST, root, "first"))
    return root, res


def _sft_dir(root: Path) -> Path:
    (art,) = [p for p in (root / "outputs" / "artifacts").iterdir() if p.name.startswith("sft-")]
    return art


def _copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "outputs" / "artifacts", dst / "outputs" / "artifacts", symlinks=True)
    return dst


# ----------------------------------------------------------------------------- verified reuse
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_model_dir"])
def test_damaged_artifact_is_rebuilt_with_a_warning_naming_the_file(cached, tmp_path, damage, caplog):
    root = _copy_cache(cached[0], tmp_path)
    art = _sft_dir(root)
    weights = art / "model" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        import shutil

        shutil.rmtree(art / "model")
    with caplog.at_level("WARNING", logger="pipeline"):
        res = run_pipeline(compose(FAST, root, "again"))
    assert "damaged and will be rebuilt" in caplog.text and "model" in caplog.text
    info = json.loads((root / "outputs" / "runs" / "again" / "run.json").read_text())
    assert not info["stages"]["sft"]["reused"]
    assert res == cached[1]  # rebuilt deterministically: the same numbers
    assert (art / "model" / "model.safetensors").stat().st_size == json.loads(
        (art / "manifest.json").read_text())["files"]["model/model.safetensors"]["size"]


def test_non_finite_metrics_are_not_published(tmp_path, monkeypatch):
    from pipeline.stages.evaluate import EvaluateStage

    original = EvaluateStage.run
    monkeypatch.setattr(EvaluateStage, "run", lambda self, work: {**original(self, work), "eval/kl": float("nan")})
    with pytest.raises(TrainingError, match=r"non-finite metrics \['eval/kl'\]; not published"):
        run_pipeline(compose(FAST, tmp_path))
    arts = [p.name for p in (tmp_path / "outputs" / "artifacts").iterdir() if not p.name.startswith(".")]
    assert [a.split("-")[0] for a in arts] == ["sft"]
    assert not list((tmp_path / "outputs").rglob("results.json"))


def test_results_are_identical_across_fresh_runs_and_timings_live_in_run_json(cached, tmp_path):
    again = run_pipeline(compose(FAST + ["force=true"], tmp_path, "fresh"))
    assert again == cached[1]
    assert not any(k.startswith("perf/") for st in again["stages"].values() for k in st["metrics"])
    info = json.loads((tmp_path / "outputs" / "runs" / "fresh" / "run.json").read_text())
    assert info["runtime"]["torch_threads"] >= 1 and "timings" in info["stages"]["sft"]


def test_published_files_are_readable_by_others(cached):
    art = _sft_dir(cached[0])
    umask = os.umask(0)
    os.umask(umask)
    for p in [art, *art.rglob("*")]:
        if not p.is_symlink():
            assert p.stat().st_mode & 0o444 & ~umask == 0o444 & ~umask, (p, oct(p.stat().st_mode))
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["runtime"]["torch_threads"] >= 1 and "model/model.safetensors" in manifest["files"]


def test_fully_cached_run_takes_no_lock_and_cleans_nothing_it_cannot(cached, tmp_path, monkeypatch):
    """A fully cached rerun only reads the cache (e.g. a read-only shared cache)."""
    def no_lock(self, kind, fp):
        raise AssertionError("a cached lookup must not open a lock file for writing")

    monkeypatch.setattr(ArtifactStore, "lock", no_lock)
    res = run_pipeline(compose(FAST, cached[0], "readonly"))
    assert res == cached[1]


# ----------------------------------------------------------------------------- build dirs and locks
_HOLD = """
import sys, time
from pipeline.artifacts import ArtifactStore
store = ArtifactStore(sys.argv[1])
with store.{what}("sft", "abc"{extra}) as x:
    print("holding", flush=True)
    time.sleep(60)
"""


def _hold(tmp_path, what: str) -> subprocess.Popen:
    extra = ", {}" if what == "build" else ""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(what=what, extra=extra), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_clean_tmp_removes_dead_builds_and_keeps_live_ones_whatever_their_pid(tmp_path):
    live = _hold(tmp_path, "build")
    try:
        tmp = tmp_path / ".tmp"
        (live_dir,) = [d for d in tmp.iterdir() if d.is_dir()]
        dead = tmp / "sft-dead-otherhost-1-abcdef"  # pid 1 of another container: looks alive by pid, is dead
        dead.mkdir()
        (tmp / "sft-dead2-host-99999999-abcdef").mkdir()
        ArtifactStore(tmp_path).clean_tmp()
        assert live_dir.is_dir() and not dead.exists() and not (tmp / "sft-dead2-host-99999999-abcdef").exists()
    finally:
        live.kill()
        live.wait()
    ArtifactStore(tmp_path).clean_tmp()  # the killed builder's directory is now dead
    assert not [d for d in (tmp_path / ".tmp").iterdir() if d.is_dir()]


def test_waiting_for_a_lock_names_the_holder_and_can_time_out(tmp_path):
    holder = _hold(tmp_path, "lock")
    try:
        store = ArtifactStore(tmp_path, lock_timeout_s=1.0)
        t0 = time.time()
        with pytest.raises(PipelineError) as err:
            with store.lock("sft", "abc"):
                pass
        assert time.time() - t0 < 10
        assert f"pid {holder.pid}" in err.value.message and "gave up waiting after 1 s" in err.value.message
        assert err.value.where == "cache.lock_timeout_s"
    finally:
        holder.kill()
        holder.wait()
    with ArtifactStore(tmp_path, lock_timeout_s=1.0).lock("sft", "abc"):
        pass  # released when its holder died


# ----------------------------------------------------------------------------- signals and the filesystem
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_run_with_a_message_and_nothing_half_written(tmp_path, sig, code):
    args = [a for a in FAST if not a.startswith("sft.max_epochs")] + ["sft.max_epochs=200"]
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / "outputs" / "artifacts" / ".tmp"
    deadline = time.time() + 120
    while not (tmp.is_dir() and any(d.is_dir() for d in tmp.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert not list((tmp_path / "outputs").rglob("results.json"))
    assert not [p for p in (tmp_path / "outputs" / "artifacts").iterdir() if p.name.startswith("sft-")]
    # no build directory is left; the stage's mid-stage checkpoints (<kind>-<fp>.resume) stay for the rerun
    assert not [d for d in tmp.iterdir() if d.is_dir() and not d.name.endswith(".resume")]
    (log,) = list((tmp_path / "outputs" / "runs").rglob("run.log"))
    assert f"interrupted by {signal.Signals(sig).name}" in log.read_text()


def test_output_root_under_a_file_is_one_line(tmp_path):
    (tmp_path / "outputs").write_text("not a directory")
    proc = run_cli(FAST, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot create the run directory" in proc.stderr and "is a file" in proc.stderr


def test_two_runs_started_together_get_their_own_directories(tmp_path):
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", *FAST, f"seed={s}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    runs = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 2
    assert sorted(json.loads((r / "results.json").read_text())["seed"] for r in runs) == [1, 2]


# ----------------------------------------------------------------------------- models and secrets
def test_model_paths_fail_clearly(tmp_path):
    from pipeline.run import plan

    with pytest.raises(ConfigError, match="model=pretrained needs the model to load"):
        plan(compose(["model=pretrained"], tmp_path))
    with pytest.raises(ConfigError, match=f"not found: {tmp_path}/nope"):
        plan(compose([f"model.name_or_path={tmp_path}/nope"], tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a Hugging Face model directory: it has no config.json"):
        plan(compose([f"model.name_or_path={tmp_path}/empty"], tmp_path))


def test_secrets_never_reach_a_file_and_ordinary_settings_stay_visible(tmp_path):
    pytest.importorskip("wandb")
    secret = "fake-wandb-key-1234567890abcdef1234567890abcdef1234"
    hf_secret = "hf_fakeTokenValue1234567890"
    proc = run_cli(FAST + ["logger=wandb", "logger.wandb.mode=offline", "model.tokenizer=null"], tmp_path,
                   env={"WANDB_API_KEY": secret, "HF_TOKEN": hf_secret, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen_config = False
    for p in (tmp_path / "outputs").rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            assert secret.encode() not in data and hf_secret.encode() not in data, p
            if p.suffix == ".wandb" and b"max_new_tokens" in data:  # the offline run's records hold the config
                seen_config = True
                assert b'"max_new_tokens":24' in data and b'"max_new_tokens":"***"' not in data
    assert seen_config, "the W&B offline run's config should hold the (unmasked) settings"


def test_scrubber_masks_secret_keys_only():
    from pipeline.tracking import scrub_secrets

    out = scrub_secrets({"max_new_tokens": 3, "tokenizer": "x", "hf_token": "s", "wandb": {"api_key": "s", "project": "p"},
                         "storage": "postgresql://user:hunter2@db:5432/optuna", "password": "s"})
    assert out["max_new_tokens"] == 3 and out["tokenizer"] == "x" and out["wandb"]["project"] == "p"
    assert out["hf_token"] == out["wandb"]["api_key"] == out["password"] == "***"
    assert "hunter2" not in out["storage"] and out["storage"].startswith("postgresql://user:")


# ----------------------------------------------------------------------------- data
def test_rl_prompt_file_too_long_fails_before_training_naming_the_line(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                         ["review of the pizza :", "review of the cake : " + "very " * 200, "review of the bar :"]))
    base = [a for a in FAST if not a.startswith("pipeline=")] + [
        "pipeline=rl_gold", f"rl.data.path={f}", "rl.total_steps=2", "rl.prompts_per_step=2", "algorithm=grpo",
        "algorithm.max_new_tokens=8", "rl.eval_every=0"]
    with pytest.raises(DataError) as err:
        run_pipeline(compose(base, tmp_path, "long"))
    assert err.value.where == f"{f}:2" and "the prompt is" in err.value.message
    assert "rl.data.on_long_prompt=drop" in err.value.fix
    assert not [p for p in (tmp_path / "outputs" / "artifacts").iterdir() if p.name.startswith("rl-")]
    for mode in ("drop", "truncate_left"):
        res = run_pipeline(compose(base + [f"rl.data.on_long_prompt={mode}"], tmp_path, mode))
        assert res["stages"]["rl"]["metrics"]["train/steps"] == 2


def test_conversational_prompts_for_rl_are_rendered_like_sft_renders_them(tmp_path):
    from pipeline.data import load_prompt_rows, load_sft_examples
    from pipeline.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello there, how are you"], vocab_size=300)
    msgs = [{"role": "user", "content": "say hi"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": msgs, "topic": "x"}) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": msgs, "completion": [{"role": "assistant",
                                                                                   "content": "hi"}]}) + "\n")

    class D:
        path, name, split, format, columns, max_samples = None, None, "train", "auto", {}, None

    d = D()
    d.path = str(tmp_path / "p.jsonl")
    (row,) = load_prompt_rows(d, key="rl.data", tokenizer=tok)
    d.path = str(tmp_path / "s.jsonl")
    (sft,) = load_sft_examples(d, tokenizer=tok, key="sft.data")
    assert row["prompt"] == sft.prompt and row["topic"] == "x"
    assert row["prompt"].endswith("<|assistant|>")


def test_preference_file_missing_rejected_says_so(tmp_path):
    from pipeline.data import load_preference_examples

    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")

    class D:
        path, name, split, format, columns, max_samples = str(f), None, "train", "auto", {}, None

    with pytest.raises(DataError) as err:
        load_preference_examples(D(), key="reward.data")
    assert "looks like a preference dataset, but it has no 'rejected' column" in err.value.message
    assert "rejected" in err.value.fix


# ----------------------------------------------------------------------------- one-step RL math
@pytest.fixture(scope="module")
def one_step_module(cached):
    """An OnlineRLModule on the cached SFT policy with a reference that differs from it."""
    from pipeline.artifacts import Artifact
    from pipeline.modules.rl import OnlineRLModule
    from pipeline.models.policy import policy_from_artifact

    cfg = compose(FAST + ["algorithm=rloo", "algorithm.temperature=0.7", "algorithm.kl_coef=0.5"], cached[0])
    art = Artifact.load(_sft_dir(cached[0]))
    policy, tok = policy_from_artifact(art)
    ref, _ = policy_from_artifact(art)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scorer = lambda prompts, completions, rows: torch.zeros(len(completions))  # noqa: E731
    module = OnlineRLModule(policy, tok, scorer, cfg.algorithm, cfg.rl, ref_policy=ref, seed=0)
    return module, [{"prompt": f"review of the {t} :"} for t in ("pizza", "movie", "hotel", "phone")]


def test_kl_penalty_is_in_the_token_rewards(one_step_module):
    """Dropping the KL term where the step shapes its token rewards fails here, in seconds."""
    module, rows = one_step_module
    exp = module.experience(rows)
    seq_kl = exp.kl.sum(1)
    assert seq_kl.abs().max() > 1e-3  # the reference differs from the policy
    # score 0 everywhere: each sequence's reward is exactly -kl_coef * its KL
    torch.testing.assert_close(exp.token_rewards.sum(1), -0.5 * seq_kl, rtol=1e-5, atol=1e-6)


def test_logprobs_use_the_sampling_temperature_in_rollout_and_update(one_step_module):
    """Log-probs at temperature 1 in both the rollout and the training forward fail here."""
    from pipeline.rollout.engine import position_ids_from_mask

    module, rows = one_step_module
    exp = module.experience(rows)
    r = exp.rollout
    ids, attn, start = r.input_ids, r.attention_mask, r.response_start
    with torch.no_grad():
        logits = module.policy(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
        expected = torch.log_softmax(logits[:, start - 1:-1].float() / 0.7, -1).gather(-1, ids[:, start:, None])[..., 0]
        expected = expected * r.response_mask
        at_one = torch.log_softmax(logits[:, start - 1:-1].float(), -1).gather(-1, ids[:, start:, None])[..., 0]
    torch.testing.assert_close(exp.old_logp, expected, rtol=1e-4, atol=1e-4)  # the rollout's
    with torch.no_grad():
        train = module.policy_logprobs(ids, attn, start)  # the update's forward pass
    torch.testing.assert_close(train, expected, rtol=1e-4, atol=1e-4)
    assert ((expected - at_one * r.response_mask).abs().max()) > 1e-2  # temperature 0.7 really differs from 1
