"""pipeline.data: loading TRL-format datasets and tokenizing/collating them (fast, offline)."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data import (
    PairCollator,
    PreferenceExample,
    SFTCollator,
    SFTExample,
    load_preference_examples,
    load_sft_examples,
    split_common_prefix,
    tokenize_pairs,
    tokenize_sft,
)
from pipeline.errors import ConfigError, DataError

CORPUS = ["the sky is blue today", "the sky is bland", "what is two plus two? four", "hello there friend",
          "Q: what color is the sky? A: blue", "write a poem about the sea"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def tok():
    t = PreTrainedTokenizerFast(tokenizer_object=_bpe(), eos_token="</s>", pad_token="<pad>")
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def bos_tok():
    """A tokenizer whose post-processor prepends <s> itself."""
    raw = _bpe()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def cfg(path, **kw):
    base = dict(path=str(path), name=None, split="train", format="auto", columns={}, max_samples=None, key="sft.data")
    base.update(kw)
    return SimpleNamespace(**base)


def write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- local formats
def test_jsonl_prompt_completion_with_blank_lines(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "a", "completion": "b"}],
                    blank_lines=True)
    assert load_sft_examples(cfg(f)) == [SFTExample("2+2=", " 4"), SFTExample("a", "b")]


def test_json_array_language_modeling(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "hello there"}, {"text": "friend"}]))
    assert load_sft_examples(cfg(f)) == [SFTExample("", "hello there"), SFTExample("", "friend")]


def test_json_columns_object_and_json_lines_in_json(tmp_path):
    f = tmp_path / "cols.json"
    f.write_text(json.dumps({"prompt": ["a", "b"], "completion": ["x", "y"]}))
    assert load_sft_examples(cfg(f))[1] == SFTExample("b", "y")
    g = write_jsonl(tmp_path / "lines.json", [{"text": "one"}, {"text": "two"}])
    assert [e.completion for e in load_sft_examples(cfg(g))] == ["one", "two"]


def test_csv_explicit_preference_with_margin_and_subset(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('prompt,chosen,rejected,margin,subset\n"Q, really?", yes,no,1.5,math\nhi,a,b,,\n')
    assert load_preference_examples(cfg(f, key="reward.data")) == [
        PreferenceExample("Q, really?", " yes", "no", 1.5, "math"),
        PreferenceExample("hi", "a", "b", None, "default"),
    ]


def test_parquet_prompt_completion_and_max_samples(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2", "p3"], "completion": ["c1", "c2", "c3"]}), f)
    assert load_sft_examples(cfg(f)) == [SFTExample(f"p{i}", f"c{i}") for i in (1, 2, 3)]
    assert len(load_sft_examples(cfg(f, max_samples=2))) == 2


def test_implicit_prompt_preference(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "The sky is blue", "rejected": "The sky is bland"}])
    assert load_preference_examples(cfg(f)) == [PreferenceExample("The sky is", " blue", " bland")]


@pytest.mark.parametrize("chosen,rejected,expected", [
    ("The sky is blue", "The sky is bland", ("The sky is", " blue", " bland")),
    ("A: yes", "A: no", ("A:", " yes", " no")),
    ("A: 4", "A: 42", ("A:", " 4", " 42")),
    ("4", "5", ("", "4", "5")),
    ("Q\n\nA", "Q\n\nB", ("Q", "\n\nA", "\n\nB")),
])
def test_split_common_prefix(chosen, rejected, expected):
    assert split_common_prefix(chosen, rejected) == expected


def test_column_mapping_and_dictconfig(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "why?", "answer": "because", "id": 1}])
    c = OmegaConf.create(dict(path=str(f), name=None, split="train", format="auto",
                              columns={"question": "prompt", "answer": "completion"}, max_samples=None))
    assert load_sft_examples(c) == [SFTExample("why?", "because")]


def test_sft_from_preference_file_uses_chosen(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": " good", "rejected": " bad", "margin": "x"}])
    assert load_sft_examples(cfg(f)) == [SFTExample("p", " good")]


def test_directory_with_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "tr"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "te"}])
    assert load_sft_examples(cfg(tmp_path))[0].completion == "tr"
    assert load_sft_examples(cfg(tmp_path, split="test"))[0].completion == "te"
    with pytest.raises(DataError, match="splits found: test, train"):
        load_sft_examples(cfg(tmp_path, split="validation"))


# ----------------------------------------------------------------------------- conversational
def test_conversational_sft(tmp_path, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = load_sft_examples(cfg(f), tokenizer=tok)
    assert ex.prompt == "<|user|> hi\n<|assistant|>"
    assert ex.completion == " hello\n"
    assert ex.prompt + ex.completion == tok.apply_chat_template(msgs, tokenize=False)


def test_conversational_preference_explicit_and_implicit(tmp_path, tok):
    user = [{"role": "user", "content": "sky?"}]
    good, bad = [{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "green"}]
    f = write_jsonl(tmp_path / "e.jsonl", [{"prompt": user, "chosen": good, "rejected": bad, "subset": "s"}])
    g = write_jsonl(tmp_path / "i.jsonl", [{"chosen": user + good, "rejected": user + bad}])
    want = PreferenceExample("<|user|> sky?\n<|assistant|>", " blue\n", " green\n", None, "s")
    assert load_preference_examples(cfg(f, format="conversational"), tokenizer=tok) == [want]
    assert load_preference_examples(cfg(g), tokenizer=tok) == [PreferenceExample(want.prompt, want.chosen, want.rejected)]


def test_conversational_needs_chat_template(tmp_path, bos_tok):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="chat template") as e:
        load_sft_examples(cfg(f), tokenizer=bos_tok)
    assert "model.chat_template" in str(e.value) and "c.jsonl:1" in str(e.value)


# ----------------------------------------------------------------------------- errors
def test_malformed_jsonl_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "oops",}\n')
    with pytest.raises(DataError) as e:
        load_sft_examples(cfg(f))
    assert f"{f}:3" in str(e.value) and "invalid JSON" in str(e.value)


def test_missing_column_names_column_and_file(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError) as e:
        load_preference_examples(cfg(f, format="preference", key="reward.data"))
    assert "'rejected'" in str(e.value) and "p.jsonl" in str(e.value) and "reward.data" in str(e.value)
    g = write_jsonl(tmp_path / "q.jsonl", [{"chosen": "a", "rejected": "b"}, {"chosen": "a"}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: row has no 'rejected' column"):
        load_preference_examples(cfg(g))


def test_unknown_format_lists_columns(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="columns found: answer, question") as e:
        load_sft_examples(cfg(f))
    assert "sft.data.columns" in str(e.value)


def test_non_string_value_names_row(tmp_path):
    f = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 4}])
    with pytest.raises(DataError, match=r"n\.jsonl:2: column 'completion' must be a string, got int"):
        load_sft_examples(cfg(f))


def test_preference_loading_of_sft_file_is_error(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="needs 'chosen' and 'rejected'"):
        load_preference_examples(cfg(f))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"sft\.data\.path: file not found: .*nope\.jsonl"):
        load_sft_examples(cfg(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_sft_examples(cfg(tmp_path / "empty.jsonl"))


def test_bad_config_values(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match=r"sft\.data\.format"):
        load_sft_examples(cfg(f, format="alpaca"))
    with pytest.raises(ConfigError, match=r"sft\.data\.max_samples"):
        load_sft_examples(cfg(f, max_samples=0))


def test_offline_hub_name(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        load_sft_examples(cfg("some-owner/some-dataset-that-is-not-cached"))
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert "not a local file" in msg and "offline" in msg and "unset HF_HUB_OFFLINE" in msg


# ----------------------------------------------------------------------------- tokenization
def test_tokenize_sft_completion_only_mask(tok):
    ex = [SFTExample("Q: what color is the sky? A:", " blue"), SFTExample("", "hello there")]
    rows = tokenize_sft(ex, tok, max_length=64)
    p = tok("Q: what color is the sky? A:", add_special_tokens=False)["input_ids"]
    c = tok(" blue", add_special_tokens=False)["input_ids"]
    assert rows[0]["input_ids"] == p + c + [tok.eos_token_id]
    assert rows[0]["labels"] == [-100] * len(p) + c + [tok.eos_token_id]
    assert rows[1]["labels"] == rows[1]["input_ids"]  # empty prompt: everything is trained on
    full = tokenize_sft(ex[:1], tok, max_length=64, completion_only=False)
    assert full[0]["labels"] == full[0]["input_ids"]


def test_tokenize_sft_bos_only_if_tokenizer_adds_it(bos_tok):
    (row,) = tokenize_sft([SFTExample("the sky", " is blue")], bos_tok, max_length=64)
    assert row["input_ids"][0] == bos_tok.bos_token_id and row["input_ids"].count(bos_tok.bos_token_id) == 1
    assert row["labels"][0] == -100
    (row,) = tokenize_sft([SFTExample("<s>the sky", " is blue")], bos_tok, max_length=64)  # template already has it
    assert row["input_ids"].count(bos_tok.bos_token_id) == 1


def test_tokenize_sft_truncation_and_long_prompts(tok):
    ex = SFTExample("the sky is blue today", " hello there friend")
    n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    (row,) = tokenize_sft([ex], tok, max_length=n_prompt + 2)
    assert len(row["input_ids"]) == n_prompt + 2 and row["input_ids"][-1] != tok.eos_token_id
    with pytest.raises(DataError, match=r"example 1: the prompt is \d+ tokens") as e:
        tokenize_sft([SFTExample("a", "b"), ex], tok, max_length=n_prompt, where="sft.data")
    assert "raise model.max_length or shorten prompts" in str(e.value)
    rows = tokenize_sft([SFTExample("a", "b"), ex], tok, max_length=n_prompt, on_long_prompt="drop")
    assert len(rows) == 1


def test_sft_collator_pads_right(tok):
    rows = tokenize_sft([SFTExample("the sky", " is blue today"), SFTExample("hi", "!")], tok, max_length=64)
    b = SFTCollator(tok.pad_token_id)(rows)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert b["input_ids"].shape == (2, max(n0, n1))
    assert b["attention_mask"].sum(1).tolist() == [n0, n1]
    short = 1 if n1 < n0 else 0
    n = min(n0, n1)
    assert (b["input_ids"][short, n:] == tok.pad_token_id).all() and (b["labels"][short, n:] == -100).all()
    assert b["attention_mask"][short, :n].all()


def test_tokenize_pairs_and_pair_collator(tok):
    ex = [PreferenceExample("the sky is", " blue today", " bland", margin=2.0, subset="s"),
          PreferenceExample("hi", " there friend", " friend")]
    rows = tokenize_pairs(ex, tok, max_length=64)
    eos = tok.eos_token_id
    assert all(r["chosen_input_ids"][-1] == eos and r["rejected_input_ids"][-1] == eos for r in rows)
    n_prompt = len(tok("the sky is", add_special_tokens=False)["input_ids"])
    assert rows[0]["chosen_input_ids"][:n_prompt] == tok("the sky is", add_special_tokens=False)["input_ids"]
    assert [r["index"] for r in rows] == [0, 1]
    b = PairCollator(tok.pad_token_id)(rows)
    lengths = [len(r[k]) for r in rows for k in ("chosen_input_ids", "rejected_input_ids")]
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, max(lengths))
    for side in ("chosen", "rejected"):
        ids, mask = b[f"{side}_input_ids"], b[f"{side}_attention_mask"]
        last = mask.sum(1) - 1  # right padding: the last real token is at mask.sum - 1 ...
        assert (ids[torch.arange(2), last] == eos).all()  # ... and it is the EOS
        assert (ids[mask == 0] == tok.pad_token_id).all()
    assert b["margin"].tolist() == [2.0, 0.0] and b["subset"] == ["s", "default"] and b["index"].tolist() == [0, 1]
    # truncation keeps the EOS
    (r,) = tokenize_pairs(ex[:1], tok, max_length=n_prompt + 2)
    assert len(r["chosen_input_ids"]) == n_prompt + 2 and r["chosen_input_ids"][-1] == eos
    with pytest.raises(DataError, match="example 0"):
        tokenize_pairs(ex[:1], tok, max_length=n_prompt + 1)
