"""The DPO-family stage: learning on the built-in task (DPO, IPO, SimPO, f-DPO raise the gold reward
above the SFT policy), completion-only scoring, every parameter trained, LoRA with the adapters-off
reference, precomputed reference log-probs (equal to on-the-fly, reused by a loss-only rerun), loss
mixes, TRL metric names, user preference files, and one-line errors for bad configs and data.

One SFT artifact serves the whole file (module-scoped work directory, identical SFT settings).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import Artifact
from pipeline.errors import ConfigError, DataError
from pipeline.run import plan, run_pipeline
from tests.conftest import TINY, compose, run_cli

#: the file's shared SFT model (TINY: 1000 prompts, 4 epochs) and small DPO runs: 720 train / 80 held-out
#: pairs, one epoch of 45 steps
SMALL = TINY + ["task.num_pref_prompts=800", "dpo.batch_size=16", "dpo.max_epochs=1", "dpo.optim.lr=4e-4"]
#: 256 held-out samples per policy: the standard error of the mean gold reward is about 0.04
EVAL = ["task.num_eval_prompts=64", "eval.num_samples=4"]
#: SFT -> DPO, no evaluation stage (tests that look at the DPO stage only)
SFT_DPO = "pipeline.stages=[{name: sft, kind: sft}, {name: dpo, kind: dpo, inputs: {policy: sft}}]"
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def sft_art(workdir) -> Artifact:
    """The file's SFT artifact (built once, reused by every pipeline below)."""
    res, out = run(workdir, ["pipeline.stages=[{name: sft, kind: sft}]"], "sft")
    return Artifact.load((out / "stages" / "sft").resolve())


def run(workdir: Path, overrides: list[str], name: str) -> tuple[dict, Path]:
    cfg = compose(SMALL + overrides, workdir, name)
    return run_pipeline(cfg), Path(cfg.paths.output_dir)


def dpo_run(workdir: Path, overrides: list[str], name: str) -> tuple[dict, Artifact]:
    """SFT -> DPO only; returns the DPO stage's metrics and artifact."""
    res, out = run(workdir, [SFT_DPO, *overrides], name)
    return res["stages"]["dpo"]["metrics"], Artifact.load((out / "stages" / "dpo").resolve())


# --------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def compare(workdir):
    """pipeline=compare_dpo: one SFT, four DPO-family stages (their settings in conf/pipeline/compare_dpo.yaml)."""
    res, _ = run(workdir, ["pipeline=compare_dpo", *EVAL], "compare")
    return res


@pytest.mark.parametrize("stage", ["dpo", "ipo", "simpo", "f_dpo"])
def test_each_loss_raises_gold_reward_above_the_sft_policy(compare, stage):
    m = compare["stages"]["eval"]["metrics"]
    assert m[f"eval/{stage}/gold_reward"] > m["eval/sft/gold_reward"] + 0.15, m
    assert 0.0 < m[f"eval/{stage}/kl"] < 15.0  # it moved, and stayed near the SFT policy
    d = compare["stages"][stage]["metrics"]
    assert d["val/rewards/accuracies"] > 0.55 and d["train/steps"] == 45  # 720 pairs / 16


def test_trl_metric_names_and_held_out_metrics(compare):
    m = compare["stages"]["dpo"]["metrics"]
    for key in ("train/loss", "loss/sigmoid", *TRL_METRICS, "val/loss", *(f"val/{k}" for k in TRL_METRICS)):
        assert key in m and math.isfinite(m[key]), key
    assert m["val/pairs"] == 80 and m["train/pairs"] == 720
    assert m["val/rewards/margins"] == pytest.approx(m["val/rewards/chosen"] - m["val/rewards/rejected"], abs=1e-5)
    simpo = compare["stages"]["simpo"]["metrics"]
    assert "loss/simpo" in simpo and "loss/sigmoid" not in simpo


