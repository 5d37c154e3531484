"""Tokenize examples and collate them into padded batches.

* SFT: ``prompt_ids + completion_ids + [eos]``. Prompt and completion are tokenized
  separately and the ids concatenated, so with ``completion_only`` exactly the prompt
  tokens get label -100. A BOS is prepended only if the tokenizer itself adds one (and
  the prompt text -- e.g. a rendered chat template -- does not already start with it);
  EOS is appended unless the completion already ends with it. Too-long sequences are cut
  from the right inside the completion: a truncated completion loses its EOS (the model
  should not learn to stop mid-answer).
* Pairs: ``prompt + response`` truncated from the right to ``max_length - 1`` tokens, then
  EOS -- the EOS is always kept, so a reward head reading the last non-pad token always
  reads an EOS position (encoders use their own pair encoding).
* Batches are right-padded (``SFTCollator``, ``PairCollator``); prompts for generation
  are tokenized and left-padded by the rollout engine (``HFRolloutEngine.encode_prompts``).
  Attention masks come from the lengths, not
  from comparing ids with the pad id, so pad == eos is safe here. (Hugging Face
  ``*ForSequenceClassification`` heads, however, locate the last token by
  ``input_ids != pad_token_id``: use a pad token distinct from EOS with them.)
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from pipeline.data.records import PreferenceExample, SFTExample
from pipeline.errors import DataError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
LONG_PROMPT_FIX = "raise model.max_length or shorten prompts"
ON_LONG_PROMPT = ("error", "drop")


class _Encoder:
    """Batch encoding without special tokens, plus the tokenizer's own BOS prefix if any."""

    def __init__(self, tokenizer, where: str):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no EOS token", where=where,
                            fix="use a tokenizer with an eos_token (it marks the end of completions)")
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix: list[int] = []
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start:start + len(plain)] == plain:
                self.prefix = list(with_special[:start])
                break

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        p = self.prefix
        return [ids if not p or ids[:len(p)] == p else p + ids for ids in self.encode(texts)]


def _check_mode(on_long_prompt: str) -> None:
    if on_long_prompt not in ON_LONG_PROMPT:
        raise ValueError(f"on_long_prompt must be one of {ON_LONG_PROMPT}, got {on_long_prompt!r}")


def _long_prompts(prompt_ids, limit: int, budget: str, where: str, on_long_prompt: str,
                  sources: Sequence[str | None] | None = None) -> set[int]:
    """Indices of prompts over ``limit`` tokens: DataError for the first, or dropped with a warning.

    ``sources[i]`` (``file:LINE`` of a user's row) is named in the error when known.
    """
    bad = [i for i, p in enumerate(prompt_ids) if len(p) > limit]
    if bad and on_long_prompt == "error":
        i = bad[0]
        key = f"{where.split('.')[0]}.on_long_prompt" if where.startswith("sft.") else "on_long_prompt"
        drop = f" (or drop such rows: {key}=drop)" if budget.startswith("model.") else ""
        source = sources[i] if sources else None
        raise DataError(f"{f'{where}: ' if source else f'example {i}: '}the prompt is {len(prompt_ids[i])} tokens, "
                        f"but {budget} leaves room for at most {limit} prompt tokens "
                        f"({len(bad)} of {len(prompt_ids)} prompts are too long)",
                        where=source or where, fix=LONG_PROMPT_FIX + drop)
    if bad:
        log.warning("%s: dropped %d of %d examples whose prompt exceeds %d tokens (%s)",
                    where, len(bad), len(prompt_ids), limit, budget)
    return set(bad)


# ----------------------------------------------------------------------------- shuffling
def _rebuild_generator(state: bytes) -> "SeededGenerator":
    g = SeededGenerator()
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return g


