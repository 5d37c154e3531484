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
* Pairs for the DPO family (``tokenize_preferences``, ``PreferenceCollator``): prompt and
  responses kept apart (tokenized as for SFT), each pair packed as ``prompt | chosen |
  rejected`` with a tree attention mask (several pairs per row), so one forward pass scores
  both responses, the prompt is computed once and only response tokens are scored.
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
from pipeline.models.packing import pack_trees

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
LONG_PROMPT_FIX = "raise model.max_length or shorten prompts"
#: what to do with a prompt longer than the model's budget (``<section>.data.on_long_prompt``)
ON_LONG_PROMPT = ("error", "drop", "truncate_left")


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


def check_on_long_prompt(mode: str, key: str = "data.on_long_prompt") -> None:
    if mode not in ON_LONG_PROMPT:
        from pipeline.errors import ConfigError

        raise ConfigError(f"unknown value {mode!r}; choose one of {', '.join(ON_LONG_PROMPT)}", where=key)


def fit_prompts(prompt_ids: list[list[int]], limit: int, budget: str, where: str, on_long_prompt: str,
                sources: Sequence[str | None] | None = None, prefix: Sequence[int] = ()) -> tuple[list, set[int]]:
    """Apply ``on_long_prompt`` to prompts over ``limit`` tokens: ``(prompt_ids, dropped indices)``.

    ``error``: a DataError naming the first long prompt (``sources[i]`` = its ``file:LINE``
    when known) and how many there are; ``drop``: their indices are returned (with a warning);
    ``truncate_left``: they keep their last tokens (after the tokenizer's BOS ``prefix``).
    ``where`` is the data section's config key (``sft.data``...), named in the fix.
    """
    check_on_long_prompt(on_long_prompt, f"{where}.on_long_prompt")
    bad = [i for i, p in enumerate(prompt_ids) if len(p) > limit]
    if not bad:
        return prompt_ids, set()
    if on_long_prompt == "error":
        i = bad[0]
        source = sources[i] if sources else None
        key = f"{where}.on_long_prompt" if "." in where else "on_long_prompt"
        raise DataError(f"{'' if source else f'example {i}: '}the prompt is {len(prompt_ids[i])} tokens, but {budget} "
                        f"leaves room for at most {limit} prompt tokens ({len(bad)} of {len(prompt_ids)} prompts are "
                        "too long)", where=source or where,
                        fix=f"{LONG_PROMPT_FIX}, or set {key}=drop (skip them) or {key}=truncate_left (keep their end)")
    if on_long_prompt == "drop":
        log.warning("%s: dropped %d of %d examples whose prompt exceeds %d tokens (%s)",
                    where, len(bad), len(prompt_ids), limit, budget)
        return prompt_ids, set(bad)
    keep = max(limit - len(prefix), 0)
    out = list(prompt_ids)
    for i in bad:
        p = out[i]
        has_prefix = bool(prefix) and p[:len(prefix)] == list(prefix)
        out[i] = (list(prefix) if has_prefix else []) + p[len(p) - keep:] if keep else p[:limit]
    log.warning("%s: cut %d of %d prompts longer than %d tokens to their last tokens (%s)",
                where, len(bad), len(prompt_ids), limit, budget)
    return out, set()


