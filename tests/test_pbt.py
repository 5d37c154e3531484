"""Population-based training (pipeline/tune/pbt.py) and the schedules it writes (rl.schedule).

One small population (4 members, 3 segments of 2 rollout steps, tiny models) is trained once per
module; the tests read its lineage, replay its schedules as plain runs, and kill a second copy of
the study to resume it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import compose
from pipeline.errors import ConfigError
from pipeline.modules.schedule import parse_schedule
from pipeline.run import run_pipeline
from pipeline.tune import pb2, run_study
from tests.conftest import run_cli, sigkill_when

PIPELINE = ["pipeline=rl_gold", "model.n_layer=1", "model.n_embd=32", "task.num_train_prompts=200",
            "task.num_eval_prompts=16", "sft.batch_size=16", "sft.max_epochs=1", "trainer.enable_progress_bar=false",
            "trainer.num_threads=1", "rl.total_steps=6", "rl.eval_every=2", "rl.prompts_per_step=8",
            "rl.eval_prompts=16", "algorithm.max_new_tokens=8", "eval.num_samples=1", "algorithm.value_init=policy"]
SWEEP = """description: a tiny population
base: []
space:
  algorithm.kl_coef: {type: float, low: 0.02, high: 0.5, log: true}
  rl.optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  algorithm.temperature: [0.7, 0.8, 0.9, 1.0]
