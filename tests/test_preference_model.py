"""Pairwise preference model: learns a cyclic preference no reward model can represent, is
antisymmetric by construction, reports held-out accuracy and calibration; the evaluation
statistics it uses (ECE, paired win rates with CIs) against closed forms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import Artifact
from pipeline.data import tokenize_comparisons
from pipeline.errors import ConfigError
from pipeline.evaluation import expected_calibration_error, paired_win_rate, win_rate_matrix
from pipeline.models.preference import PreferenceScorer
from pipeline.run import plan, run_pipeline
from tests.conftest import INTRANSITIVE, compose

MOVES = [" rock .", " scissors .", " paper ."]


@pytest.fixture(scope="module")
def pm_run(intransitive_root):
    cfg = compose(INTRANSITIVE + ["pipeline=preference_model"], intransitive_root, "pm")
    results = run_pipeline(cfg)
    run_dir = Path(cfg.paths.output_dir)
    return results, run_dir


@pytest.fixture(scope="module")
def scorer(pm_run):
    _, run_dir = pm_run
    return PreferenceScorer.from_artifact(Artifact.load((run_dir / "stages" / "pm").resolve()))


def test_learns_the_cycle_with_calibrated_held_out_probabilities(pm_run):
    results, run_dir = pm_run
    m = results["stages"]["pm"]["metrics"]
    assert m["val/accuracy"] > 0.8 and m["val/ece"] < 0.15 and m["val/gold_mae"] < 0.2, m
    ev = json.loads((run_dir / "stages" / "eval" / "evaluation.json").read_text())["preference_models"]["pm"]
    # every edge of rock-paper-scissors (a reward model can get at most two of the three right)
    assert ev["by_subset"]["cycle"] > 0.9 and ev["by_subset"]["same_class"] > 0.8, ev
    assert 0 <= ev["ece"] < 0.15 and ev["gold_mae"] < 0.2
    assert results["stages"]["eval"]["metrics"]["eval/pm_accuracy"] == ev["accuracy"]


def test_the_learned_preference_is_cyclic(scorer):
    p = scorer.preference(["move against bo :"] * 3, MOVES, MOVES[1:] + MOVES[:1])  # r>s, s>p, p>r
    assert bool((p > 0.8).all()), p


def test_antisymmetric_by_construction(scorer):
    a = [" rock boldly .", " paper", " scissors calmly gently .", " rock paper", " lizard ."]
    b = [" paper .", " paper quickly .", " rock", " rock rock .", " scissors"]
    prompts = ["move against ana :"] * len(a)
    p_ab, p_ba = scorer.preference(prompts, a, b), scorer.preference(prompts, b, a)
    assert torch.allclose(p_ab + p_ba, torch.ones_like(p_ab), atol=1e-6)
    assert torch.allclose(scorer.preference(prompts, a, a), torch.full((len(a),), 0.5), atol=1e-6)


def test_both_orders_hold_the_same_tokens_under_truncation(scorer):
    tok = scorer.tokenizer
    ab, ba = tokenize_comparisons(["move against bo :"], [" rock boldly calmly ." * 5], [" paper ."], tok, max_length=16)
    assert len(ab[0]) == len(ba[0]) <= 16 and sorted(ab[0]) == sorted(ba[0])
    assert ab[0].count(tok.eos_token_id) == 2


def test_needs_its_backbone(tmp_path):
    cfg = compose(["pipeline=preference_model", "~pipeline.stages.1.inputs.policy"], tmp_path)
    with pytest.raises(ConfigError, match="has no `policy` input"):
        plan(cfg)


def test_expected_calibration_error_closed_form():
    # predictions 0.9 (right 9 times in 10) and 0.7 (right 7 in 10): perfectly calibrated
    p = torch.tensor([0.9] * 10 + [0.7] * 10, dtype=torch.float64)
    wins = torch.tensor([1] * 9 + [0] + [1] * 7 + [0] * 3)
    assert expected_calibration_error(p, wins) == pytest.approx(0.0, abs=1e-12)
    # always 0.9 but right half the time: |0.5 - 0.9| = 0.4; a prediction below ½ is judged on the other label
    assert expected_calibration_error(torch.full((4,), 0.9, dtype=torch.float64), torch.tensor([1, 0, 1, 0])) == \
        pytest.approx(0.4)
    assert expected_calibration_error(torch.tensor([0.2, 0.2], dtype=torch.float64), torch.tensor([0, 0])) == \
        pytest.approx(0.2)


def test_paired_win_rate_interval_is_over_prompts():
    # 4 prompts x 2 samples: per-prompt means 1, 0, 0.5, 0.5
    pref = torch.tensor([1, 1, 0, 0, 1, 0, 0.5, 0.5], dtype=torch.float64)
    group = torch.arange(4).repeat_interleave(2)
    mean, ci = paired_win_rate(pref, group)
    per_prompt = torch.tensor([1, 0, 0.5, 0.5], dtype=torch.float64)
    assert mean == pytest.approx(0.5) and ci == pytest.approx(1.96 * float(per_prompt.std()) / 2)
    # antisymmetric matrix, each unordered pair judged once
    calls = []

    def pref_fn(prompts, a, b):
        calls.append(1)
        return [0.8 if x > y else 0.2 if x < y else 0.5 for x, y in zip(a, b)]

    m = win_rate_matrix(["p"] * 4, {"A": ["2"] * 4, "B": ["1"] * 4, "C": ["1", "3", "1", "3"]},
                        torch.arange(4), pref_fn)
    assert len(calls) == 3
    assert m["A"]["B"]["mean"] == pytest.approx(0.8) and m["B"]["A"]["mean"] == pytest.approx(0.2)
    assert m["A"]["C"]["mean"] == pytest.approx(0.5) and m["C"]["A"]["ci95"] == m["A"]["C"]["ci95"] > 0
