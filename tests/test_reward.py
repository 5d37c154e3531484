"""Reward modelling: Bradley-Terry loss, ensemble aggregation, K-member ensembles end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.algorithms.reward_losses import aggregate, bradley_terry_loss
from pipeline.errors import ConfigError
from pipeline.run import run_pipeline
from tests.conftest import TINY, compose


def test_bradley_terry_matches_closed_form_with_margin_and_centering():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    expect = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expect, rel=1e-6)
    m = torch.tensor([1.0, 0.0])  # margin: the first pair must win by 1 to be "free"
    expect_m = -(math.log(0.5) + math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(rc, rr, margin=m).item() == pytest.approx(expect_m, rel=1e-6)
    c = 0.1
    expect_c = expect + c * ((3.0 ** 2) + (2.0 ** 2)) / 2
    assert bradley_terry_loss(rc, rr, center_coef=c).item() == pytest.approx(expect_c, rel=1e-6)
    w = torch.tensor([1.0, 0.0])  # bootstrap weight 0 drops the second pair
    assert bradley_terry_loss(rc, rr, weights=w).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)


def test_ensemble_aggregations():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])  # 3 members x 2 samples
    assert aggregate(s, "mean").tolist() == [2.0, 0.0]
    assert aggregate(s, "wco").tolist() == [1.0, 0.0]
    var = torch.tensor([2 / 3, 0.0])
    assert torch.allclose(aggregate(s, "uwo", uwo_coef=0.5), torch.tensor([2.0, 0.0]) - 0.5 * var)
    with pytest.raises(ConfigError, match="choose one of: mean, uwo, wco"):
        aggregate(s, "median")


@pytest.mark.slow  # > 20 s: in the slow suite (make test-slow, CI)
def test_three_member_ensemble_trains_distinct_members(tmp_path):
    from pipeline.artifacts import Artifact
    from pipeline.models.reward import RewardScorer
    from pipeline.tasks import build_task

    cfg = compose(TINY + ["pipeline=reward", "reward.ensemble_size=3"], tmp_path)
    res = run_pipeline(cfg)
    assert res["stages"]["eval"]["metrics"]["eval/rm_accuracy/demonstrations"] > 0.7
    art = Artifact.load((Path(cfg.paths.output_dir) / "stages" / "rm").resolve())
    meta = json.loads((art.path / "reward_meta.json").read_text())
    assert meta["members"] == [f"model/member_{k}" for k in range(3)] and len(meta["offsets"]) == 3
    task = build_task(cfg.task)
    ex = task.sft_examples("eval")[:64]
    prompts, completions = [e.prompt for e in ex], [e.completion for e in ex]
    scorer = RewardScorer.from_artifact(art, aggregation="wco")
    members = scorer.member_scores(prompts, completions)
    assert members.shape == (3, len(ex))
    assert not torch.allclose(members[0], members[1])  # bootstrap + head init make members differ
    assert torch.allclose(members.mean(1), torch.zeros(3), atol=1e-4)  # normalised: SFT demos average 0
    assert (scorer.score(prompts, completions) <= members.mean(0) + 1e-6).all()  # worst case <= mean
