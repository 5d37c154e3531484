"""The fast path of the online-RL update equals the straightforward computation.

The update runs packed batches (each prompt once, its responses as branches under a tree
mask), the LM head on the response positions only, chunked, and ``log_softmax + gather``
(pipeline/models/packing.py, ``ResponseLayout`` in pipeline/rollout/engine.py). Here every
piece is checked against the textbook version - the full model over the padded batch, a full
log-softmax over the vocabulary - on tiny GPT-2 and Llama models, with left/right padding,
groups of samples sharing a prompt, temperature, LoRA and the PPO critic: log-probs, entropy,
the policy and KL losses and their gradients agree to float32 rounding.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.algorithms import POLICY_LOSSES, agg_loss
from pipeline.algorithms.kl import kl_k3
from pipeline.models import packing
from pipeline.models.packing import accepts_packed, pack_trees
from pipeline.models.policy import disable_dropout
from pipeline.rollout.engine import (
    HFRolloutEngine,
    SamplingParams,
    layout_responses,
    position_ids_from_mask,
    reference_logprobs,
    sequence_logprobs,
)
from tests.test_rollout import EOS, MODELS, PROMPTS, bias_eos, make_gpt2, make_tokenizer

ATOL = 2e-5  # float32: the packed and padded batches sum attention in a different order


@pytest.fixture(params=sorted(MODELS))
def rollout(request):
    """(model in train mode without dropout, as the rl stage trains it; tokenizer; a rollout:
    4 prompts x 3 samples with uneven lengths)."""
    make_model, bos, mild, _ = MODELS[request.param]
    model, tok = make_model(), make_tokenizer(bos=bos)
    engine = HFRolloutEngine(model, tok)
    hook = bias_eos(model, mild)
    try:
        batch = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3), generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert batch.has_eos.any() and len(set(batch.response_lengths.tolist())) > 2  # responses of many lengths
    assert len(set(batch.prompt_mask.sum(1).tolist())) > 1  # prompts really are left-padded
    return disable_dropout(model).train(), tok, batch


def naive_logprobs(model, ids, attn, start, temperature=1.0):
    """The textbook version: the full model on the padded batch, a full log-softmax over the vocabulary."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    logp_all = torch.log_softmax(logits[:, start - 1:-1].float() / temperature, dim=-1)
    mask = attn[:, start:].float()
    logp = logp_all.gather(-1, ids[:, start:, None])[..., 0] * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, entropy


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for name in a:  # float32 rounding, relative to the gradient's scale
        scale = max(1.0, float(b[name].abs().max()))
        torch.testing.assert_close(a[name], b[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_packed_layout_computes_each_prompt_once(rollout):
    model, _, batch = rollout
    ids, attn, start = batch.input_ids, batch.attention_mask, batch.response_start
    layout = layout_responses(ids, attn, start)
    assert layout.packed and accepts_packed(model)
    assert layout.targets.numel() == int(batch.response_mask.sum())
    # one tree per prompt (its 3 samples fit one row): 4 sequence starts, not 12 (padding is token 0)
    assert int(((layout.position_ids == 0) & (layout.input_ids != 0)).sum()) == len(PROMPTS)
    assert layout.input_ids.shape[0] < len(batch) and layout.input_ids.numel() < ids.numel()
    # the targets are the response tokens, and dest puts them back in place
    grid = torch.zeros(ids.shape[0], ids.shape[1] - start, dtype=torch.long)
    grid.view(-1)[layout.dest] = layout.targets
    assert torch.equal(grid, batch.response_ids * batch.response_mask)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("pack", [True, False])
def test_logprobs_entropy_and_losses_equal_the_straightforward_ones(rollout, temperature, pack):
    model, _, batch = rollout
    ids, attn, start, mask = batch.input_ids, batch.attention_mask, batch.response_start, batch.response_mask.float()
    torch.manual_seed(0)
    adv = torch.randn(mask.shape)
    ref = batch.logprobs + 0.1 * torch.randn(mask.shape) * mask  # a reference that differs from the policy
    ppo = POLICY_LOSSES.get("ppo_clip")

    def losses(logp):
        pg, _ = ppo(logp=logp, old_logp=batch.logprobs, advantages=adv, response_mask=mask, cliprange=0.2,
                    agg_mode="seq-mean-token-mean")
        return pg, agg_loss(kl_k3(logp, ref), mask, "token-mean")

    want_lp, want_ent = naive_logprobs(model, ids, attn, start, temperature)
    want_pg, want_kl = losses(want_lp)
    (want_pg + 0.1 * want_kl).backward()
    want_grads = grads(model)

    layout = layout_responses(ids, attn, start, pack=pack)
    assert layout.packed == pack
    lp, ent = sequence_logprobs(model, ids, attn, start, temperature, return_entropy=True, layout=layout)
    torch.testing.assert_close(lp, want_lp.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, want_ent.detach(), atol=ATOL, rtol=0)
    assert not ent.requires_grad  # a diagnostic: no graph over [tokens, vocab]
    pg, kl = losses(lp)
    torch.testing.assert_close(pg, want_pg.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(kl, want_kl.detach(), atol=ATOL, rtol=0)
    (pg + 0.1 * kl).backward()
    assert_same_grads(grads(model), want_grads)


def test_chunked_lm_head_gives_the_same_values_and_gradients(rollout, monkeypatch):
    """With a chunk of 5 tokens the head runs chunk by chunk, recomputed in the backward pass."""
    model, _, batch = rollout
    ids, attn, start = batch.input_ids, batch.attention_mask, batch.response_start
    w = torch.randn(batch.response_mask.shape)
    lp, ent = sequence_logprobs(model, ids, attn, start, return_entropy=True)
    (lp * w).sum().backward()
    whole = grads(model)
    monkeypatch.setattr(packing, "LOGITS_CHUNK_ELEMENTS", 5 * model.get_output_embeddings().weight.shape[0])
    lp_c, ent_c = sequence_logprobs(model, ids, attn, start, return_entropy=True)
    torch.testing.assert_close(lp_c, lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent_c, ent, atol=ATOL, rtol=0)
    (lp_c * w).sum().backward()
    assert_same_grads(grads(model), whole)


def test_padded_layout_trims_columns_that_are_padding_everywhere(rollout):
    model, tok, batch = rollout
    ids, attn, start = batch.input_ids, batch.attention_mask, batch.response_start
    pad = tok.pad_token_id
    # two extra all-padding prompt columns on the left and three response columns on the right
    wide_ids = torch.cat([torch.full((len(ids), 2), pad), ids, torch.full((len(ids), 3), pad)], 1)
    wide_attn = torch.cat([torch.zeros(len(ids), 2, dtype=attn.dtype), attn, torch.zeros(len(ids), 3, dtype=attn.dtype)], 1)
    layout = layout_responses(wide_ids, wide_attn, start + 2, pack=False)
    assert layout.input_ids.shape == ids.shape and layout.shape == (len(ids), ids.shape[1] - start + 3)
    with torch.no_grad():
        lp = sequence_logprobs(model, wide_ids, wide_attn, start + 2, layout=layout)
        want, _ = naive_logprobs(model, ids, attn, start)
    torch.testing.assert_close(lp[:, :-3], want, atol=ATOL, rtol=0)
    assert bool((lp[:, -3:] == 0).all())


def test_lora_policy_and_adapters_off_reference(rollout):
    """LoRA: the packed log-probs of the adapted policy, and the reference (adapters disabled)
    under inference mode equal the base model's straightforward ones."""
    from pipeline.models.policy import apply_lora

    model, _, batch = rollout
    ids, attn, start = batch.input_ids, batch.attention_mask, batch.response_start
    with torch.no_grad():
        base_lp, _ = naive_logprobs(model, ids, attn, start, 0.7)
    target = ["c_attn", "c_proj"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj", "o_proj"]
    policy = apply_lora(model, SimpleNamespace(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=target))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert accepts_packed(policy)
    want, _ = naive_logprobs(policy, ids, attn, start, 0.7)
    (want.sum()).backward()
    want_grads = grads(policy)
    assert want_grads and all("lora" in n for n in want_grads)
    lp = sequence_logprobs(policy, ids, attn, start, 0.7)
    torch.testing.assert_close(lp, want.detach(), atol=ATOL, rtol=0)
    assert (lp - base_lp).abs().max() > 1e-2  # the adapters change the policy
    lp.sum().backward()
    assert_same_grads(grads(policy), want_grads)
    ref = reference_logprobs(policy, None, ids, attn, start, 0.7)
    assert not ref.is_inference() and not ref.requires_grad
    torch.testing.assert_close(ref, base_lp, atol=ATOL, rtol=0)


def test_critic_values_on_the_packed_batch(rollout):
    """PPO's critic reads the same packed layout: the value of the state before each response token."""
    from pipeline.models.value import ValueModel

    model, _, batch = rollout
    ids, attn, start, mask = batch.input_ids, batch.attention_mask, batch.response_start, batch.response_mask
    critic = ValueModel.from_policy(model)
    with torch.no_grad():
        critic.head.weight.normal_()
    assert accepts_packed(critic)
    layout = layout_responses(ids, attn, start)
    got = layout.select(critic(**layout.model_inputs(critic)))
    want = critic(ids, attn, position_ids=position_ids_from_mask(attn))[:, start - 1:-1] * mask
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)  # values of size ~50


def test_long_groups_are_split_over_trees():
    """A prompt whose responses do not fit one row is split into several trees, each with the prompt."""
    model, tok = disable_dropout(make_gpt2()), make_tokenizer()
    engine = HFRolloutEngine(model, tok)
    batch = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=12, n=6, ignore_eos=True),
                            generator=torch.Generator().manual_seed(1))
    ids, attn, start = batch.input_ids, batch.attention_mask, batch.response_start
    layout = layout_responses(ids, attn, start, width=30)
    assert layout.input_ids.shape[1] <= 30 and layout.input_ids.shape[0] > 2  # > 1 tree per prompt
    with torch.no_grad():
        want, _ = naive_logprobs(model, ids, attn, start)
        got = sequence_logprobs(model, ids, attn, start, layout=layout)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_pack_trees_mask_isolates_branches_and_trees():
    packed = pack_trees([([5, 6], [[7, 8], [9]]), ([10], [[11, 12, 13]])], pad_token_id=0, width=9)
    ids, pos, mask = packed["input_ids"][0], packed["position_ids"][0], packed["attention_mask"][0, 0]
    assert ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]  # one row, the longest tree first
    assert pos.tolist() == [0, 1, 2, 3, 2, 0, 1, 2, 3]  # each branch continues its prompt
    # token 9 (second branch) sees its prompt and itself, not the first branch
    assert mask[4].nonzero()[:, 0].tolist() == [0, 1, 4]
    assert mask[5].nonzero()[:, 0].tolist() == [5]  # the second tree never sees the first
    assert packed["targets"].tolist() == [7, 8, 9, 11, 12, 13]
    assert packed["src_col"].tolist() == [1, 2, 1, 5, 6, 7]  # a branch's first token: from the last prompt token
    assert packed["tree"].tolist() == [0, 0, 0, 1, 1, 1] and packed["branch"].tolist() == [0, 0, 1, 0, 0, 0]
    assert packed["offset"].tolist() == [0, 1, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="empty prompt"):
        pack_trees([([], [[1]])], 0)


