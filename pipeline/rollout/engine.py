"""The one generation engine every online algorithm samples through.

PPO, GRPO, RLOO, ReMax, REINFORCE++, online DPO and the Nash methods all call
``engine.generate(prompts, params)`` and get a :class:`RolloutBatch` back:
left-padded prompt ids, right-padded response ids, masks, and the per-token
log-probabilities of the sampled tokens under the policy.

Conventions (shared with the training forward pass, :func:`sequence_logprobs`):

* **Padding.** Prompts are left-padded (``prompt_mask`` is 0 on pads), responses
  right-padded with ``pad_token_id``. The stop token (EOS) that ends a response
  *is* part of the response and counted in ``response_mask``; everything after
  it is padding with mask 0.
* **Positions.** ``position_ids = cumsum(attention_mask) - 1`` with pad
  positions set to 0, exactly as ``transformers``' ``generate`` computes them,
  so the first real token of every row sits at position 0 whatever its padding.
* **Log-probs.** ``logprobs[i, t] = log_softmax(logits / T)[token]``: the
  temperature-scaled distribution of the policy ``engine.model`` *before* any
  top-k / top-p / min-new-tokens truncation and before geometric mixing (the
  "raw" log-probs of TRL and vLLM). That is what a training forward pass with
  the same temperature computes, so ``rollout.logprobs`` can serve as the
  ``old_logprobs`` of PPO-style ratios without a second forward pass. With
  truncated sampling (top_k / top_p < 1), mixture sampling or greedy decoding
  the tokens were not drawn from that distribution; the numbers are still the
  policy's log-probs of the tokens that were emitted.

Other samplers the algorithms need are the same engine pointed at another
model: sample from the reference or a frozen anchor with
``engine.with_model(ref_model)``; Nash-MD's token-level geometric mixture with
``engine.generate(..., mixture_model=ref_model, mixture_alpha=a)``; ReMax's
greedy baseline with ``SamplingParams(do_sample=False)``.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from pipeline.models.packing import accepts_packed, attention_mask_for, pack_trees, token_logprobs
from pipeline.models.policy import reference_of

__all__ = [
    "SamplingParams",
    "RolloutBatch",
    "RolloutEngine",
    "HFRolloutEngine",
    "ResponseLayout",
    "layout_responses",
    "sequence_logprobs",
    "reference_logprobs",
    "position_ids_from_mask",
]


# --------------------------------------------------------------------------- #
# Parameters and results
# --------------------------------------------------------------------------- #


@dataclass
class SamplingParams:
    """How to sample responses (names follow TRL / vLLM).

    Generation always stops at the tokenizer's EOS (unless ``ignore_eos``) and at
    any id in ``stop_token_ids``; the stop token is kept as the last response
    token.
    """

    max_new_tokens: int = 32
    """Maximum number of response tokens per completion (the stop token included)."""
    temperature: float = 1.0
    """Softmax temperature (> 0). Also the temperature of the reported log-probs, even when greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    do_sample: bool = True
    """False = greedy decoding (argmax; temperature, top_k and top_p do not change the tokens)."""
    n: int = 1
    """Completions per prompt; the n completions of one prompt are contiguous rows."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop ids besides the tokenizer's EOS."""
    min_new_tokens: int = 0
    """Stop tokens cannot be sampled before this many response tokens (sampling-side only)."""
    ignore_eos: bool = False
    """Never stop before max_new_tokens (benchmarks); stop tokens are then ordinary tokens."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(
                f"SamplingParams.temperature must be > 0, got {self.temperature} "
                "(use do_sample=False for greedy decoding)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.min_new_tokens < 0:
            raise ValueError(f"SamplingParams.min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = [int(i) for i in self.stop_token_ids]

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields changed, e.g. ``params.replace(do_sample=False, n=1)``."""
        return replace(self, **changes)


_TENSOR_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "logprobs",
    "group_index",
    "has_eos",
)