def test_compare_dpo_gives_each_stage_its_loss(compare, workdir):
    stages = {s.name: s for s in plan(compose(SMALL + ["pipeline=compare_dpo", *EVAL], workdir, "plan"))}
    assert stages["ipo"].cfg.dpo.loss_type == "ipo" and stages["ipo"].cfg.dpo.beta == 0.5
    assert stages["simpo"].cfg.dpo.loss_type == "simpo" and stages["f_dpo"].cfg.dpo.f_divergence_type == "js_divergence"
    assert len({s.fingerprint for s in stages.values()}) == len(stages)


# --------------------------------------------------------------------------- tokenization / scoring
@pytest.fixture(scope="module")
def tiny_lms():
    """A BPE tokenizer and three tiny random LMs: GPT-2 (sdpa and eager attention) and Llama (RoPE)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from pipeline.models.tokenizer import train_tokenizer

    tok = train_tokenizer(["review of the pizza : the pizza was tasty .", "the staff was rude and slow ."] * 4,
                          vocab_size=300)
    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    eager = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **ids))
    eager.set_attn_implementation("eager")
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, **ids)),
        "gpt2-eager": eager,
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=64, **ids)),
    }
    return {k: m.eval() for k, m in models.items()}, tok


def _direct_logp(model, prompt: list[int], response: list[int]) -> float:
    """log π(response | prompt) from the sequence alone, unpadded: the definition."""
    ids = torch.tensor([prompt + response])
    lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(lp[len(prompt) - 1:].sum())


def test_tokenization_keeps_the_prompt_boundary(tiny_lms):
    from pipeline.data import PreferenceExample, tokenize_preferences

    _, tok = tiny_lms
    pairs = [PreferenceExample("review of the pizza :", " the pizza was tasty .", " rude"),
             PreferenceExample("the staff :", " was slow and rude and slow .", " tasty .")]
    rows = tokenize_preferences(pairs, tok, max_length=64)
    eos = tok.eos_token_id
    for r, e in zip(rows, pairs):  # prompt and responses tokenized apart, as SFT does; EOS ends each response
        assert r["prompt_ids"] == tok(e.prompt)["input_ids"]
        assert r["chosen_ids"] == tok(e.chosen)["input_ids"] + [eos]
        assert r["rejected_ids"] == tok(e.rejected)["input_ids"] + [eos]
    # a response cut to fit max_length loses its EOS; an empty prompt is an error
    cut = tokenize_preferences(pairs[:1], tok, max_length=len(rows[0]["prompt_ids"]) + 2)[0]
    assert len(cut["chosen_ids"]) == 2 and cut["chosen_ids"][-1] != eos
    with pytest.raises(DataError, match="the prompt is empty"):
        tokenize_preferences([PreferenceExample("", " a", " b")], tok, max_length=64)


def test_packed_batch_scores_exactly_the_response_tokens_given_the_prompt(tiny_lms):
    """Pairs packed as prompt | chosen | rejected (tree mask, several pairs per row): every response's
    summed log-prob equals the one of its own unpadded prompt + response sequence."""
    import random

    from pipeline.data import PreferenceCollator
    from pipeline.modules.dpo import response_logps

    models, tok = tiny_lms
    rng = random.Random(0)
    word = lambda: rng.randrange(5, len(tok))  # noqa: E731
    rows = [{"prompt_ids": [word() for _ in range(rng.randint(1, 6))],
             "chosen_ids": [word() for _ in range(rng.randint(1, 9))],
             "rejected_ids": [word() for _ in range(rng.randint(1, 9))]} for _ in range(13)]
    batch = PreferenceCollator(tok.pad_token_id, row_length=32)(rows)
    b = len(rows)
    assert batch["input_ids"].shape[0] < b  # packed: fewer rows than pairs
    for i, r in enumerate(rows):  # response i's tokens are the targets of sequence i (chosen) / b + i (rejected)
        assert batch["targets"][batch["seq_index"] == i].tolist() == r["chosen_ids"]
        assert batch["targets"][batch["seq_index"] == b + i].tolist() == r["rejected_ids"]
    assert batch["lengths"].tolist() == [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]
    # a rejected token never sees the chosen response; a pair never sees another pair
    mask, pos = batch["attention_mask"][:, 0], batch["position_ids"]
    for i, r in enumerate(rows):
        first_rej = ((batch["seq_index"] == b + i).nonzero()[0, 0])
        row, col = int(batch["src_row"][first_rej]), int(batch["src_col"][first_rej])
        n_p = len(r["prompt_ids"])
        assert int(pos[row, col]) == n_p - 1  # the first rejected token is predicted from the last prompt token
        seen = mask[row, col + len(r["chosen_ids"]) + 1].nonzero()[:, 0].tolist()  # the first rejected token's row
        assert len(seen) == n_p + 1
    for name, model in models.items():
        with torch.no_grad():
            got = response_logps(model, batch)
        expect = [_direct_logp(model, r["prompt_ids"], r["chosen_ids"]) for r in rows] + \
                 [_direct_logp(model, r["prompt_ids"], r["rejected_ids"]) for r in rows]
        torch.testing.assert_close(got, torch.tensor(expect), atol=1e-4, rtol=0, msg=name)


# --------------------------------------------------------------------------- training mechanics
def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_every_parameter_changes_after_one_step(workdir, sft_art):
    m, art = dpo_run(workdir, ["dpo.max_steps=1", "dpo.optim.warmup_ratio=0"], "one-step")
    assert m["train/steps"] == 1 and art.manifest["inputs"]["policy"]["fingerprint"] == sft_art.fingerprint
    sft = _state(sft_art.model_dir)
    tuned = _state(art.model_dir)
    assert set(sft) == set(tuned)
    unchanged = [k for k in sft if torch.equal(sft[k], tuned[k])]
    assert not unchanged, unchanged


def test_lora_trains_adapters_only_with_the_adapters_off_reference(workdir, sft_art):
    m, art = dpo_run(workdir, ["dpo.lora.enabled=true", "dpo.lora.r=4", "dpo.max_steps=3", "dpo.optim.warmup_ratio=0",
                               "dpo.optim.lr=1e-2"], "lora")
    assert art.manifest["dpo"]["reference"] == "adapters_off"
    sft = _state(sft_art.model_dir)
    tuned = _state(art.model_dir)  # merged: the base model's keys, no adapters
    assert set(tuned) == set(sft)
    changed = {k for k in sft if not torch.equal(sft[k], tuned[k])}
    assert changed and all(("attn.c_attn" in k or "c_proj" in k) and k.endswith("weight") for k in changed), changed
    assert not any(k.startswith(("transformer.wte", "transformer.wpe", "transformer.ln_f")) for k in changed)


def test_adapters_off_reference_is_the_base_model(workdir, sft_art):
    """With LoRA and no reference model, the reference log-probs are the base model's, also after the
    adapters moved away from zero (so adapters-on and -off differ)."""
    from pipeline.data import PreferenceCollator, tokenize_preferences
    from pipeline.models.policy import apply_lora, policy_from_artifact
    from pipeline.modules.dpo import DPOModule, response_logps
    from pipeline.stages.dpo import loss_spec
    from pipeline.tasks import build_task

    cfg = compose(SMALL + ["dpo.lora.enabled=true"], workdir, "adapters")
    base, tok = policy_from_artifact(sft_art)
    policy = apply_lora(policy_from_artifact(sft_art)[0], cfg.dpo.lora)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module = DPOModule(policy, loss_spec(cfg.dpo), cfg.dpo.optim, ref_model=None)
    rows = tokenize_preferences(build_task(cfg.task).preference_examples("pref")[:8], tok, 64)
    batch = PreferenceCollator(tok.pad_token_id)(rows)
    logps = module.logps(batch)
    with torch.no_grad():
        expect = response_logps(base.eval(), batch)
    torch.testing.assert_close(torch.cat([logps.ref_chosen, logps.ref_rejected]), expect, atol=1e-4, rtol=0)
    assert (torch.cat([logps.policy_chosen, logps.policy_rejected]) - expect).abs().max() > 0.1
    assert logps.policy_chosen.requires_grad and not logps.ref_chosen.requires_grad


def test_precomputed_reference_log_probs_match_and_are_reused_by_a_loss_only_rerun(workdir, sft_art, monkeypatch):
    import pipeline.stages.dpo as dpo_stage

    steps = ["dpo.max_steps=3"]
    live, _ = dpo_run(workdir, steps, "live")
    pre, art = dpo_run(workdir, steps + ["dpo.precompute_ref_log_probs=true"], "pre")
    rec = art.manifest["reference_logps"]
    assert rec["reused"] is False and (art.path / "ref_logps.safetensors").is_file()
    assert art.manifest["dpo"]["reference"] == "precomputed (model)"
    # the same training with reference log-probs from the cache as with a reference forward pass per step
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/chosen", "train/loss"):
        assert pre[key] == pytest.approx(live[key], abs=1e-4), key

    # a rerun that changes only the loss reuses them: no reference pass at all
    def fail(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed")

    monkeypatch.setattr(dpo_stage, "reference_logps", fail)
    ipo, art2 = dpo_run(workdir, steps + ["dpo.precompute_ref_log_probs=true", "dpo.loss_type=ipo"], "pre-ipo")
    rec2 = art2.manifest["reference_logps"]
    assert art2.fingerprint != art.fingerprint and rec2["reused"] is True and rec2["fingerprint"] == rec["fingerprint"]
    assert "loss/ipo" in ipo

    # and they are the reference's log-probs of each pair, whatever the batching
    from safetensors.torch import load_file

    from pipeline.data import PreferenceCollator, split_holdout, tokenize_preferences
    from pipeline.models.policy import policy_from_artifact
    from pipeline.modules.dpo import response_logps
    from pipeline.tasks import build_task

    cfg = compose(SMALL, workdir, "check")
    ref, tok = policy_from_artifact(sft_art)
    train, _ = split_holdout(build_task(cfg.task).preference_examples("pref"), 0.1, cfg.seed)
    rows = tokenize_preferences(train[:24], tok, 64)
    batch = PreferenceCollator(tok.pad_token_id)(rows)
    with torch.no_grad():
        lp = response_logps(ref.eval(), batch)
    stored = load_file(str(art.path / "ref_logps.safetensors"))["train"][:24]
    torch.testing.assert_close(stored, torch.stack([lp[:24], lp[24:]], 1), atol=1e-4, rtol=0)


def test_explicit_reference_input(workdir):
    """A `reference` input is loaded as the reference model; naming the SFT model gives the default run's numbers."""
    live, _ = dpo_run(workdir, ["dpo.max_steps=3"], "live")  # cached by the precompute test when it ran first
    ref, art = dpo_run(workdir, [SFT_DPO.replace("{policy: sft}", "{policy: sft, reference: sft}"), "dpo.max_steps=3"],
                       "reference-input")
    assert art.manifest["inputs"]["reference"]["fingerprint"] == art.manifest["inputs"]["policy"]["fingerprint"]
    assert art.manifest["dpo"]["reference"] == "model"
    for key in ("val/loss", "val/rewards/margins", "train/loss"):
        assert ref[key] == pytest.approx(live[key], abs=1e-6), key


