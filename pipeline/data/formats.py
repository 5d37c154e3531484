"""Load user datasets in the TRL formats as :class:`SFTExample` / :class:`PreferenceExample`.

Formats (column names after renaming with ``<key>.columns``), as in TRL:

* ``language_modeling``  ``text``                       -> SFT (prompt="", completion=text)
* ``prompt_completion``  ``prompt``, ``completion``     -> SFT
* ``preference``         ``prompt``, ``chosen``, ``rejected`` [``margin``] [``subset``];
  without ``prompt`` (implicit prompt) the prompt is the longest common prefix of
  ``chosen`` and ``rejected``, cut back to a whitespace boundary (like TRL's
  ``extract_prompt``). SFT loading of a preference dataset uses prompt + chosen.
* ``conversational``     ``messages: [{"role", "content"}, ...]`` (SFT: the last message
  must be the assistant's and is the completion), or the prompt-completion / preference
  columns holding message lists (``prompt`` the conversation so far, ``completion`` /
  ``chosen`` / ``rejected`` the assistant turn(s); implicit prompt = common leading
  messages). Rendered with ``tokenizer.apply_chat_template(..., tokenize=False)``:
  the prompt with ``add_generation_prompt=True`` and the completion as the rest of the
  rendered full conversation (so template end-of-turn markers are kept); if the full
  render does not start with the prompt render, the completion is the messages' content.

``format: auto`` detects the format from the columns (preference > prompt_completion >
conversational ``messages`` > language_modeling); message-list values are rendered
with the chat template whatever the format.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.data.loading import Row, read_rows
from pipeline.data.records import PreferenceExample, SFTExample
from pipeline.errors import ConfigError, DataError

#: key of a prompt row holding its ``file:LINE`` (not a dataset column: not passed to reward functions)
SOURCE = "_source"
FORMATS = ("auto", "language_modeling", "prompt_completion", "preference", "conversational", "prompt_only")
#: required columns of each shape ("messages" is the conversational SFT shape)
SHAPES = {
    "preference": ("chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "language_modeling": ("text",),
    "prompt_only": ("prompt",),
}
EXPECTED = ("text (language_modeling); prompt, completion (prompt_completion); prompt, chosen, rejected "
            "or chosen, rejected (preference); messages (conversational)")


@dataclass
class DataSpec:
    path: str
    name: str | None
    split: str
    format: str
    columns: dict
    max_samples: int | None
    key: str

    @property
    def source(self) -> str:
        return f"{self.path} ({self.key})"


def data_spec(cfg, key: str | None = None) -> DataSpec:
    """Validate the duck-typed data config (DictConfig, dataclass or namespace); ``key`` is
    its config key named in errors (default: ``cfg.key``, else ``data``)."""
    key = key or getattr(cfg, "key", None) or "data"
    path = getattr(cfg, "path", None)
    if not path:
        raise ConfigError("no dataset path given", where=f"{key}.path",
                          fix=f"set {key}.path to a local jsonl/json/csv/parquet file, a directory or a Hub name")
    fmt = getattr(cfg, "format", None) or "auto"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}", where=f"{key}.format", fix=f"use one of {', '.join(FORMATS)}")
    columns = getattr(cfg, "columns", None) or {}
    if not isinstance(columns, Mapping):
        raise ConfigError(f"must be a mapping of user column -> canonical column, got {columns!r}",
                          where=f"{key}.columns", fix=f"e.g. {key}.columns={{question: prompt, answer: completion}}")
    max_samples = getattr(cfg, "max_samples", None)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0):
        raise ConfigError(f"must be a positive integer or null, got {max_samples!r}", where=f"{key}.max_samples",
                          fix=f"set {key}.max_samples=null to use every row")
    return DataSpec(str(path), getattr(cfg, "name", None), getattr(cfg, "split", None) or "train", fmt,
                    {str(k): str(v) for k, v in columns.items()}, max_samples, key)


# ----------------------------------------------------------------------------- public API
def load_sft_examples(cfg, tokenizer=None, *, key: str | None = None) -> list[SFTExample]:
    """SFT examples from any supported format (``tokenizer`` renders conversational rows)."""
    _, rows, shape = _load(cfg, key=key)
    if shape == "prompt_only":
        raise DataError(f"this is a prompt-only dataset (columns: {_cols(rows[0])}): it has no completions to "
                        "fine-tune on", where=data_spec(cfg, key).source,
                        fix="give SFT prompt + completion, text, messages or preference data")
    chat = ChatRenderer(tokenizer)
    if shape == "preference":
        return [SFTExample(p.prompt, p.chosen, where=p.where) for p in (_preference(r, chat, meta=False) for r in rows)]
    convert = {"language_modeling": _lm, "prompt_completion": _prompt_completion, "messages": _messages_sft}[shape]
    return [convert(r, chat) for r in rows]


def load_preference_examples(cfg, tokenizer=None, *, key: str | None = None) -> list[PreferenceExample]:
    """Preference pairs from a preference dataset (explicit or implicit prompt, text or chat)."""
    _, rows, _ = _load(cfg, want="preference", key=key)
    chat = ChatRenderer(tokenizer)
    return [_preference(r, chat) for r in rows]


def load_prompt_rows(cfg, *, key: str | None = None, tokenizer=None) -> list[dict]:
    """Prompt rows for online RL: dicts with the ``prompt`` plus the row's other columns
    (passed to reward functions) and its ``file:LINE`` under :data:`SOURCE`. A ``prompt``
    holding a list of ``{role, content}`` messages is rendered with ``tokenizer``'s chat
    template and the generation prompt, exactly as SFT renders the prompt of a conversation
    (without a tokenizer the messages are only checked)."""
    spec, rows, _ = _load(cfg, key=key, detect=False)
    return _prompt_rows(spec, rows, ChatRenderer(tokenizer))


def load_eval_data(cfg, *, key: str | None = None, tokenizer=None) -> tuple[list[dict], list[PreferenceExample] | None]:
    """Evaluation data (``eval.data``): ``(prompt rows, pairs)``. A preference file gives its
    pairs (reward / preference model accuracy) and its distinct prompts (policies are sampled on
    them); a file with a ``prompt`` column (prompt-only, prompt + completion) gives prompt rows
    as :func:`load_prompt_rows` does, and no pairs."""
    spec, rows, shape = _load(cfg, key=key)
    chat = ChatRenderer(tokenizer)
    if shape == "preference":
        pairs = [_preference(r, chat) for r in rows]
        seen: dict[str, dict] = {}
        for p in pairs:
            seen.setdefault(p.prompt, {"prompt": p.prompt, SOURCE: p.where})
        if not any(seen):
            raise DataError("the preference pairs have no prompts to sample policies on (implicit prompts with no "
                            "common prefix)", where=spec.source, fix="give the pairs a 'prompt' column")
        return [r for r in seen.values() if r["prompt"]], pairs
    if shape not in ("prompt_completion", "prompt_only"):
        raise DataError(f"this is a {_label(shape)} dataset (columns: {_cols(rows[0])}), but evaluation needs "
                        "prompts: a 'prompt' column (prompt-only or prompt + completion) or preference pairs",
                        where=spec.source, fix=f"point {spec.key}.path at a prompt or preference file")
    return _prompt_rows(spec, rows, chat), None


def _prompt_rows(spec: DataSpec, rows: list[Row], chat: "ChatRenderer") -> list[dict]:
    out = []
    for r in rows:
        if "prompt" not in r.values:
            raise DataError(f"row has no 'prompt' column (columns: {_cols(r)})", where=r.where,
                            fix=f"prompt datasets need a 'prompt' column (text or a list of messages); rename one "
                                f"with {spec.key}.columns, e.g. {{question: prompt}}")
        prompt = r.values["prompt"]
        if _is_chat(prompt):
            messages = _chat(r, "prompt")
            prompt = chat._render(messages, r, True) if chat.tokenizer is not None else messages
        else:
            prompt = _text(r, "prompt")
        out.append({**r.values, "prompt": prompt, SOURCE: r.where})
    return out


def _load(cfg, want: str | None = None, key: str | None = None,
          detect: bool = True) -> tuple[DataSpec, list[Row], str]:
    spec = data_spec(cfg, key)
    rows = read_rows(spec.path, name=spec.name, split=spec.split, max_samples=spec.max_samples, key=spec.key)
    _rename(rows, spec)
    if not detect:
        return spec, rows, "prompt_only"
    shape = detect_shape(set(rows[0].values), spec)
    half = [c for c in SHAPES["preference"] if c not in rows[0].values]
    if want == "preference" and shape != want and len(half) == 1:  # one of chosen / rejected
        raise DataError(f"the data has no {half[0]!r} column (columns: {_cols(rows[0])}); preference training needs "
                        "both 'chosen' and 'rejected'", where=spec.source,
                        fix=f"add a {half[0]!r} column, or map an existing one with {spec.key}.columns, "
                            f"e.g. {{bad: rejected}}")
    if want and shape != want:
        raise DataError(f"this is a {_label(shape)} dataset (columns: {_cols(rows[0])}), but preference training "
                        "needs 'chosen' and 'rejected' columns (and optionally 'prompt')", where=spec.source,
                        fix=f"point {spec.key}.path at a preference dataset, or map its columns with "
                            f"{spec.key}.columns, e.g. {{good: chosen, bad: rejected}}")
    return spec, rows, shape


def _label(shape: str) -> str:
    return "conversational (messages)" if shape == "messages" else shape


def _cols(row: Row) -> str:
    return ", ".join(map(str, row.values)) or "(none)"


def _rename(rows: list[Row], spec: DataSpec) -> None:
    if not spec.columns:
        return
    first = rows[0].values
    missing = [c for c in spec.columns if c not in first]
    if missing:
        raise DataError(f"{spec.key}.columns renames {missing}, but the data has no such column "
                        f"(columns found: {_cols(rows[0])})", where=spec.source,
                        fix=f"fix the keys of {spec.key}.columns (user column -> canonical column)")
    clash = [c for c in spec.columns.values() if c in first and c not in spec.columns]
    if clash:
        raise DataError(f"{spec.key}.columns renames a column to {clash}, but the data already has that column",
                        where=spec.source, fix=f"drop that entry from {spec.key}.columns or rename the other column too")
    for r in rows:
        r.values = {spec.columns.get(k, k): v for k, v in r.values.items()}


def detect_shape(columns: set, spec: DataSpec) -> str:
    """One of ``SHAPES`` for ``columns`` under ``spec.format``; DataError if none fits."""
    example = "{good: chosen, bad: rejected}" if spec.format == "preference" else "{question: prompt, answer: completion}"
    fix = f"rename columns with {spec.key}.columns, e.g. {example}, or set {spec.key}.format"
    if spec.format in ("auto", "conversational"):
        order = ("messages", "preference", "prompt_completion") if spec.format == "conversational" else tuple(SHAPES)
        half = [c for c in SHAPES["preference"] if c in columns]
        if len(half) == 1:  # one of chosen / rejected: a preference file missing the other
            other = next(c for c in SHAPES["preference"] if c not in columns)
            raise DataError(f"this looks like a preference dataset, but it has no {other!r} column (columns found: "
                            f"{', '.join(sorted(columns))})", where=spec.source,
                            fix=f"give every row a {other!r} response, or map the column holding it with "
                                f"{spec.key}.columns, e.g. {{worse: rejected}}")
        for shape in order:
            if set(SHAPES[shape]) <= columns:
                return shape
        expected = EXPECTED if spec.format == "auto" else (
            "messages, or prompt + completion / chosen + rejected holding message lists")
        raise DataError(f"cannot tell the dataset format: columns found: {', '.join(sorted(columns)) or '(none)'}; "
                        f"expected {expected}", where=spec.source, fix=fix)
    missing = [c for c in SHAPES[spec.format] if c not in columns]
    if missing:
        raise DataError(f"format {spec.format!r} needs column(s) {', '.join(map(repr, missing))}, but the data has "
                        f"columns: {', '.join(sorted(columns)) or '(none)'}", where=spec.source, fix=fix)
    return spec.format


# ----------------------------------------------------------------------------- values
def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _get(row: Row, col: str) -> Any:
    if col not in row.values:
        raise DataError(f"row has no {col!r} column (columns: {_cols(row)})", where=row.where,
                        fix=f"give every row a {col!r} value")
    return row.values[col]


def _text(row: Row, col: str) -> str:
    v = _get(row, col)
    if isinstance(v, str):
        return v
    kind = "null" if v is None else type(v).__name__
    raise DataError(f"column {col!r} must be a string, got {kind}: {_short(v)}", where=row.where,
                    fix="write text values as JSON strings (quote numbers)")


def _is_chat(v: Any) -> bool:
    return isinstance(v, list)


def _chat(row: Row, col: str) -> list[dict]:
    v = _get(row, col)
    if not isinstance(v, list) or not v:
        raise DataError(f"column {col!r} must be a non-empty list of {{role, content}} messages, got {_short(v)}",
                        where=row.where, fix='e.g. [{"role": "user", "content": "Hi"}]')
    for j, m in enumerate(v):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{col}[{j}] must be a message {{'role': str, 'content': str}}, got {_short(m)}",
                            where=row.where, fix='e.g. {"role": "assistant", "content": "Hello"}')
    return [dict(m) for m in v]


def _margin(row: Row) -> float | None:
    v = row.values.get("margin")
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        x = float(v)
    except ValueError:
        raise DataError(f"column 'margin' must be a number, got {_short(v)}", where=row.where,
                        fix="use a finite number, or leave margin empty/null") from None
    if math.isinf(x):
        raise DataError("column 'margin' is infinite", where=row.where, fix="use a finite number")
    return None if math.isnan(x) else x


def _subset(row: Row) -> str:
    v = row.values.get("subset")
    return "default" if v is None or v == "" else str(v)


# ----------------------------------------------------------------------------- chat templates
class ChatRenderer:
    """Renders message lists with ``tokenizer.apply_chat_template`` (checked lazily)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], row: Row, generation_prompt: bool) -> str:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise DataError("conversational data (message lists) needs a chat template, but the tokenizer has "
                            + ("none" if tok is not None else "not been given"), where=row.where,
                            fix="set model.chat_template to a Jinja chat template (or use a tokenizer that has one), "
                                "or convert the data to prompt/completion text")
        try:
            out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2 TemplateError (e.g. raise_exception), KeyError, TypeError...
            raise DataError(f"the chat template failed on this row: {type(e).__name__}: {e}", where=row.where,
                            fix="check the message roles/order against the chat template (model.chat_template)") from None
        return out if isinstance(out, str) else str(out)

    def split(self, prompt: list[dict], completion: list[dict], row: Row) -> tuple[str, str]:
        """(rendered prompt with generation prompt, rendered rest of prompt + completion)."""
        prompt_text = self._render(prompt, row, True) if prompt else ""
        full = self._render(prompt + completion, row, False)
        if full.startswith(prompt_text):
            return prompt_text, full[len(prompt_text):]
        return prompt_text, "".join(m["content"] for m in completion)