def test_greedy_rollout_equals_generate_token_for_token_with_groups():
    """Greedy decoding with n samples per prompt (prefilled once, rows dropped as they finish)
    gives exactly ``model.generate``'s tokens for the repeated prompts."""
    model, tok = make_gpt2(), make_tokenizer()
    hook = bias_eos(model, MODELS["gpt2"][2])
    try:
        batch = HFRolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=12, do_sample=False, n=2))
        out = model.generate(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, do_sample=False,
                             max_new_tokens=12, eos_token_id=EOS, pad_token_id=tok.pad_token_id)
    finally:
        hook.remove()
    assert batch.has_eos.any() and not batch.has_eos.all()
    assert torch.equal(out[:, batch.prompt_ids.shape[1]:], batch.response_ids)


def test_entropy_only_on_logged_steps(make_cfg):
    """The entropy diagnostic is computed on the first step, every log_every_n_steps, and the last."""
    from pipeline.modules.rl import OnlineRLModule

    cfg = make_cfg(["algorithm=ppo"])  # 4 epochs x 2 minibatches per rollout step
    model, tok = make_gpt2(), make_tokenizer()
    module = OnlineRLModule(model, tok, lambda p, c, r: torch.zeros(len(c)), cfg.algorithm, cfg.rl, ref_policy=model)
    module._trainer = SimpleNamespace(log_every_n_steps=10, max_steps=25 * 8)
    due = []
    for step in range(25):
        module.rollout_step = step
        if module._entropy_due():
            due.append(step + 1)
    assert due == [1, 10, 20, 25]


def test_decode_mask_only_for_plain_full_attention():
    """The engine builds the one-token decoding mask itself (same tokens as generate, above) only
    where that is the model's own mask: not with a sliding window, and not for custom modules."""
    model = make_gpt2()
    make = HFRolloutEngine._decode_mask(model)
    assert make is not None
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert make(mask).shape == (2, 1, 1, 3) and make(mask).dtype == torch.bool
    model.config.sliding_window = 4
    assert HFRolloutEngine._decode_mask(model) is None
    assert HFRolloutEngine._decode_mask(torch.nn.Linear(2, 2)) is None
