"""Tests of the rollout engine (pipeline/rollout) on tiny random-init GPT-2 and Llama models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pipeline.rollout import (
    HFRolloutEngine,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    sequence_logprobs,
)

VOCAB = 96
PAD, EOS, UNK, BOS = 0, 1, 2, 3

PROMPTS = [
    "the cat sat on the mat",
    "a dog",
    "one two three four five six seven eight nine",
    "red",
]


def make_tokenizer(bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    corpus = PROMPTS + ["the quick brown fox jumps over the lazy dog", "green blue red yellow sun moon star"]
    words = ["[PAD]", "[EOS]", "[UNK]", "[BOS]"]
    for sentence in corpus:
        for w in sentence.split():
            if w not in words:
                words.append(w)
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    assert len(words) == VOCAB
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]", bos_token="[BOS]"
    )


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=128,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    model = GPT2LMHeadModel(cfg)
    # random init gives near-uniform logits; sharpen them (the LM head is tied, so scale the final norm)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8.0)
    return model.eval()


def make_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    model = LlamaForCausalLM(cfg)
    # random init gives near-uniform logits; sharpen them so greedy/sampling paths differ meaningfully
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def bias_eos(model, bias: float):
    """Add ``bias`` logit standard deviations to the EOS logit of every forward pass.

    The hook sits on the LM head, so it affects ``model.generate``, the engine and ``sequence_logprobs`` alike.
    """

    def hook(_module, _inputs, output):
        output = output.clone()
        output[..., EOS] += bias * output.detach().std(-1)
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


# name -> (factory, tokenizer adds BOS, EOS bias giving a mix of stopped / running rows, bias stopping every row)
MODELS = {"gpt2": (make_gpt2, False, 2.5, 4.0), "llama": (make_llama, True, 1.0, 2.0)}


@pytest.fixture(params=sorted(MODELS))
def setup(request):
    make_model, bos, _, _ = MODELS[request.param]
    return make_model(), make_tokenizer(bos=bos)


def mild_bias(model) -> float:
    return MODELS[model.config.model_type][2]


def strong_bias(model) -> float:
    return MODELS[model.config.model_type][3]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_batch_invariants(batch: RolloutBatch, tok, n_prompts: int, n: int):
    N = n_prompts * n
    assert batch.prompt_ids.shape[0] == N and batch.response_ids.shape[0] == N
    assert batch.response_ids.shape == batch.response_mask.shape == batch.logprobs.shape
    assert len(batch.prompts) == len(batch.completions) == N
    assert batch.group_index.tolist() == [i for i in range(n_prompts) for _ in range(n)]
    # left padding: mask is 0...0 1...1
    pm = batch.prompt_mask
    assert bool((pm[:, 1:] >= pm[:, :-1]).all())
    assert bool((batch.prompt_ids[pm == 0] == tok.pad_token_id).all())
    # response: mask is 1...1 0...0, pad after, logprobs 0 outside, <= 0 inside
    rm = batch.response_mask
    assert bool((rm[:, 1:] <= rm[:, :-1]).all())
    assert bool((batch.response_ids[rm == 0] == tok.pad_token_id).all())
    assert bool((batch.logprobs[rm == 0] == 0).all())
    assert bool((batch.logprobs[rm == 1] <= 0).all())
    lengths = batch.response_lengths
    for i in range(N):
        L = int(lengths[i])
        if batch.has_eos[i]:
            assert L >= 1 and int(batch.response_ids[i, L - 1]) == tok.eos_token_id
            assert tok.eos_token_id not in batch.response_ids[i, : L - 1].tolist()
        else:
            assert L == batch.response_ids.shape[1]
            assert tok.eos_token_id not in batch.response_ids[i].tolist()


# --------------------------------------------------------------------------- #


def test_protocol_and_params():
    model, tok = make_gpt2(), make_tokenizer()
    engine = HFRolloutEngine(model, tok)
    assert isinstance(engine, RolloutEngine)
    engine.sync_weights()
    engine.load_weights(model)
    assert engine.model is model
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert SamplingParams(stop_token_ids=5).stop_token_ids == [5]
    assert SamplingParams().replace(n=3).n == 3


def test_greedy_matches_hf_generate(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    hook = bias_eos(model, mild_bias(model))  # some rows stop early, others do not
    try:
        batch = engine.generate(PROMPTS, params)
        out = model.generate(
            input_ids=batch.prompt_ids,
            attention_mask=batch.prompt_mask,
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    finally:
        hook.remove()
    ref = out[:, batch.prompt_ids.shape[1] :]
    assert ref.shape == batch.response_ids.shape
    assert torch.equal(ref, batch.response_ids)
    check_batch_invariants(batch, tok, len(PROMPTS), 1)
    assert batch.has_eos.any() and not batch.has_eos.all()  # rows stopped at different steps
    # prompt lengths differ, so the batch really is left-padded
    assert len(set(batch.prompt_mask.sum(1).tolist())) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_sequence_logprobs(setup, temperature):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    hook = bias_eos(model, mild_bias(model))
    try:
        params = SamplingParams(max_new_tokens=16, temperature=temperature, n=2)
        batch = engine.generate(PROMPTS, params, generator=gen(0))
        assert batch.has_eos.any() and (batch.response_lengths > 1).any()
        check_batch_invariants(batch, tok, len(PROMPTS), 2)
        lp, ent = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.response_start, temperature, return_entropy=True
        )
    finally:
        hook.remove()
    assert lp.shape == batch.logprobs.shape == ent.shape
    assert torch.allclose(lp, batch.logprobs, atol=1e-4, rtol=0), (lp - batch.logprobs).abs().max()
    assert bool((ent[batch.response_mask == 0] == 0).all())
    assert bool((ent[batch.response_mask == 1] > 0).all())


def test_training_forward_on_rollout_has_gradients(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    model.train()
    batch = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6), generator=gen(1))
    assert model.training  # restored after generation
    lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_start)
    (-(lp.sum())).backward()  # outputs of the engine are normal tensors, not inference tensors
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_groups_n_samples(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    batch = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=3), generator=gen(2))
    check_batch_invariants(batch, tok, len(PROMPTS), 3)
    for i in range(len(PROMPTS)):
        rows = (batch.group_index == i).nonzero(as_tuple=True)[0].tolist()
        assert rows == [3 * i, 3 * i + 1, 3 * i + 2]
        assert all(batch.prompts[r] == PROMPTS[i] for r in rows)
        assert all(torch.equal(batch.prompt_ids[r], batch.prompt_ids[rows[0]]) for r in rows)
    # samples within a group differ (random model, 8 tokens)
    assert len({tuple(batch.response_ids[r].tolist()) for r in range(3)}) > 1
    sub = batch.select([3, 4, 5])
    assert len(sub) == 3 and sub.prompts == [PROMPTS[1]] * 3 and sub.group_index.tolist() == [1, 1, 1]
    assert torch.equal(sub.response_ids, batch.response_ids[3:6])
    both = batch.select(batch.group_index == 0)
    assert len(both) == 3
    assert batch.to("cpu").response_ids.device.type == "cpu"
    assert batch.num_groups == len(PROMPTS)
    short = batch.select([2, 5]).trim()  # drops all-padding prompt columns and unused response columns
    assert short.prompt_mask.any(dim=0).all() and short.response_mask.any(dim=0).all()
    assert short.response_lengths.tolist() == batch.response_lengths[[2, 5]].tolist()


def test_eos_stops_and_masks(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    hook = bias_eos(model, strong_bias(model))
    try:
        batch = engine.generate(PROMPTS * 4, SamplingParams(max_new_tokens=20), generator=gen(3))
    finally:
        hook.remove()
    check_batch_invariants(batch, tok, len(PROMPTS) * 4, 1)
    assert batch.has_eos.all(), "with a strong EOS bias every row should stop within 20 tokens"
    assert batch.response_ids.shape[1] == int(batch.response_lengths.max())  # stopped early, no extra columns
    assert len(set(batch.response_lengths.tolist())) > 1
    # completions are decoded without EOS / pad
    for text, ids, L in zip(batch.completions, batch.response_ids, batch.response_lengths):
        assert "[EOS]" not in text and "[PAD]" not in text
        assert text == tok.decode(ids[: int(L) - 1].tolist())


def test_extra_stop_token(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, do_sample=False))
    stop = int(greedy.response_ids[0, 2])
    batch = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, do_sample=False, stop_token_ids=[stop]))
    first = greedy.response_ids[0].tolist().index(stop)
    assert bool(batch.has_eos[0])
    assert int(batch.response_lengths[0]) == first + 1
    assert batch.response_ids[0, : first + 1].tolist() == greedy.response_ids[0, : first + 1].tolist()
    assert bool((batch.response_ids[0, first + 1 :] == tok.pad_token_id).all())
    # ignore_eos and min_new_tokens
    long = engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=10, do_sample=False, stop_token_ids=[stop], ignore_eos=True)
    )
    assert long.response_ids.shape[1] == 10 and not long.has_eos.any() and bool((long.response_mask == 1).all())
    m = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_token_ids=[stop], min_new_tokens=10))
    assert bool((m.response_mask == 1).all())


def test_seeded_generation(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    params = SamplingParams(max_new_tokens=12, n=2, top_p=0.9, top_k=20)
    a = engine.generate(PROMPTS, params, generator=gen(123))
    b = engine.generate(PROMPTS, params, generator=gen(123))
    c = engine.generate(PROMPTS, params, generator=gen(124))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.completions == b.completions
    assert not (a.response_ids.shape == c.response_ids.shape and torch.equal(a.response_ids, c.response_ids))


def test_top_k_1_equals_greedy(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, do_sample=False))
    topk1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, top_k=1, temperature=1.3), generator=gen(5))
    assert torch.equal(greedy.response_ids, topk1.response_ids)
    tiny_p = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, top_p=1e-6), generator=gen(6))
    assert torch.equal(greedy.response_ids, tiny_p.response_ids)


def test_mixture_alpha_zero_equals_plain_sampling(setup):
    model, tok = setup
    ref = make_gpt2(seed=7) if model.config.model_type == "gpt2" else make_llama(seed=7)
    engine = HFRolloutEngine(model, tok)
    params = SamplingParams(max_new_tokens=10, n=2, temperature=0.8)
    plain = engine.generate(PROMPTS, params, generator=gen(11))
    mixed = engine.generate(PROMPTS, params, generator=gen(11), mixture_model=ref, mixture_alpha=0.0)
    assert torch.equal(plain.response_ids, mixed.response_ids)
    assert torch.allclose(plain.logprobs, mixed.logprobs)
    # alpha=1 samples from the reference, greedy: equals the reference's greedy decode; logprobs stay the policy's
    g = SamplingParams(max_new_tokens=10, do_sample=False)
    mix1 = engine.generate(PROMPTS, g, mixture_model=ref, mixture_alpha=1.0)
    ref_greedy = engine.with_model(ref).generate(PROMPTS, g)
    assert torch.equal(mix1.response_ids, ref_greedy.response_ids)
    lp = sequence_logprobs(model, mix1.input_ids, mix1.attention_mask, mix1.response_start)
    assert torch.allclose(lp, mix1.logprobs, atol=1e-4, rtol=0)
    # an intermediate alpha runs and stays consistent
    half = engine.generate(PROMPTS, params, generator=gen(12), mixture_model=ref, mixture_alpha=0.5)
    check_batch_invariants(half, tok, len(PROMPTS), 2)


def test_generate_ids_and_truncation():
    model, tok = make_gpt2(), make_tokenizer()
    engine = HFRolloutEngine(model, tok, max_prompt_length=3)
    ids, mask = engine.encode_prompts(PROMPTS)
    assert ids.shape == (len(PROMPTS), 3)
    assert tok.decode(ids[2].tolist()) == "seven eight nine"  # left truncation keeps the end
    batch = engine.generate_ids(ids, mask, SamplingParams(max_new_tokens=4, do_sample=False))
    assert batch.prompts[2] == "seven eight nine"
    with pytest.raises(ValueError, match="left-padded"):
        engine.generate_ids(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), SamplingParams())


def test_dropping_finished_rows_changes_nothing(setup):
    model, tok = setup
    engine = HFRolloutEngine(model, tok)
    hook = bias_eos(model, mild_bias(model))
    try:
        params = SamplingParams(max_new_tokens=12, do_sample=False, n=2)
        compacted = engine.generate(PROMPTS * 2, params)
        engine.compact_fraction = float("inf")  # never drop finished rows
        full = engine.generate(PROMPTS * 2, params)
    finally:
        hook.remove()
    assert compacted.has_eos.any() and not compacted.has_eos.all()
    assert torch.equal(compacted.response_ids, full.response_ids)
    assert torch.equal(compacted.response_mask, full.response_mask)
    assert torch.allclose(compacted.logprobs, full.logprobs, atol=1e-5, rtol=0)


def test_inverse_cdf_sampler_distribution():
    from pipeline.rollout.engine import _sample

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    draws = _sample(probs.expand(20000, -1).contiguous(), gen(0))
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs, atol=0.015)
    # unnormalised rows work too (filtered distributions are renormalised implicitly)
    draws = _sample((probs * 3).expand(5000, -1).contiguous(), gen(1))
    assert set(draws.tolist()) <= {1, 3, 4}