# ----------------------------------------------------------------------------- rows -> examples
def _lm(row: Row, chat: ChatRenderer) -> SFTExample:
    return SFTExample("", _text(row, "text"), where=row.where)


def _prompt_completion(row: Row, chat: ChatRenderer) -> SFTExample:
    p, c = _get(row, "prompt"), _get(row, "completion")
    if _is_chat(p) and _is_chat(c):
        return SFTExample(*chat.split(_chat(row, "prompt"), _chat(row, "completion"), row), where=row.where)
    if _is_chat(p) or _is_chat(c):
        raise DataError("'prompt' and 'completion' must both be strings or both be message lists", where=row.where,
                        fix="use one representation per row")
    return SFTExample(_text(row, "prompt"), _text(row, "completion"), where=row.where)


def _messages_sft(row: Row, chat: ChatRenderer) -> SFTExample:
    msgs = _chat(row, "messages")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"the last message must be the assistant's (the completion), got role {msgs[-1]['role']!r}",
                        where=row.where, fix="end each conversation with an assistant message")
    return SFTExample(*chat.split(msgs[:-1], msgs[-1:], row), where=row.where)


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): the shared prefix, cut back to before a whitespace run.

    ``"The sky is blue" / "The sky is bland"`` -> ``("The sky is", " blue", " bland")``.
    """
    cut = len(os.path.commonprefix([chosen, rejected]))
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _preference(row: Row, chat: ChatRenderer, meta: bool = True) -> PreferenceExample:
    c, r = _get(row, "chosen"), _get(row, "rejected")
    has_prompt = "prompt" in row.values
    if _is_chat(c) or _is_chat(r):
        chosen, rejected = _chat(row, "chosen"), _chat(row, "rejected")
        if has_prompt:
            prompt = _chat(row, "prompt")
        else:  # implicit prompt: the leading messages both conversations share
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            if not chosen or not rejected:
                raise DataError("implicit-prompt conversations must differ in their last turn(s): one of chosen / "
                                "rejected is a prefix of the other", where=row.where,
                                fix="add a 'prompt' column or fix the pair")
        prompt_text, chosen_text = chat.split(prompt, chosen, row)
        _, rejected_text = chat.split(prompt, rejected, row)
    else:
        chosen_text, rejected_text = _text(row, "chosen"), _text(row, "rejected")
        if has_prompt:
            prompt_text = _text(row, "prompt")
        else:
            prompt_text, chosen_text, rejected_text = split_common_prefix(chosen_text, rejected_text)
    if not meta:
        return PreferenceExample(prompt_text, chosen_text, rejected_text, where=row.where)
    return PreferenceExample(prompt_text, chosen_text, rejected_text, margin=_margin(row), subset=_subset(row),
                             where=row.where)