def fit_prompt_rows(rows: list[dict], tokenizer, context: int, max_new_tokens: int, where: str,
                    on_long_prompt: str, new_tokens_key: str = "algorithm.max_new_tokens") -> tuple[list[dict], int | None]:
    """Prompt rows (``load_prompt_rows``) checked against a sampling budget before the first rollout:
    ``on_long_prompt`` errors (naming ``file:LINE``), drops, or marks for left truncation the prompts
    that leave no room for ``max_new_tokens`` in the model's ``context``. Returns the rows and the
    prompt-token limit the rollout engine should cut to (None: no truncation)."""
    from pipeline.data.formats import SOURCE
    from pipeline.errors import ConfigError

    limit = context - max_new_tokens
    if limit < 1:
        raise ConfigError(f"{new_tokens_key}={max_new_tokens} leaves no room for a prompt in the model's context "
                          f"of {context} tokens", where=new_tokens_key)
    ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    _, dropped = fit_prompts(ids, limit, f"the model's context ({context}) minus {new_tokens_key} ({max_new_tokens})",
                             where, on_long_prompt, [r.get(SOURCE) for r in rows])
    rows = [r for i, r in enumerate(rows) if i not in dropped]
    if not rows:
        raise DataError("no prompts left after dropping the ones that are too long", where=where)
    return rows, limit if on_long_prompt == "truncate_left" else None


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
def _completion(ids: list[int], eos: int, room: int) -> list[int]:
    """Completion ids ending in EOS (added unless present), cut from the right to ``room``
    tokens: a truncated completion loses its EOS (the model should not learn to stop mid-answer)."""
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    return ids[:room]