objectives: {eval/gold_reward: maximize}
pbt: {method: METHOD, population: 4, segment_steps: 2, quantile: 0.25}
tune: {seeds: [0], test_seeds: [], progress: false}
"""


def write_sweep(directory: Path, method: str = "pbt", name: str = "tiny_pbt") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(SWEEP.replace("METHOD", method))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("pbt")
    t0 = time.time()
    result = run_study(str(write_sweep(root)), overrides=PIPELINE, root=root)
    state = json.loads((result.study_dir / "population.json").read_text())
    return root, result, state, time.time() - t0


def _final(state: dict, member: dict) -> dict:
    return member["segments"][str(state["segments"] - 1)]


def test_population_exploits_and_explores(study):
    root, result, state, seconds = study
    assert state["segment"] == state["segments"] == 3
    assert state["events"], "no member was exploited"
    for e in state["events"]:  # the lineage: who copied whom at which step, and what it explored
        member = state["members"][e["member"]]
        assert e in member["lineage"] and e["copied"] != e["member"]
        assert e["copied_score"] >= e["score"]
        assert e["new"] != e["old"]
        assert {"step": e["step"], "values": e["new"]} in member["schedule"]
        for p, v in e["new"].items():  # explored values stay in their ranges
            if p == "algorithm.kl_coef":
                assert 0.02 <= v <= 0.5
            if p == "algorithm.temperature":
                assert v in (0.7, 0.8, 0.9, 1.0)
        # the exploiting member continued from its partner's checkpoint, but with its own values:
        nxt = str(e["segment"] + 1)
        assert member["segments"][nxt]["start_score"] == e["copied_score"]
        partner = state["members"][e["copied"]]
        if not any(x["member"] == e["copied"] and x["segment"] == e["segment"] for x in state["events"]):
            assert member["segments"][nxt]["score"] != partner["segments"][nxt]["score"]
    rows = (result.study_dir / "population.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 3 and "copied_from" in rows[0]
    summary = json.loads((result.study_dir / "summary.json").read_text())
    assert summary["budget"]["rollout_steps"] == 4 * 6 and summary["exploits"] == len(state["events"])
    assert summary["best"]["reproduces_member"]


def test_replayed_schedule_reproduces_the_members_score(study):
    """The best member's preset (``experiment=<study>_schedule``) and a member with an exploited
    lineage, run as plain pipelines from scratch, end with the recorded results bit for bit."""
    root, result, state, _ = study
    best = result.summary["best"]
    out = root / "outputs" / "runs" / "replay-best"
    proc = run_cli(["--config-dir", str(result.study_dir), "experiment=tiny_pbt_schedule", "force_stages=[rl,eval]",
                    "print_summary=false", f"hydra.run.dir={out}"], cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    replay = json.loads((out / "results.json").read_text())
    member = state["members"][best["member"]]
    recorded = json.loads((Path(_final(state, member)["run_dir"]) / "results.json").read_text())
    assert replay == recorded
    assert replay["stages"]["eval"]["metrics"]["eval/gold_reward"] == best["objectives"]["eval/gold_reward"]

    exploited = max(state["members"], key=lambda m: len(m["schedule"]))
    assert exploited["schedule"]
    schedule = ",".join("{step:%d,overrides:[%s]}" % (e["step"], ",".join(f"'{k}={v!r}'" for k, v in e["values"].items()))
                        for e in exploited["schedule"])
    overrides = PIPELINE + [f"{k}={v!r}" for k, v in exploited["initial"].items()] + [f"rl.schedule=[{schedule}]"]
    cfg = compose(overrides + ["force_stages=[rl,eval]", "print_summary=false"], root=root,
                  output_dir=root / "outputs" / "runs" / "replay-exploited")
    recorded = json.loads((Path(_final(state, exploited)["run_dir"]) / "results.json").read_text())
    assert run_pipeline(cfg) == recorded


@pytest.mark.slow  # ~40 s: a second study in a fresh process
def test_killed_study_resumes_at_the_last_completed_segment(study, tmp_path, caplog):
    """SIGKILL the study's process during segment 1; rerunning the command continues there (no
    segment 0 is trained again) and ends with the same population as the uninterrupted study."""
    _, _, want, _ = study
    sweep = write_sweep(tmp_path)
    state_file = tmp_path / "outputs" / "studies" / "tiny_pbt" / "population.json"

    def segment_1_done() -> bool:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return False
        return state["segment"] >= 1 and any(m["segments"]["1"]["state"] == "done" for m in state["members"])

    sigkill_when(["pipeline.tune", f"sweep={sweep}", *PIPELINE], tmp_path, segment_1_done,
                 what="a member finished segment 1", timeout=300)
    killed = json.loads(state_file.read_text())
    assert killed["segment"] == 1  # killed mid-study
    with caplog.at_level(logging.INFO, logger="pipeline.tune"):
        run_study(str(sweep), overrides=PIPELINE, root=tmp_path)
    claimed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("member ")]
    assert claimed and not any(", segment 0:" in m for m in claimed)  # segment 0 is not trained again
    got = json.loads(state_file.read_text())

    def outcome(state):
        return {"events": state["events"],
                "members": [(m["initial"], m["schedule"], {s: t["score"] for s, t in m["segments"].items()})
                            for m in state["members"]]}

    assert outcome(got) == outcome(want)


# ----------------------------------------------------------------------------- cheap checks
def test_schedule_applies_at_its_step_and_bad_schedules_are_config_errors(study):
    root = study[0]
    sched = "rl.schedule=[{step:2,overrides:['algorithm.kl_coef=0.45','algorithm.cliprange=0.1']}]"
    res = run_pipeline(compose(PIPELINE + ["rl.total_steps=3", "rl.eval_every=0", sched, "print_summary=false"],
                               root=root, output_dir=root / "outputs" / "runs" / "sched"))
    assert res["stages"]["rl"]["metrics"]["policy/kl_coef"] == pytest.approx(0.45)
    with pytest.raises(ConfigError, match="cannot change during training.*did you mean 'algorithm.kl_coef'"):
        parse_schedule([{"step": 1, "overrides": ["algorithm.kl_coeff=0.1"]}], 10)
    with pytest.raises(ConfigError, match="past the last step"):
        parse_schedule([{"step": 10, "overrides": ["algorithm.kl_coef=0.1"]}], 10)
    with pytest.raises(ConfigError, match="expected a number"):
        parse_schedule([{"step": 1, "overrides": ["algorithm.cliprange=wide"]}], 10)
    with pytest.raises(ConfigError, match="cannot change during training"):
        parse_schedule([{"step": 1, "overrides": ["algorithm.ppo_epochs=2"]}], 10)
    assert parse_schedule([{"step": 3, "overrides": ["rl.optim.lr=1e-4"]},
                           {"step": 1, "overrides": ["algorithm.top_k=5"]}]) == [(1, {"algorithm.top_k": 5}),
                                                                                 (3, {"rl.optim.lr": 1e-4})]


@pytest.mark.parametrize("change,match", [
    ("space:\n  algorithm.ppo_epochs: {type: int, low: 1, high: 4}\n", "cannot change during training"),
    ("tune: {seeds: [0, 1], test_seeds: []}\n", "a population trains on one seed"),
    ("pbt: {population: 4, segment_steps: 3}\n", "eval_every"),
])
def test_pbt_settings_are_checked_before_anything_trains(tmp_path, change, match):
    text = SWEEP.replace("METHOD", "pbt")
    key = change.split(":")[0]
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(key + ":"))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    (tmp_path / "bad.yaml").write_text("".join(lines[:start]) + change + "".join(lines[end:]))
    with pytest.raises(ConfigError, match=match):
        run_study(str(tmp_path / "bad.yaml"), overrides=PIPELINE, root=tmp_path)
    assert not (tmp_path / "outputs" / "artifacts").exists()  # nothing trained


def test_pb2_bandit_prefers_the_region_that_improved():
    """GP-UCB on improvements peaking at x=0.8 picks candidates near it; a second pick in the same
    batch (pseudo-observation) goes elsewhere."""
    rng = np.random.default_rng(0)
    x = rng.random((30, 1))
    y = -(x[:, 0] - 0.8) ** 2 + rng.normal(0, 0.01, 30)
    obs = np.hstack([x, np.full((30, 1), 0.5)])
    grid = np.linspace(0, 1, 101)[:, None]
    cands = np.hstack([grid, np.full((101, 1), 0.5)])
    first, second = pb2.choose(obs, y, cands, 2, kappa=0.5)
    assert abs(grid[first, 0] - 0.8) < 0.1
    assert second != first


@pytest.mark.slow  # ~20 s
def test_pb2_population_of_an_online_preference_stage_replays_exactly(tmp_path):
    """PB2 on a Nash-MD stage (nlhf.schedule: beta and the learning rate change between iterations):
    it exploits, and a member with an exploited lineage replays bit for bit."""
    sweep = tmp_path / "nlhf_pb2.yaml"
    sweep.write_text("""description: a tiny Nash-MD population