@dataclass
class RolloutBatch:
    """N completions (N = prompts x n), tensors on the model's device.

    ``prompt_ids``/``prompt_mask`` ``[N, P]`` left-padded; ``response_ids``/
    ``response_mask`` ``[N, R]`` right-padded (the stop token counted in the
    mask); ``logprobs`` ``[N, R]`` float32, 0 outside the mask; ``group_index``
    ``[N]`` the prompt each row was sampled for (rows of one group contiguous);
    ``has_eos`` ``[N]`` whether the row ended with a stop token (False =
    truncated at max_new_tokens). Masks are int64 like Hugging Face attention
    masks.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    group_index: Tensor
    has_eos: Tensor
    prompts: list[str]
    completions: list[str]

    # -- views for a training forward pass ---------------------------------- #
    @property
    def input_ids(self) -> Tensor:
        """``[N, P+R]`` prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """``[N, P+R]`` prompt mask followed by response mask."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_start(self) -> int:
        """Column where the response starts in ``input_ids`` (= P)."""
        return self.prompt_ids.shape[1]

    @property
    def response_lengths(self) -> Tensor:
        """``[N]`` number of response tokens (stop token included)."""
        return self.response_mask.sum(dim=1)

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max().item()) + 1 if len(self) else 0

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    # -- transforms --------------------------------------------------------- #
    def to(self, device: torch.device | str) -> "RolloutBatch":
        return replace(self, **{k: getattr(self, k).to(device) for k in _TENSOR_FIELDS})

    def select(self, indices: Sequence[int] | Tensor) -> "RolloutBatch":
        """Rows ``indices`` (a list, an index tensor or a bool mask); ``group_index`` keeps its values."""
        if isinstance(indices, Tensor):
            idx = indices.to(self.response_ids.device)
            if idx.dtype == torch.bool:
                idx = idx.nonzero(as_tuple=True)[0]
        else:
            idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.response_ids.device)
        rows = idx.tolist()
        out = {k: getattr(self, k).index_select(0, idx) for k in _TENSOR_FIELDS}
        return RolloutBatch(
            **out,
            prompts=[self.prompts[i] for i in rows],
            completions=[self.completions[i] for i in rows],
        )

    def trim(self) -> "RolloutBatch":
        """Drop prompt columns that are padding in every row and response columns past the longest response."""
        if len(self) == 0:
            return self
        p_keep = int(self.prompt_mask.any(dim=0).long().argmax().item()) if self.prompt_mask.any() else 0
        r_len = int(self.response_lengths.max().item())
        return replace(
            self,
            prompt_ids=self.prompt_ids[:, p_keep:],
            prompt_mask=self.prompt_mask[:, p_keep:],
            response_ids=self.response_ids[:, :r_len],
            response_mask=self.response_mask[:, :r_len],
            logprobs=self.logprobs[:, :r_len],
        )


# --------------------------------------------------------------------------- #
# Interface
# --------------------------------------------------------------------------- #


@runtime_checkable
class RolloutEngine(Protocol):
    """What an online algorithm needs from a sampler.

    The HF engine below runs the policy in-process; a faster backend (vLLM on
    GPUs) implements the same methods, holding its own copy of the weights that
    ``load_weights`` / ``sync_weights`` refresh after each optimizer step.
    """

    model: Any
    tokenizer: Any

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        mixture_model: Any | None = None,
        mixture_alpha: float = 0.0,
    ) -> RolloutBatch:
        """Sample ``params.n`` completions for each prompt from ``self.model``."""
        ...

    def load_weights(self, model: Any) -> None:
        """Point the engine at new policy weights (a model or a state dict)."""
        ...

    def sync_weights(self) -> None:
        """Make the engine see the current weights of ``self.model`` (noop when it shares them)."""
        ...


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``cumsum(mask) - 1`` with pad positions set to 0 (the ``transformers.generate`` convention)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


_FORWARD_KWARGS: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def _forward_kwargs(model: Any) -> set[str]:
    """Names of ``model.forward``'s parameters (cached per model)."""
    try:
        return _FORWARD_KWARGS[model]
    except (KeyError, TypeError):
        pass
    try:
        names = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = set()
    try:
        _FORWARD_KWARGS[model] = names
    except TypeError:
        pass
    return names


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _call(model: Any, logits_to_keep: int | None = None, **kwargs: Any) -> Any:
    accepted = _forward_kwargs(model)
    if "position_ids" not in accepted and "kwargs" not in accepted:
        kwargs.pop("position_ids", None)
    if logits_to_keep is not None and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = logits_to_keep
    return model(**kwargs)