@pytest.mark.parametrize("losses", [
    ["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0,0.2]"],
    ["dpo.loss_type=bco_pair"],
    ["dpo.loss_type=orpo"],
    ["dpo.reference_free=true"],
])
def test_loss_mixes_and_stateful_losses_train(losses, workdir):
    m, art = dpo_run(workdir, ["dpo.max_steps=3", *losses], "mix-" + losses[0].split("=")[1])
    assert m["train/steps"] == 3 and math.isfinite(m["val/loss"])
    for key in TRL_METRICS:
        assert key in m and f"val/{key}" in m
    if "sft" in losses[0]:  # the logged loss is the weighted sum of the logged terms
        assert m["train/loss"] == pytest.approx(m["loss/sigmoid"] + 0.2 * m["loss/sft"], abs=1e-5)
        assert art.manifest["dpo"]["loss_weights"] == [1.0, 0.2]
    if losses[0].endswith(("orpo", "reference_free=true")):  # no reference model loaded, no reference pass
        assert art.manifest["dpo"]["reference"] == "none"
        assert m["rewards/chosen"] == pytest.approx(0.1 * m["logps/chosen"], abs=1e-4)  # β·log π: uniform reference


# --------------------------------------------------------------------------- user data
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory) -> dict[str, Path]:
    from pipeline.tasks import build_task

    d = tmp_path_factory.mktemp("prefs")
    task = build_task(compose([], d).task)
    ex = task.preference_examples("pref")[:40]
    explicit = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in ex]
    return {
        "explicit": _jsonl(d / "explicit.jsonl", explicit),
        "implicit": _jsonl(d / "implicit.jsonl", [{"chosen": r["prompt"] + r["chosen"],
                                                   "rejected": r["prompt"] + r["rejected"]} for r in explicit]),
        "conversational": _jsonl(d / "conversational.jsonl", [
            {"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in explicit]),
        "no_rejected": _jsonl(d / "no_rejected.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]}
                                                        for r in explicit]),
    }


@pytest.mark.parametrize("fmt", ["explicit", "implicit", "conversational"])
def test_user_preference_files_train(fmt, pref_files, workdir):
    m, art = dpo_run(workdir, [f"dpo.data.path={pref_files[fmt]}", "dpo.max_steps=2"], f"user-{fmt}")
    assert m["train/pairs"] == 36 and m["val/pairs"] == 4 and m["train/steps"] == 2
    assert math.isfinite(m["val/loss"]) and "task" not in art.manifest["config"]  # the user's pairs, not the task's


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("overrides,where,fragment", [
    (["dpo.loss_type=ipo", "dpo.simpo_gamma=1.0"], "dpo.simpo_gamma",
     "simpo_gamma=1.0 has no effect with loss_type ['ipo']"),
    (["dpo.loss_type=sigmod"], "dpo.loss_type", "unknown preference loss 'sigmod' (did you mean 'sigmoid'?)"),
    (["dpo.loss_type=[sigmoid,simpo]"], "dpo.loss_type", "['simpo'] are reference-free by construction"),
    (["dpo.loss_type=rrhf"], "dpo.loss_type", "['rrhf'] need ranked lists of K responses"),
    (["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0]"], "dpo.loss_weights", "1 weights for 2 losses"),
    (["dpo.loss_type=simpo", "dpo.precompute_ref_log_probs=true"], "dpo.precompute_ref_log_probs",
     "precompute_ref_log_probs=true has no effect: loss_type ['simpo'] never reads reference log-probs"),
    (["dpo.loss_type=ipo", "dpo.use_margin=true"], "dpo.use_margin", "use_margin=true has no effect"),
    (["dpo.beta=0"], "dpo.beta", "beta=0.0 must be > 0"),
    (["dpo.loss_type={a: 1}"], "dpo.loss_type", "must be a loss name or a list of names"),
    (["dpo.loss_type=orpo", SFT_DPO.replace("{policy: sft}", "{policy: sft, reference: sft}")], "pipeline.stages.dpo.inputs.reference",
     "has a `reference` input, but loss_type ['orpo'] never reads reference log-probs"),
])
def test_invalid_loss_settings_are_one_line_config_errors(overrides, where, fragment, tmp_path):
    with pytest.raises(ConfigError) as info:
        plan(compose(["pipeline=dpo", *overrides], tmp_path))
    err = info.value
    assert err.where == where and fragment in err.message, str(err)
    assert "\n" not in err.message


def test_preference_file_missing_rejected_is_a_data_error(pref_files, workdir):
    with pytest.raises(DataError) as info:
        run(workdir, [SFT_DPO, f"dpo.data.path={pref_files['no_rejected']}"], "no-rejected")
    err = info.value
    assert err.where == f"{pref_files['no_rejected']} (dpo.data)"
    assert "no 'rejected' column (columns found: chosen, prompt)" in err.message and "\n" not in err.message
    assert not list((workdir / "outputs" / "artifacts").glob("dpo-*/ref_logps.safetensors.tmp"))


@pytest.mark.parametrize("case", ["option", "file"])
def test_cli_errors_exit_2_with_one_line_and_no_traceback(case, pref_files, tmp_path):
    args, expect = {
        "option": (["dpo.loss_type=ipo", "dpo.simpo_gamma=1.0"],
                   "error: dpo.simpo_gamma: simpo_gamma=1.0 has no effect with loss_type ['ipo']"),
        "file": ([f"dpo.data.path={pref_files['no_rejected']}", "model.n_layer=1", "model.n_embd=32",
                  "task.num_train_prompts=32", "sft.max_epochs=1"],
                 f"error: {pref_files['no_rejected']} (dpo.data): this looks like a preference dataset, but it has no 'rejected' column"),
    }[case]
    proc = run_cli(["pipeline=dpo", "trainer.enable_progress_bar=false", *args], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert expect in " ".join(proc.stderr.split()) and proc.stderr.count("error:") == 1, proc.stderr


def test_cli_pipeline_dpo_prints_kl_in_the_summary(workdir, sft_art):
    """`python -m pipeline pipeline=dpo` (the README command, small settings) ends with the policy table and KL."""
    proc = run_cli(["pipeline=dpo", *SMALL, "dpo.max_steps=4", "print_summary=true"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "eval: policies on held-out prompts (KL to 'sft')" in out and "kl" in out.split("KL to 'sft'")[1]
    assert "val/rewards/accuracies" in out
    table = out.split("KL to 'sft'")[1].split("win rate of row over column")[0]  # the policy table only
    rows = [line.split() for line in table.splitlines()]
    assert [r[1] for r in rows if len(r) > 2 and r[1] in ("sft", "dpo")] == ["sft", "dpo"]


# --------------------------------------------------------------------------- docs and schema
def test_readme_loss_table_matches_the_registry():
    """Every registered loss is in the README table, with the reference use and options it declares."""
    import re

    from pipeline.algorithms.preference_losses import PREFERENCE_LOSSES
    from tests.conftest import ROOT

    table = (ROOT / "README.md").read_text().split("<!-- dpo-loss-table -->")[1]
    seen = set()
    for row in (r for r in table.splitlines() if r.startswith("| `")):
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        if names == ["loss_type"]:  # the header
            continue
        seen.update(names)
        if len(names) > 1:  # the listwise row
            continue
        meta = PREFERENCE_LOSSES.meta(names[0])
        assert cells[2] == meta["reference"], (names[0], cells[2])
        assert set(re.findall(r"`(\w+)`", cells[3])) == set(meta["options"]), (names[0], cells[3])
    assert seen == set(PREFERENCE_LOSSES)


def test_every_loss_option_has_its_default_in_the_schema():
    import dataclasses

    from pipeline.algorithms.preference_losses import OPTION_NAMES
    from pipeline.config.schema import DPOConfig
    from pipeline.stages.dpo import OPTION_DEFAULTS

    assert OPTION_NAMES <= {f.name for f in dataclasses.fields(DPOConfig)}
    assert set(OPTION_DEFAULTS) == OPTION_NAMES and OPTION_DEFAULTS["beta"] == 0.1