base: [pipeline=nlhf, algorithm=nash_md]
space:
  algorithm.beta: {type: float, low: 0.02, high: 0.5, log: true}
  nlhf.optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
objectives: {eval/gold_reward: maximize}
pbt: {method: pb2, population: 3, segment_steps: 2}
tune: {seeds: [0], test_seeds: [], progress: false}
""")
    overrides = ["model.n_layer=1", "model.n_embd=32", "task.num_train_prompts=200", "task.num_pref_prompts=200",
                 "task.num_eval_prompts=16", "sft.batch_size=16", "sft.max_epochs=1", "preference_model.max_steps=10",
                 "trainer.enable_progress_bar=false", "trainer.num_threads=1", "nlhf.rounds=6", "nlhf.eval_every=2",
                 "nlhf.prompts_per_step=8", "nlhf.eval_prompts=16", "algorithm.max_new_tokens=8", "eval.num_samples=1"]
    result = run_study(str(sweep), overrides=overrides, root=tmp_path)
    state = json.loads((result.study_dir / "population.json").read_text())
    assert state["stage"] == "nash" and state["events"] and result.summary["best"]["reproduces_member"]
    from pipeline.tune.pbt import Population
    from pipeline.tune.spec import load_spec
    from pipeline.tune.study import Tuner

    tuner = Tuner(load_spec(str(sweep)), overrides, root=tmp_path)
    pop = Population(tuner)
    member = max(state["members"], key=lambda m: len(m["schedule"]))
    recorded = json.loads((Path(_final(state, member)["run_dir"]) / "results.json").read_text())
    replay = run_pipeline(tuner.run_cfg(pop.overrides(member) + ["force_stages=[nash,eval]"], 0, tmp_path / "replay"))
    assert replay == recorded