class SeededGenerator(torch.Generator):
    """A CPU ``torch.Generator`` that pickles by value (its state as bytes).

    DataLoaders are pickled into the worker processes of ``strategy=ddp_spawn``; a plain
    Generator pickles its state as a temporary shared-memory tensor, which fails to
    unpickle there ("unable to resize file ... Invalid argument"). Same random stream.
    """

    def __reduce__(self):
        return (_rebuild_generator, (bytes(self.get_state().numpy()),))


def seeded_generator(seed: int) -> SeededGenerator:
    g = SeededGenerator()
    g.manual_seed(int(seed))
    return g


# ----------------------------------------------------------------------------- SFT
def tokenize_sft(examples: Sequence[SFTExample], tokenizer, max_length: int, completion_only: bool = True,
                 where: str = "sft.data", on_long_prompt: str = "error") -> list[dict]:
    """``[{"input_ids": [...], "labels": [...]}]``; prompts of >= ``max_length`` tokens error or are dropped."""
    _check_mode(on_long_prompt)
    enc = _Encoder(tokenizer, where)
    prompts = enc.prompts([e.prompt for e in examples])
    completions = enc.encode([e.completion for e in examples])
    drop = _long_prompts(prompts, max_length - 1, f"model.max_length={max_length}", where, on_long_prompt,
                         [getattr(e, "where", None) for e in examples])
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if i in drop:
            continue
        if not c or c[-1] != enc.eos:
            c = c + [enc.eos]
        c = c[: max_length - len(p)]
        labels = ([IGNORE_INDEX] * len(p) if completion_only else list(p)) + c
        rows.append({"input_ids": p + c, "labels": labels})
    return rows


def _pad_right(seqs: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _mask_right(seqs: list[list[int]], length: int | None = None) -> torch.Tensor:
    length = length or max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs])
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def _require_pad(pad_token_id) -> int:
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer a pad token (or use its eos token)")
    return int(pad_token_id)


class SFTCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); adds ``attention_mask``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = _require_pad(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": _pad_right(ids, self.pad_token_id),
            "labels": _pad_right([f["labels"] for f in features], IGNORE_INDEX),
            "attention_mask": _mask_right(ids),
        }


# ----------------------------------------------------------------------------- preference pairs
def _uses_pair_encoding(tokenizer) -> bool:
    """Encoders (BERT-style, with a CLS token) read ``[CLS] prompt [SEP] response [SEP]``."""
    return getattr(tokenizer, "cls_token_id", None) is not None


def tokenize_responses(prompts: Sequence[str], responses: Sequence[str], tokenizer, max_length: int,
                       where: str = "reward.data", on_long_prompt: str = "error",
                       sources: Sequence[str | None] | None = None) -> tuple[list[list[int] | None], int]:
    """Token ids a reward model reads for each (prompt, response): ``(ids, n_dropped)``.

    Causal backbones: ``(prompt + response)[:max_length - 1] + [eos]`` (the head reads
    the EOS position). Encoders: the tokenizer's pair encoding, truncated to max_length.
    A prompt longer than ``max_length - 2`` tokens errors or (``drop``) gives ``None``.
    Training pairs and scoring at RL time both go through here, so they always agree.
    """
    _check_mode(on_long_prompt)
    if _uses_pair_encoding(tokenizer):
        enc = tokenizer(list(prompts), list(responses), truncation=True, max_length=max_length)["input_ids"]
        return [list(x) for x in enc], 0
    enc = _Encoder(tokenizer, where)
    p_ids = enc.prompts(list(prompts))
    r_ids = enc.encode(list(responses))
    drop = _long_prompts(p_ids, max_length - 2, f"model.max_length={max_length}", where, on_long_prompt, sources)
    out: list[list[int] | None] = []
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        if i in drop:
            out.append(None)
            continue
        if r and r[-1] == enc.eos:
            r = r[:-1]
        out.append((p + r)[: max_length - 1] + [enc.eos])
    return out, len(drop)