def tokenize_sft(examples: Sequence[SFTExample], tokenizer, max_length: int, completion_only: bool = True,
                 where: str = "sft.data", on_long_prompt: str = "error") -> list[dict]:
    """``[{"input_ids": [...], "labels": [...], "index": i}]`` (``index``: the example's position);
    prompts of >= ``max_length`` tokens error, are dropped or cut from the left (``on_long_prompt``)."""
    enc = _Encoder(tokenizer, where)
    prompts = enc.prompts([e.prompt for e in examples])
    completions = enc.encode([e.completion for e in examples])
    prompts, drop = fit_prompts(prompts, max_length - 1, f"model.max_length={max_length}", where, on_long_prompt,
                                [getattr(e, "where", None) for e in examples], enc.prefix)
    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if i in drop:
            continue
        c = _completion(c, enc.eos, max_length - len(p))
        labels = ([IGNORE_INDEX] * len(p) if completion_only else list(p)) + c
        rows.append({"input_ids": p + c, "labels": labels, "index": i})
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
    check_on_long_prompt(on_long_prompt, f"{where}.on_long_prompt")
    if _uses_pair_encoding(tokenizer):
        enc = tokenizer(list(prompts), list(responses), truncation=True, max_length=max_length)["input_ids"]
        return [list(x) for x in enc], 0
    enc = _Encoder(tokenizer, where)
    p_ids = enc.prompts(list(prompts))
    r_ids = enc.encode(list(responses))
    p_ids, drop = fit_prompts(p_ids, max_length - 2, f"model.max_length={max_length}", where, on_long_prompt, sources,
                              enc.prefix)
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
    longer than ``max_length - 4`` tokens errors, gives ``None`` for that row (``drop``) or keeps
    its last tokens (``truncate_left``).
    """
    enc = _Encoder(tokenizer, where)
    p_ids = enc.prompts(list(prompts))
    a_ids, b_ids = enc.encode(list(a)), enc.encode(list(b))
    p_ids, drop = fit_prompts(p_ids, max_length - 4, f"max_length={max_length} (prompt + two responses)", where,
                              on_long_prompt, sources, enc.prefix)
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


# ----------------------------------------------------------------------------- pairs with the prompt boundary (DPO)
def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer, max_length: int, where: str = "dpo.data",
                         on_long_prompt: str = "error") -> list[dict]:
    """``[{"prompt_ids", "chosen_ids", "rejected_ids", "margin", "index"}]`` for losses on the policy's
    likelihood of each response (the DPO family).

    Unlike :func:`tokenize_pairs` (what a reward model reads), the prompt and the responses stay
    apart, tokenized the way :func:`tokenize_sft` tokenizes prompt and completion (the prompt with
    the tokenizer's own BOS, if it adds one; each response + EOS, cut from the right so prompt +
    response fits ``max_length``), so only response tokens are scored. A prompt that leaves no room
    for a response token errors, is dropped or cut from the left (``on_long_prompt``); an empty prompt is an error (the first
    response token would be predicted from nothing). ``margin`` is the pair's margin or None.
    """
    enc = _Encoder(tokenizer, where)
    sources = [getattr(e, "where", None) for e in examples]
    prompts = enc.prompts([e.prompt for e in examples])
    chosen = enc.encode([e.chosen for e in examples])
    rejected = enc.encode([e.rejected for e in examples])
    prompts, drop = fit_prompts(prompts, max_length - 1, f"model.max_length={max_length}", where, on_long_prompt,
                                sources, enc.prefix)
    rows, same = [], 0
    for i, (e, p) in enumerate(zip(examples, prompts)):
        if i in drop:
            continue
        if not p:
            raise DataError(f"{f'{where}: ' if sources[i] else f'example {i}: '}the prompt is empty, so the first "
                            "response token has nothing to be predicted from", where=sources[i] or where,
                            fix="give every pair a prompt (implicit-prompt data: chosen and rejected must share "
                                "a prefix), or use a tokenizer that adds a BOS token")
        room = max_length - len(p)
        c, r = _completion(chosen[i], enc.eos, room), _completion(rejected[i], enc.eos, room)
        same += c == r
        rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "index": i,
                     "margin": None if e.margin is None else float(e.margin)})
    if same:
        log.warning("%s: %d of %d pairs have identical chosen/rejected tokens after truncation to %d",
                    where, same, len(rows), max_length)
    return rows


class PreferenceCollator:
    """B pairs as packed rows, so ONE forward pass scores both responses of every pair with no
    padding to speak of and each prompt computed once.

    Each pair is laid out as ``prompt | chosen | rejected`` with a tree attention mask: prompt
    tokens attend causally to the prompt; chosen tokens to the prompt and the chosen tokens before
    them; rejected tokens to the prompt and the rejected tokens before them (never to the chosen
    ones). Position ids restart the responses where the prompt ends, so every token sees exactly
    what it would see in its own ``prompt + response`` sequence: the log-probs are those of two
    separate sequences, up to float rounding. Pairs are packed first-fit (longest first) into rows
    of ``row_length`` tokens (the model's ``max_length``, as SFT packing does), or of the batch's
    longest pair when that is longer; pairs in one row never attend to each other.

    Returns ``input_ids``, ``position_ids`` [rows, L], ``attention_mask`` [rows, 1, L, L] (bool,
    True = may attend; every position attends at least to itself), and for the T response tokens
    of the batch: ``src_row``, ``src_col`` (the position whose output predicts the token: the last
    prompt token for a response's first token), ``targets`` (the token ids) and ``seq_index``
    (0..2B-1: pair i's chosen response is i, its rejected one B + i); ``lengths`` [2B] (response
    tokens, chosen then rejected), ``margin`` [B] (0 where a pair has none), ``index`` [B], and
    ``ref_logps`` [2B] when the rows carry precomputed reference log-probs (``ref_chosen`` /
    ``ref_rejected``).
    """

    def __init__(self, pad_token_id: int, row_length: int = 0):
        self.pad_token_id = _require_pad(pad_token_id)
        self.row_length = row_length

    def __call__(self, features: list[dict]) -> dict:
        b = len(features)
        packed = pack_trees([(f["prompt_ids"], (f["chosen_ids"], f["rejected_ids"])) for f in features],
                            self.pad_token_id, self.row_length)
        batch = {
            **{k: packed[k] for k in ("input_ids", "position_ids", "attention_mask", "src_row", "src_col",
                                      "targets")},
            "seq_index": packed["tree"] + b * packed["branch"],
            "lengths": torch.tensor([len(f["chosen_ids"]) for f in features]
                                    + [len(f["rejected_ids"]) for f in features], dtype=torch.long),
            "margin": torch.tensor([f.get("margin") or 0.0 for f in features], dtype=torch.float),
            "index": torch.tensor([f.get("index", i) for i, f in enumerate(features)], dtype=torch.long),
        }
        if "ref_chosen" in features[0]:
            batch["ref_logps"] = torch.tensor([f["ref_chosen"] for f in features]
                                              + [f["ref_rejected"] for f in features], dtype=torch.float)
        return batch