#: a tree (a prompt and the responses that share it) grows up to this many tokens (or the longest
#: sequence), then the prompt's remaining responses start another: attention costs O(width^2)
PACK_WIDTH = 128


@dataclass
class ResponseLayout:
    """The response tokens of a ``[N, P+R]`` training batch (left-padded prompts, right-padded
    responses, as :class:`RolloutBatch` gives them) laid out for one forward pass.

    **Packed** (when the model takes a packed batch, :func:`pipeline.models.packing.accepts_packed`):
    each distinct prompt once, its responses as branches of a tree (:func:`pack_trees`; a tree
    holds at most ``max(PACK_WIDTH, longest sequence)`` tokens), trees packed first-fit into
    rows as wide as the largest tree, with little padding; a GRPO batch of 4 responses per
    prompt computes each prompt once instead of 4 times. **Padded**: the batch
    itself, with the columns that are padding in every row cut off. Either way ``src_row`` /
    ``src_col`` are the positions whose outputs predict the response tokens ``targets``, and
    ``dest`` their flat index in the ``[N, R]`` response grid. Build it once per batch with
    :func:`layout_responses`; every model that reads the batch in a step (policy, reference,
    critic) reuses it.
    """

    input_ids: Tensor
    #: ``[rows, W]`` padding mask (padded) or ``[rows, 1, W, W]`` bool tree mask (packed)
    attention_mask: Tensor
    position_ids: Tensor
    src_row: Tensor
    src_col: Tensor
    targets: Tensor
    dest: Tensor
    #: ``(N, R)`` of the response grid
    shape: tuple[int, int]

    @property
    def packed(self) -> bool:
        return self.attention_mask.ndim == 4

    def model_inputs(self, model: Any) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` (in the form ``model`` takes), ``position_ids``."""
        if self.packed:
            return {"input_ids": self.input_ids, "attention_mask": attention_mask_for(model, self.attention_mask),
                    "position_ids": self.position_ids}
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        accepted = _forward_kwargs(model)
        if "position_ids" in accepted or "kwargs" in accepted:
            inputs["position_ids"] = self.position_ids
        return inputs

    def unpack(self, values: Tensor) -> Tensor:
        """``[T]`` values of the response tokens -> ``[N, R]``, 0 outside the responses (differentiable)."""
        n, r = self.shape
        return values.new_zeros(n * r).index_put((self.dest,), values).view(n, r)

    def select(self, per_position: Tensor) -> Tensor:
        """``[rows, W]`` outputs of every position (a critic's values) -> ``[N, R]`` at the positions
        that predict the response tokens, 0 elsewhere."""
        return self.unpack(per_position[self.src_row, self.src_col])


def layout_responses(
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    *,
    pack: bool = True,
    share_prompts: bool = True,
    width: int = PACK_WIDTH,
) -> ResponseLayout:
    """The :class:`ResponseLayout` of a training batch: packed when ``pack`` (and the masks are a
    left-padded prompt and a right-padded response), sequences with the same prompt sharing it
    when ``share_prompts``; otherwise padded, trimmed to the columns some row uses."""
    if response_start < 1:
        raise ValueError("response_start must be >= 1 (the response needs a prompt token before it)")
    n, seq_len = input_ids.shape
    r = seq_len - response_start
    pm, rm = attention_mask[:, :response_start] != 0, attention_mask[:, response_start:] != 0
    device = input_ids.device
    contiguous = bool((pm[:, 1:] >= pm[:, :-1]).all()) and bool((rm[:, 1:] <= rm[:, :-1]).all())
    if pack and contiguous and n:
        plen, rlen = pm.sum(1).tolist(), rm.sum(1).tolist()
        if share_prompts:
            keys = torch.unique(input_ids[:, :response_start].masked_fill(~pm, -1), dim=0, return_inverse=True)[1]
            keys = keys.tolist()
        else:
            keys = list(range(n))
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        ids = input_ids.tolist()
        width = max(width, max(p + q for p, q in zip(plen, rlen)))
        trees, members = [], []
        for rows in groups.values():
            prompt = ids[rows[0]][response_start - plen[rows[0]]:response_start]
            cur: list[int] = []
            size = len(prompt)
            for i in rows:  # a prompt with many or long responses is split over several trees
                if cur and size + rlen[i] > width:
                    trees.append((prompt, [ids[j][response_start:response_start + rlen[j]] for j in cur]))
                    members.append(cur)
                    cur, size = [], len(prompt)
                cur.append(i)
                size += rlen[i]
            trees.append((prompt, [ids[j][response_start:response_start + rlen[j]] for j in cur]))
            members.append(cur)
        packed = pack_trees(trees, 0)  # rows as wide as the largest tree
        first = torch.tensor([0] + [len(m) for m in members[:-1]]).cumsum(0)
        row_of = torch.tensor([i for m in members for i in m], dtype=torch.long)
        rows_t = row_of[first[packed["tree"]] + packed["branch"]]
        return ResponseLayout(
            input_ids=packed["input_ids"].to(device), attention_mask=packed["attention_mask"].to(device),
            position_ids=packed["position_ids"].to(device), src_row=packed["src_row"].to(device),
            src_col=packed["src_col"].to(device), targets=packed["targets"].to(device),
            dest=(rows_t * r + packed["offset"]).to(device), shape=(n, r))
    # padded: drop columns that are padding in every row
    used = pm.any(0)
    p0 = int(used.long().argmax()) if bool(used.any()) else 0
    r1 = int(rm.any(0).nonzero().max()) + 1 if bool(rm.any()) else 0
    ids, mask = input_ids[:, p0:response_start + r1], attention_mask[:, p0:response_start + r1]
    start = response_start - p0
    rows, t = rm[:, :r1].nonzero(as_tuple=True)
    return ResponseLayout(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), src_row=rows,
        src_col=start - 1 + t, targets=ids[rows, start + t], dest=rows * r + t, shape=(n, r))


def sequence_logprobs(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    entropy_grad: bool = False,
    layout: ResponseLayout | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs of the response tokens in one training-style forward pass.

    ``input_ids``/``attention_mask`` ``[N, P+R]`` are a left-padded prompt
    followed by a right-padded response (``RolloutBatch.input_ids`` /
    ``attention_mask``); the response starts at column ``response_start``.
    Returns ``logprobs [N, R]`` (float32, ``log_softmax(logits / temperature)``
    of each response token, 0 where the mask is 0), and with
    ``return_entropy=True`` also the entropies ``[N, R]`` of the same
    distributions (without gradient unless ``entropy_grad=True``). Gradients
    flow through the log-probs; wrap in ``torch.no_grad()`` for reference log-probs.

    The batch runs packed when the model allows it (:class:`ResponseLayout`; pass ``layout``
    to reuse one across models) and the LM head only on the positions that predict response
    tokens (:func:`pipeline.models.packing.token_logprobs`): the numbers are those of the
    padded batch up to float rounding.
    """
    if layout is None:
        layout = layout_responses(input_ids, attention_mask, response_start, pack=accepts_packed(model))
    logp, ent = token_logprobs(model, layout.model_inputs(model), layout.src_row, layout.src_col, layout.targets,
                               temperature, return_entropy, entropy_grad)
    logp = layout.unpack(logp)
    return (logp, layout.unpack(ent)) if return_entropy else logp


def reference_logprobs(
    policy: Any,
    ref_model: Any | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float = 1.0,
    layout: ResponseLayout | None = None,
) -> Tensor:
    """:func:`sequence_logprobs` under the reference policy, under ``torch.inference_mode``.

    The reference is ``ref_model``, or, when it is ``None``, ``policy`` itself with its
    LoRA adapters disabled (the PEFT reference: no second copy of the weights in memory).
    The result is an ordinary tensor (usable next to tensors that need gradients).
    """
    if ref_model is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("reference_logprobs: no reference model given and the policy has no adapters to disable")
    with torch.inference_mode(), reference_of(policy, ref_model) as model:
        lp = sequence_logprobs(model, input_ids, attention_mask, response_start, temperature, layout=layout)
    return lp.clone()


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (HF warper order). ``logits`` may be modified in place."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        remove = remove.scatter(-1, sorted_idx, remove)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs [B, V]`` by inverse-CDF sampling.

    Much cheaper than ``torch.multinomial`` on CPU (one uniform per row instead
    of one random number per vocabulary entry), deterministic under
    ``generator``. With ``x = (1 - u) * total`` in ``(0, total]`` the first index
    whose CDF reaches ``x`` always has non-zero probability.
    """
    cdf = probs.cumsum(dim=-1)
    rng_device = generator.device if generator is not None else probs.device
    u = torch.rand((probs.shape[0], 1), generator=generator, device=rng_device, dtype=cdf.dtype).to(probs.device)
    x = (1.0 - u) * cdf[:, -1:]
    return torch.searchsorted(cdf, x).clamp_max_(probs.shape[-1] - 1).squeeze(1)


# --------------------------------------------------------------------------- #
# Hugging Face engine
# --------------------------------------------------------------------------- #


class HFRolloutEngine:
    """Batched KV-cache sampling with a ``transformers`` causal LM, in-process.

    ``max_prompt_length`` truncates tokenized prompts from the left (their end
    is kept). ``add_special_tokens`` is passed to the tokenizer (a Llama BOS,
    for instance); the training side must tokenize prompts the same way, which
    it does when it trains on ``RolloutBatch.input_ids``.

    Rows that finish are dropped from the running batch (and its KV cache) once
    a quarter of the running rows are done, so a batch with uneven lengths does
    not pay for its finished rows.
    """

    compact_fraction: float = 0.25
    """Drop finished rows once this fraction of the running batch is done (``float('inf')`` = never)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_prompt_length: int | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.add_special_tokens = add_special_tokens
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = eos
        if pad is None:
            raise ValueError("HFRolloutEngine: the tokenizer has neither a pad token nor an EOS token; set one")
        self.eos_token_id: int | None = eos
        self.pad_token_id: int = int(pad)

    # -- weights -------------------------------------------------------------- #
    def load_weights(self, model: Any) -> None:
        """Use ``model`` (a module) or load ``model`` (a state dict) into ``self.model``."""
        if isinstance(model, dict):
            self.model.load_state_dict(model)
        elif model is not self.model:
            self.model = model

    def sync_weights(self) -> None:
        """Noop: this engine runs ``self.model`` itself, so it always sees the latest weights."""

    def with_model(self, model: Any) -> "HFRolloutEngine":
        """The same engine sampling from another model (the reference, a frozen anchor, an EMA copy)."""
        other = HFRolloutEngine.__new__(HFRolloutEngine)
        other.__dict__.update(self.__dict__)
        other.model = model
        return other

    # -- tokenization ---------------------------------------------------------- #
    def encode_prompts(self, prompts: Sequence[str], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Tokenize and left-pad ``prompts`` → ``(prompt_ids, prompt_mask)`` ``[B, P]``."""
        enc = self.tokenizer(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]
        if self.max_prompt_length is not None:
            enc = [ids[-self.max_prompt_length :] if self.max_prompt_length > 0 else [] for ids in enc]
        for i, ids in enumerate(enc):
            if len(ids) == 0:
                raise ValueError(
                    f"prompt {i} ({prompts[i]!r}) is empty after tokenization; "
                    "give it some text or use a tokenizer that adds a BOS token"
                )
        width = max(len(ids) for ids in enc)
        ids_t = torch.full((len(enc), width), self.pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((len(enc), width), dtype=torch.long)
        for i, ids in enumerate(enc):
            if ids:
                ids_t[i, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
                mask_t[i, width - len(ids) :] = 1
        device = device if device is not None else _model_device(self.model)
        return ids_t.to(device), mask_t.to(device)

    def _decode_responses(self, response_ids: Tensor, response_mask: Tensor, has_eos: Tensor) -> list[str]:
        lengths = (response_mask.sum(1) - has_eos.long()).tolist()
        rows = response_ids.tolist()
        return self.tokenizer.batch_decode([r[:n] for r, n in zip(rows, lengths)], skip_special_tokens=False)

    # -- generation ------------------------------------------------------------ #
    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | None = None,
        *,
        generator: torch.Generator | None = None,
        mixture_model: Any | None = None,
        mixture_alpha: float = 0.0,
    ) -> RolloutBatch:
        """Sample ``params.n`` completions of each prompt (rows ``[i*n, (i+1)*n)`` for prompt i).

        ``generator``: a ``torch.Generator`` (same seed → same tokens; it may
        live on the CPU while the model is on a GPU: one uniform per row and
        step is drawn from it). ``mixture_model``/``mixture_alpha``: sample tokens from
        ``softmax(((1-α)·logits_π + α·logits_mix) / T)``, both models decoding
        with their own KV caches (Nash-MD); ``logprobs`` are still the policy's.
        """
        params = params if params is not None else SamplingParams()
        if len(prompts) == 0:
            raise ValueError("generate: no prompts given")
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        return self.generate_ids(
            prompt_ids,
            prompt_mask,
            params,
            prompts=list(prompts),
            generator=generator,
            mixture_model=mixture_model,
            mixture_alpha=mixture_alpha,
        )

    def generate_ids(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor | None,
        params: SamplingParams | None = None,
        *,
        prompts: list[str] | None = None,
        generator: torch.Generator | None = None,
        mixture_model: Any | None = None,
        mixture_alpha: float = 0.0,
    ) -> RolloutBatch:
        """Like :meth:`generate` for an already tokenized, left-padded prompt batch ``[B, P]``."""
        params = params if params is not None else SamplingParams()
        if mixture_model is not None and not 0.0 <= mixture_alpha <= 1.0:
            raise ValueError(f"mixture_alpha must be in [0, 1], got {mixture_alpha}")
        device = _model_device(self.model)
        prompt_ids = prompt_ids.to(device)
        prompt_mask = (
            torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask.to(device=device, dtype=torch.long)
        )
        if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"generate_ids: prompt_ids and prompt_mask must both be [batch, length], "
                f"got {tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}"
            )
        if prompt_ids.shape[1] > 1 and bool((prompt_mask[:, 1:] < prompt_mask[:, :-1]).any()):
            raise ValueError("generate_ids: prompts must be left-padded (mask 0…0 1…1 in every row)")
        if bool((prompt_mask.sum(1) == 0).any()):
            raise ValueError("generate_ids: a prompt row has no tokens (all padding)")
        if prompts is None:
            prompts = self.tokenizer.batch_decode(
                [r[len(r) - n :] for r, n in zip(prompt_ids.tolist(), prompt_mask.sum(1).tolist())],
                skip_special_tokens=False,
            )
        # drop columns that are padding in every row
        lead = int(prompt_mask.any(dim=0).long().argmax().item())
        if lead > 0:
            prompt_ids, prompt_mask = prompt_ids[:, lead:], prompt_mask[:, lead:]

        models = [self.model] + ([mixture_model] if mixture_model is not None else [])
        was_training = [m.training for m in models]
        try:
            for m in models:
                m.eval()
            with torch.inference_mode():
                resp, resp_mask, logprobs, has_eos = self._sample_loop(
                    prompt_ids, prompt_mask, params, generator, mixture_model, float(mixture_alpha)
                )
        finally:
            for m, t in zip(models, was_training):
                m.train(t)

        n = params.n
        # leave inference mode: results must be usable in a training forward/backward
        resp, resp_mask, logprobs, has_eos = (t.clone() for t in (resp, resp_mask, logprobs, has_eos))
        completions = self._decode_responses(resp, resp_mask, has_eos)
        batch_size = prompt_ids.shape[0]
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            response_ids=resp,
            response_mask=resp_mask,
            logprobs=logprobs,
            group_index=torch.arange(batch_size, device=device).repeat_interleave(n),
            has_eos=has_eos,
            prompts=[p for p in prompts for _ in range(n)],
            completions=completions,
        )

    # -- the loop -------------------------------------------------------------- #
    def _stop_ids(self, params: SamplingParams, device: torch.device) -> Tensor | None:
        if params.ignore_eos:
            return None
        ids = set(params.stop_token_ids)
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        if not ids:
            return None
        return torch.tensor(sorted(ids), dtype=torch.long, device=device)

    @staticmethod
    def _prefill(model: Any, ids: Tensor, mask: Tensor, pos: Tensor, n: int) -> tuple[Any, Tensor]:
        out = _call(model, logits_to_keep=1, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        if n > 1:
            # prefill each prompt once, then copy its cache for the n samples
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(n)
            else:  # legacy tuple caches
                cache = tuple(tuple(x.repeat_interleave(n, dim=0) for x in layer) for layer in cache)
            logits = logits.repeat_interleave(n, dim=0)
        return cache, logits

    @staticmethod
    def _step(model: Any, tok: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> tuple[Any, Tensor]:
        out = _call(
            model,
            input_ids=tok.unsqueeze(1),
            attention_mask=mask,
            position_ids=pos.unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        )
        return out.past_key_values, out.logits[:, -1, :]

    @staticmethod
    def _decode_mask(model: Any) -> Any:
        """For one-token decoding steps: a function ``[rows, kv] padding mask -> [rows, 1, 1, kv]``
        mask in the form ``model`` takes, so transformers does not rebuild it every step; None
        (pass the 2D mask) unless the model has plain full attention (eager / sdpa, no sliding
        window or chunked attention), where the two are the same."""
        cfg = getattr(model, "config", None)
        if cfg is None or not accepts_packed(model):
            return None
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None) or any(
                t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
            return None
        return lambda mask: attention_mask_for(model, mask[:, None, None, :].bool())

    @staticmethod
    def _select_cache(cache: Any, keep: Tensor) -> Any:
        if hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(keep)
            return cache
        return tuple(tuple(x.index_select(0, keep) for x in layer) for layer in cache)

    def _sample_loop(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
        mixture_model: Any | None,
        alpha: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        device = prompt_ids.device
        n, max_new, temp = params.n, params.max_new_tokens, params.temperature
        batch, plen = prompt_ids.shape
        rows = batch * n
        pad = self.pad_token_id
        stop_ids = self._stop_ids(params, device)

        pos = position_ids_from_mask(prompt_mask)
        cache, logits = self._prefill(self.model, prompt_ids, prompt_mask, pos, n)
        mix_cache = mix_logits = None
        if mixture_model is not None:
            mix_cache, mix_logits = self._prefill(mixture_model, prompt_ids, prompt_mask, pos, n)

        # full-batch outputs
        resp = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
        resp_mask = torch.zeros((rows, max_new), dtype=torch.long, device=device)
        logprobs = torch.zeros((rows, max_new), dtype=torch.float32, device=device)
        has_eos = torch.zeros(rows, dtype=torch.bool, device=device)

        # running (compacted) batch state
        active = torch.arange(rows, device=device)  # full-batch row of each running row
        at: slice | Tensor = slice(None)  # the same as an index: a slice until rows are first dropped (cheaper)
        attn = torch.cat(
            [prompt_mask.repeat_interleave(n, dim=0), torch.ones((rows, max_new), dtype=torch.long, device=device)],
            dim=1,
        )
        next_pos = pos[:, -1].repeat_interleave(n) + 1
        done = torch.zeros(rows, dtype=torch.bool, device=device)  # per running row
        n_done = 0
        pad_t = torch.tensor(pad, dtype=torch.long, device=device)
        steps = 0
        keep_2d = lambda m: m  # noqa: E731
        mask_of = self._decode_mask(self.model) or keep_2d
        mix_mask_of = (self._decode_mask(mixture_model) or keep_2d) if mixture_model is not None else keep_2d

        for t in range(max_new):
            logits = logits.float()
            scaled = logits / temp if temp != 1.0 else logits
            # sampling distribution
            if mixture_model is not None:
                sample_logits = (1.0 - alpha) * logits + alpha * mix_logits.float()
                if temp != 1.0:
                    sample_logits = sample_logits / temp
            else:
                sample_logits = scaled
            if params.do_sample:
                if stop_ids is not None and t < params.min_new_tokens:
                    sample_logits = sample_logits.index_fill(-1, stop_ids, float("-inf"))
                sample_logits = _filter_logits(sample_logits, params.top_k, params.top_p)
                tok = _sample(torch.softmax(sample_logits, dim=-1), generator)
            else:
                if stop_ids is not None and t < params.min_new_tokens:
                    sample_logits = sample_logits.index_fill(-1, stop_ids, float("-inf"))
                tok = sample_logits.argmax(dim=-1)
            # raw log-prob of the token under the temperature-scaled policy (the fused log_softmax
            # kernel: on CPU logsumexp takes several passes over the [rows, vocab] block)
            lp = torch.log_softmax(scaled, dim=-1).gather(-1, tok.unsqueeze(1)).squeeze(1)

            if n_done:
                tok = torch.where(done, pad_t, tok)
                lp = lp.masked_fill(done, 0.0)
            resp[at, t] = tok
            logprobs[at, t] = lp
            resp_mask[at, t] = (~done).long()
            steps = t + 1
            if stop_ids is not None:
                hit = torch.isin(tok, stop_ids) & ~done
                has_eos[at] |= hit
                done = done | hit
                n_done = int(done.sum().item())
                if n_done == done.shape[0]:
                    break
            if t + 1 == max_new:
                break
            # drop finished rows once enough of them have piled up
            if n_done and n_done >= max(1.0, self.compact_fraction * done.shape[0]):
                keep = (~done).nonzero(as_tuple=True)[0]
                cache = self._select_cache(cache, keep)
                if mix_cache is not None:
                    mix_cache = self._select_cache(mix_cache, keep)
                active, attn, next_pos, tok = active[keep], attn[keep], next_pos[keep], tok[keep]
                at = active
                done = done[keep]
                n_done = 0
            step_mask = attn[:, : plen + t + 1]
            cache, logits = self._step(self.model, tok, mask_of(step_mask), next_pos + t, cache)
            if mixture_model is not None:
                mix_cache, mix_logits = self._step(mixture_model, tok, mix_mask_of(step_mask), next_pos + t, mix_cache)

        return resp[:, :steps], resp_mask[:, :steps], logprobs[:, :steps], has_eos
