"""Bad inputs fail with one clear message (key / file / line + fix), no traceback, nothing published.

Most cases run in-process (``run_pipeline`` raises :class:`PipelineError`); a few go
through the CLI, which must exit non-zero with the message on stderr and no traceback.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, DataError, PipelineError, TrainingError
from pipeline.run import run_pipeline
from tests.conftest import compose, run_cli

#: tiny model and data: a stage that is reached trains in about a second
FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
    "task.num_train_prompts=64", "task.num_pref_prompts=64", "task.num_eval_prompts=8",
    "sft.max_epochs=1", "sft.batch_size=16", "reward.max_steps=2", "reward.batch_size=16",
    "eval.num_samples=1", "eval.max_new_tokens=8",
    "trainer.enable_progress_bar=false", "print_summary=false",
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    pc = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in "red green blue cat dog sun moon tree".split()]
    return {
        "pc": _jsonl(d / "pc.jsonl", pc),
        "qa": _jsonl(d / "qa.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in pc]),
        "row3_lacks_completion": _jsonl(d / "partial.jsonl", pc[:2] + [{"prompt": "say x:"}] + pc[2:]),
        "malformed_line2": _jsonl(d / "bad.jsonl", [pc[0], '{"prompt": "say x:", "completion": ', pc[1]]),
        "empty": _jsonl(d / "empty.jsonl", ["", "   "]),
        "long_prompt_line2": _jsonl(d / "long.jsonl", [pc[0], {"prompt": "word " * 300, "completion": " x"}] + pc[1:]),
    }


def _published(root: Path) -> list[str]:
    arts = root / "outputs" / "artifacts"
    return sorted(p.name for p in arts.iterdir() if not p.name.startswith(".")) if arts.is_dir() else []


def _assert_nothing_left(root: Path, failing_kind: str) -> None:
    assert not [n for n in _published(root) if n.startswith(f"{failing_kind}-")], _published(root)
    tmp = root / "outputs" / "artifacts" / ".tmp"
    assert not tmp.is_dir() or not any(tmp.iterdir()), list(tmp.iterdir())
    assert not list((root / "outputs").rglob("results.json"))


def _fails(root: Path, overrides: list[str], exc: type = PipelineError) -> PipelineError:
    with pytest.raises(exc) as info:
        run_pipeline(compose(FAST + overrides, root))
    return info.value


# --------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("case", ["missing", "unknown_columns", "row_lacks_column", "format_mismatch",
                                  "malformed_line", "empty", "long_prompt"])
def test_bad_sft_data(case, data, tmp_path):
    path, extra, expect = {
        "missing": ("/nope.jsonl", [], ["sft.data.path", "file not found: /nope.jsonl", "fix: check sft.data.path"]),
        "unknown_columns": (data["qa"], [], [f"{data['qa']} (sft.data)", "columns found: answer, question",
                                             "fix: rename columns with sft.data.columns"]),
        "row_lacks_column": (data["row3_lacks_completion"], [],
                             [f"{data['row3_lacks_completion']}:3", "no 'completion' column", "fix:"]),
        "format_mismatch": (data["pc"], ["sft.data.format=preference"],
                            [f"{data['pc']} (sft.data)", "format 'preference' needs column(s) 'chosen', 'rejected'",
                             "columns: completion, prompt", "fix:"]),
        "malformed_line": (data["malformed_line2"], [], [f"{data['malformed_line2']}:2", "invalid JSON",
                                                          "fix: each non-blank line must be one complete JSON object"]),
        "empty": (data["empty"], [], ["sft.data.path", f"dataset is empty: no rows in {data['empty']}", "fix:"]),
        "long_prompt": (data["long_prompt_line2"], [],
                        [f"{data['long_prompt_line2']}:2", "the prompt is", "model.max_length=64",
                         "fix: raise model.max_length or shorten prompts", "sft.data.on_long_prompt=drop"]),
    }[case]
    err = _fails(tmp_path, ["pipeline=sft", f"sft.data.path={path}"] + extra, DataError)
    msg = str(err)
    for fragment in expect:
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"
    assert err.fix
    _assert_nothing_left(tmp_path, "sft")


def test_long_prompts_can_be_dropped_instead(data, tmp_path):
    res = run_pipeline(compose(FAST + ["pipeline=sft", f"sft.data.path={data['long_prompt_line2']}",
                                       "sft.data.on_long_prompt=drop", "sft.data.eval_fraction=0"], tmp_path))
    assert res["stages"]["sft"]["metrics"]["train/examples"] == 8  # 9 rows, the long one dropped


def test_preference_stage_on_a_prompt_completion_file(data, tmp_path):
    err = _fails(tmp_path, ["pipeline=rm_eval", f"reward.data.path={data['pc']}"], DataError)
    assert f"{data['pc']} (reward.data)" in str(err)
    assert "preference training needs 'chosen' and 'rejected' columns" in str(err)
    assert "reward.data.columns" in err.fix
    _assert_nothing_left(tmp_path, "reward")
    assert _published(tmp_path) == []  # checked before SFT trained (fail fast), not after


RM_ONLY = "pipeline.stages=[{name: rm, kind: reward}, {name: eval, kind: evaluate, inputs: {reward: rm}}]"


@pytest.mark.parametrize("key,kind,extra", [
    ("model.name_or_path", "sft", ["pipeline=sft"]),
    ("reward.model.name_or_path", "reward", [RM_ONLY, "reward.init_from=model"]),  # its own tokenizer too
])
def test_hub_model_while_offline(key, kind, extra, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _fails(tmp_path, extra + [f"{key}=some-org/some-model"], ConfigError)
    assert err.where == key
    assert "'some-org/some-model' is not a local directory" in err.message and "HF_HUB_OFFLINE=1" in err.message
    assert "pass a local directory" in err.fix
    _assert_nothing_left(tmp_path, kind)


def test_hub_dataset_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = _fails(tmp_path, ["pipeline=sft", "sft.data.path=some-org/some-dataset"], DataError)
    assert err.where == "sft.data.path"
    assert "'some-org/some-dataset'" in err.message and "offline mode" in err.message
    assert "pass the local path" in err.fix
    _assert_nothing_left(tmp_path, "sft")


def test_non_finite_loss_stops_the_stage(tmp_path):
    err = _fails(tmp_path, ["pipeline=sft", "sft.optim.lr=1e30", "sft.optim.warmup_ratio=0"], TrainingError)
    assert err.where == "sft" and "loss became" in err.message
    assert "lower sft.optim.lr" in err.fix
    _assert_nothing_left(tmp_path, "sft")


@pytest.mark.parametrize("override,where,fragment", [
    ("pipeline.stages.0.kind=sftt", "pipeline.stages[0].kind",
     "unknown stage kind 'sftt' (did you mean 'sft'?); choose one of:"),
    ("pipeline.stages.1.inputs.policy=eval", "pipeline.stages[1] (rm).inputs.policy",
     "input policy='eval' does not name an earlier stage"),
])
def test_bad_stage_graph_fails_before_anything_runs(override, where, fragment, tmp_path):
    err = _fails(tmp_path, ["pipeline=rm_eval", override], ConfigError)
    assert err.where == where and fragment in err.message
    assert not (tmp_path / "outputs").exists()  # validated before any directory is made


# --------------------------------------------------------------------------- CLI
def _cli_fails(args: list[str], cwd: Path, code: int, *fragments: str) -> str:
    proc = run_cli(FAST + args, cwd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    err = " ".join(proc.stderr.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in stderr:\n{proc.stderr}"
    return proc.stderr


def test_cli_missing_data_file(tmp_path):
    stderr = _cli_fails(["pipeline=sft", "sft.data.path=/nope.jsonl"], tmp_path, 2,
                        "error: sft.data.path: file not found: /nope.jsonl", "fix: check sft.data.path")
    assert stderr.count("error:") == 1
    _assert_nothing_left(tmp_path, "sft")


def test_cli_malformed_jsonl_names_the_line(data, tmp_path):
    _cli_fails(["pipeline=sft", f"sft.data.path={data['malformed_line2']}"], tmp_path, 2,
               f"error: {data['malformed_line2']}:2: invalid JSON")
    _assert_nothing_left(tmp_path, "sft")


@pytest.mark.parametrize("override,fragments", [
    ("sft.lrr=1", ["error: sft.lrr: sft has no key 'lrr'", "fix: check the spelling"]),
    ("sft.optim.lrr=1", ["sft.optim has no key 'lrr' (did you mean 'lr'?)"]),
    ("sft.batch_size=abc", ["error: sft.batch_size: Value 'abc' of type 'str' could not be converted to Integer"]),
    ("algorithm=pppo", ["no option 'pppo' in group 'algorithm' (did you mean 'ppo'?)"]),
])
def test_cli_unknown_key_or_wrong_type_fails_at_compose_time(override, fragments, tmp_path):
    """Config mistakes exit like every other user error: code 2, one message, the closest valid name."""
    stderr = _cli_fails([override], tmp_path, 2, *fragments)
    assert stderr.count("error:") == 1
    assert not (tmp_path / "outputs").exists()