def tokenize_pairs(examples: Sequence[PreferenceExample], tokenizer, max_length: int, where: str = "reward.data",
                   on_long_prompt: str = "error") -> list[dict]:
    """``[{"chosen_input_ids", "rejected_input_ids", "margin", "subset", "index"}]`` (see
    :func:`tokenize_responses`); ``index`` is the example's position (bootstrap weights)."""
    sources = [getattr(e, "where", None) for e in examples]
    prompts = [e.prompt for e in examples]
    chosen, _ = tokenize_responses(prompts, [e.chosen for e in examples], tokenizer, max_length, where,
                                   on_long_prompt, sources)
    rejected, _ = tokenize_responses(prompts, [e.rejected for e in examples], tokenizer, max_length, where,
                                     on_long_prompt, sources)
    rows, same = [], 0
    for i, e in enumerate(examples):
        c, r = chosen[i], rejected[i]
        if c is None or r is None:
            continue
        same += c == r
        rows.append({"chosen_input_ids": c, "rejected_input_ids": r, "index": i,
                     "margin": 0.0 if e.margin is None else float(e.margin), "subset": e.subset})
    if same:
        log.warning("%s: %d of %d pairs have identical chosen/rejected tokens after truncation to %d",
                    where, same, len(rows), max_length)
    return rows


def tokenize_comparisons(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], tokenizer, max_length: int,
                         where: str = "preference_model.data", on_long_prompt: str = "error",
                         sources: Sequence[str | None] | None = None) -> tuple[list[list[int] | None], list[list[int] | None]]:
    """Token ids a pairwise preference model reads for (prompt, a, b), in both orders:
    ``prompt + a' + [eos] + b' + [eos]`` and ``prompt + b' + [eos] + a' + [eos]``.

    Both responses are cut to the same budget ``(max_length - len(prompt) - 2) // 2`` tokens
    (a' and b'), so the two orders hold exactly the same tokens. Causal backbones only. A prompt
    longer than ``max_length - 4`` tokens errors or (``drop``) gives ``None`` for that row.
    """
    _check_mode(on_long_prompt)
    enc = _Encoder(tokenizer, where)
    p_ids = enc.prompts(list(prompts))
    a_ids, b_ids = enc.encode(list(a)), enc.encode(list(b))
    drop = _long_prompts(p_ids, max_length - 4, f"max_length={max_length} (prompt + two responses)", where,
                         on_long_prompt, sources)
    ab: list[list[int] | None] = []
    ba: list[list[int] | None] = []
    for i, (p, x, y) in enumerate(zip(p_ids, a_ids, b_ids)):
        if i in drop:
            ab.append(None)
            ba.append(None)
            continue
        budget = (max_length - len(p) - 2) // 2
        x = (x[:-1] if x and x[-1] == enc.eos else x)[:budget]
        y = (y[:-1] if y and y[-1] == enc.eos else y)[:budget]
        ab.append(p + x + [enc.eos] + y + [enc.eos])
        ba.append(p + y + [enc.eos] + x + [enc.eos])
    return ab, ba


class PairCollator:
    """Right-pads chosen and rejected to one common length (so they can share a forward pass).

    Returns ``chosen_input_ids``, ``chosen_attention_mask``, ``rejected_input_ids``,
    ``rejected_attention_mask``, ``margin`` (float), ``index`` (long, if present)
    and ``subset`` (list of str).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = _require_pad(pad_token_id)

    def __call__(self, features: list[dict]) -> dict:
        chosen = [f["chosen_input_ids"] for f in features]
        rejected = [f["rejected_input_ids"] for f in features]
        n = max(len(s) for s in chosen + rejected)
        batch = {
            "chosen_input_ids": _pad_right(chosen, self.pad_token_id, n),
            "chosen_attention_mask": _mask_right(chosen, n),
            "rejected_input_ids": _pad_right(rejected, self.pad_token_id, n),
            "rejected_attention_mask": _mask_right(rejected, n),
            "margin": torch.tensor([float(f.get("margin", 0.0)) for f in features], dtype=torch.float),
            "subset": [f.get("subset", "default") for f in features],
        }
        if all("index" in f for f in features):
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return batch
