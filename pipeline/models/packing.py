"""Packed batches and the log-probs of their tokens: one forward pass, no padding to speak of.

Both the offline preference losses (DPO: ``prompt | chosen | rejected``) and online RL (a
prompt and its G sampled responses) score several responses that continue one prompt. A
**tree** is such a prompt with its branches; :func:`pack_trees` lays trees out first-fit
into rows under a tree attention mask (a branch token attends to its prompt and to the
earlier tokens of its own branch, never to a sibling branch or another tree; position ids
restart each branch where the prompt ends), so every token sees exactly what it would see
in its own ``prompt + branch`` sequence, the prompt is computed once per tree, and rows
carry almost no padding.

:func:`token_logprobs` runs the model once and the LM head only on the positions that
predict a scored token (``causal_lm_parts``), in chunks of at most ``LOGITS_CHUNK_ELEMENTS``
logits, recomputed in the backward pass when there is more than one chunk (so the
``[tokens, vocab]`` logits never exist at once for a large vocabulary). The log-prob of a
token is ``log_softmax(logits / T)[token]``: on CPU the fused ``log_softmax`` kernel is 2-6x
faster than ``gather - logsumexp`` (which decomposes into max / exp / sum / log passes over
the same ``[tokens, vocab]`` block) and holds no more memory per chunk.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeline.models.policy import causal_lm_parts

#: logits per chunk of :func:`token_logprobs` (2**24 float32 = 64 MiB): one chunk for small
#: vocabularies, e.g. 128 tokens per chunk for a 128k vocabulary
LOGITS_CHUNK_ELEMENTS = 1 << 24

#: attention implementations that cannot take an arbitrary [rows, 1, W, W] mask
_UNMASKABLE = ("flash", "paged")


def pack_trees(trees: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_token_id: int,
               width: int = 0) -> dict[str, Tensor]:
    """Lay out ``trees`` = ``[(prompt_ids, [branch_ids, ...]), ...]`` in packed rows.

    Trees are placed first-fit, longest first (ties in input order), into rows of ``width``
    tokens, or of the longest tree when that is longer; trees in one row never attend to each
    other. Every prompt needs at least one token (its last one predicts each branch's first).

    Returns ``input_ids``, ``position_ids`` ``[rows, W]``, ``attention_mask`` ``[rows, 1, W, W]``
    (bool, True = may attend; padding attends to itself only) and, for each branch token (the
    scored tokens, row by row): ``src_row``, ``src_col`` (the position whose output predicts
    it), ``targets`` (its id), ``tree``, ``branch`` (indices into ``trees`` and its branches)
    and ``offset`` (its index within the branch).
    """
    sizes = [len(p) + sum(len(b) for b in branches) for p, branches in trees]
    for t, (prompt, _) in enumerate(trees):
        if not len(prompt):
            raise ValueError(f"pack_trees: tree {t} has an empty prompt (its first branch token has no predictor)")
    width = max(max(sizes, default=1), width, 1)
    rows: list[list[int]] = []
    free: list[int] = []
    for t in sorted(range(len(trees)), key=lambda t: (-sizes[t], t)):  # first-fit decreasing, deterministic
        for r, room in enumerate(free):
            if sizes[t] <= room:
                rows[r].append(t)
                free[r] -= sizes[t]
                break
        else:
            rows.append([t])
            free.append(width - sizes[t])
    ids = [[pad_token_id] * width for _ in rows]
    pos = [[0] * width for _ in rows]
    seg = [[0] * width for _ in rows]  # 1.. per tree in the row, 0 = padding
    branch_of = [[-1] * width for _ in rows]  # 0 prompt, 1.. branch
    src_row: list[int] = []
    src_col: list[int] = []
    targets: list[int] = []
    tree_idx: list[int] = []
    branch_idx: list[int] = []
    offset: list[int] = []
    for r, members in enumerate(rows):
        col = 0
        for k, t in enumerate(members):
            prompt, branches = trees[t]
            n_p = len(prompt)
            ids[r][col:col + n_p] = prompt
            pos[r][col:col + n_p] = range(n_p)
            seg[r][col:col + n_p] = [k + 1] * n_p
            branch_of[r][col:col + n_p] = [0] * n_p
            last_prompt = col + n_p - 1
            start = col + n_p
            for j, resp in enumerate(branches):
                n = len(resp)
                if not n:
                    continue
                ids[r][start:start + n] = resp
                pos[r][start:start + n] = range(n_p, n_p + n)
                seg[r][start:start + n] = [k + 1] * n
                branch_of[r][start:start + n] = [j + 1] * n
                src_row.extend([r] * n)
                src_col.append(last_prompt)
                src_col.extend(range(start, start + n - 1))
                targets.extend(resp)
                tree_idx.extend([t] * n)
                branch_idx.extend([j] * n)
                offset.extend(range(n))
                start += n
            col = start
    seg_t, branch_t = torch.tensor(seg), torch.tensor(branch_of)
    same_tree = (seg_t[:, :, None] == seg_t[:, None, :]) & (seg_t[:, None, :] > 0)
    visible = (branch_t[:, None, :] == 0) | (branch_t[:, None, :] == branch_t[:, :, None])
    mask = same_tree & visible & torch.ones(width, width, dtype=torch.bool).tril()
    mask |= torch.eye(width, dtype=torch.bool)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {
        "input_ids": as_long(ids), "position_ids": as_long(pos), "attention_mask": mask[:, None],
        "src_row": as_long(src_row), "src_col": as_long(src_col), "targets": as_long(targets),
        "tree": as_long(tree_idx), "branch": as_long(branch_idx), "offset": as_long(offset),
    }


def _config(model: Any):
    for m in (model, getattr(model, "backbone", None)):  # the PPO critic keeps its transformer as .backbone
        cfg = getattr(m, "config", None)
        if cfg is not None:
            return cfg
    return None


def attention_impl(model: Any) -> str:
    cfg = _config(model)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def accepts_packed(model: Any) -> bool:
    """Can ``model`` run a packed batch? A Hugging Face model (or the PPO critic around one) whose
    attention takes a [rows, 1, W, W] mask (eager, sdpa) and whose forward takes position ids.
    Anything else (custom modules, flash / paged attention) gets the padded batch."""
    if _config(model) is None or attention_impl(model).startswith(_UNMASKABLE):
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def attention_mask_for(model: Any, mask: Tensor) -> Tensor:
    """A packed batch's ``[rows, 1, W, W]`` bool mask in the form ``model`` takes: bool for sdpa,
    an additive float mask otherwise (eager); flash / paged attention cannot take one."""
    impl = attention_impl(model)
    if impl.startswith(_UNMASKABLE):
        raise ValueError(f"attn_implementation={impl!r} cannot apply a packed batch's attention mask; "
                         "load the model with 'sdpa' or 'eager' attention")
    if "sdpa" in impl:
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _head_logprobs(head, hidden: Tensor, targets: Tensor, temperature: float, entropy: bool, entropy_grad: bool):
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return _logits_logprobs(logits, targets, entropy, entropy_grad)


def _logits_logprobs(logits: Tensor, targets: Tensor, entropy: bool, entropy_grad: bool):
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return logp, None
    # entropy is a diagnostic: no graph over [tokens, vocab] unless asked for (an entropy bonus)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def token_logprobs(model: Any, inputs: dict, src_row: Tensor, src_col: Tensor, targets: Tensor,
                   temperature: float = 1.0, return_entropy: bool = False,
                   entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(logp [T], entropy [T] or None)``: log-prob of ``targets[i]`` under the distribution the
    model predicts at ``(src_row[i], src_col[i])`` of one forward pass over ``inputs``
    (``log_softmax(logits / temperature)``, float32). The LM head runs on those positions only,
    in chunks of at most ``LOGITS_CHUNK_ELEMENTS`` logits."""
    inputs = {**inputs, "use_cache": False}
    parts = causal_lm_parts(model)
    if parts is None:  # logits are not lm_head(hidden) (soft-capping, scaling): the full forward
        logits = model(**inputs).logits[src_row, src_col].float()
        if temperature != 1.0:
            logits = logits / temperature
        return _logits_logprobs(logits, targets, return_entropy, entropy_grad)
    backbone, head = parts
    hidden = backbone(**inputs)[0][src_row, src_col]
    n = hidden.shape[0]
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(1, head.weight.shape[0]))
    if n <= chunk:
        return _head_logprobs(head, hidden, targets, temperature, return_entropy, entropy_grad)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for s in range(0, n, chunk):
        args = (head, hidden[s:s + chunk], targets[s:s + chunk], temperature, return_entropy, entropy_grad)
        pieces.append(checkpoint(_head_logprobs, *args, use_reentrant=False) if recompute
                      else _head_logprobs(*args))
    logp = torch.cat([p[0] for p in pieces])
    ent = torch.cat([p[1] for p in pieces]) if return_entropy else None
    return logp, ent
