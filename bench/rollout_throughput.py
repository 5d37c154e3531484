"""Rollout throughput: HFRolloutEngine vs raw ``model.generate``.

Builds a small random-init GPT-2 (default ≈2.9M parameters, vocab 1024), then
samples the same left-padded batch with the engine and with
``model.generate(..., use_cache=True)``, no EOS stopping on either side, and
prints tokens/s for both and the ratio engine / generate (> 1 = engine faster).
The engine also returns per-token log-probs and decoded text; that work is
included in its time.

    python bench/rollout_throughput.py                      # 32 prompts x 32 new tokens, sampling
    python bench/rollout_throughput.py --greedy --batch 64 --new-tokens 64 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def build(args):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    cfg = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        vocab_size=args.vocab,
        n_positions=args.prompt_len + args.new_tokens,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).to(args.device).eval()
    if args.dtype != "float32":
        model = model.to(getattr(torch, args.dtype))
    words = ["[PAD]", "[EOS]"] + [f"t{i}" for i in range(2, args.vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")
    return model, tokenizer


def make_prompts(args):
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = torch.randint(max(1, args.prompt_len // 2), args.prompt_len + 1, (args.batch,), generator=g)
    ids = torch.zeros(args.batch, args.prompt_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, args.prompt_len - n :] = torch.randint(2, args.vocab, (n,), generator=g)
        mask[i, args.prompt_len - n :] = 1
    return ids.to(args.device), mask.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32, help="prompts per batch")
    p.add_argument("--prompt-len", type=int, default=16, help="max prompt length (lengths vary in [len/2, len])")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.rollout import HFRolloutEngine, SamplingParams

    model, tokenizer = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    ids, mask = make_prompts(args)
    engine = HFRolloutEngine(model, tokenizer)
    params = SamplingParams(
        max_new_tokens=args.new_tokens,
        temperature=args.temperature,
        do_sample=not args.greedy,
        ignore_eos=True,
    )
    gen_kwargs = dict(
        max_new_tokens=args.new_tokens,
        do_sample=not args.greedy,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    if not args.greedy:
        gen_kwargs.update(temperature=args.temperature, top_k=0, top_p=1.0)
    model.generation_config.eos_token_id = None

    def run_engine():
        batch = engine.generate_ids(ids, mask, params, prompts=[""] * args.batch)
        sync(args.device)
        assert batch.response_ids.shape == (args.batch, args.new_tokens)

    def run_generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        sync(args.device)
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens)

    runners = {"engine": run_engine, "generate": run_generate}
    for _ in range(args.warmup):
        for fn in runners.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):  # interleave so drifts in machine load hit both
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.new_tokens
    print(
        f"GPT-2 {n_params / 1e6:.2f}M params (n_layer={args.n_layer}, n_embd={args.n_embd}, vocab={args.vocab}), "
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}, "
        f"{args.batch} prompts x {args.new_tokens} new tokens, {'greedy' if args.greedy else 'sampling'}, "
        f"{args.repeats} repeats"
    )
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens / med
        print(f"  {name:9s} median {med * 1e3:8.1f} ms  (min {min(ts) * 1e3:8.1f})  {tps[name]:10.0f} tokens/s")
    print(f"  ratio engine/generate (tokens/s): {tps['engine'] / tps['generate']:.3f}")


if __name__ == "__main__":
    main()
