"""Stages as composable units: every config composes, per-stage settings, typed inputs,
typed task options, old names give the new ones. Mostly composition only (fast); one test
runs a small five-algorithm pipeline to check reuse when one stage's settings change."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import CONF_DIR, compose
from pipeline.errors import ConfigError
from pipeline.run import plan, run_pipeline
from tests.conftest import ROOT, TINY, run_cli

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
#: options that need a value the default config cannot supply (algorithm presets for another
#: stage kind than the default pipeline's rl stage: a pipeline with such a stage)
NEEDS = {("model", "pretrained"): ["model.name_or_path=some-org/some-model"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _schema(preset: str) -> str:
    """The algorithm_schema an algorithm preset composes (rl, nlhf, ...)."""
    text = (CONF_DIR / "algorithm" / f"{preset}.yaml").read_text()
    return re.search(r"/algorithm_schema@_here_: (\w+)", text).group(1)


NEEDS.update({("algorithm", o): ["pipeline=nlhf"] for o in _options("algorithm") if _schema(o) == "nlhf"})


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])], root=tmp_path)
    stages = plan(cfg)  # schema, stage graph, typed inputs, every stage's validate(), fingerprints
    assert [s.name for s in stages] == [s.name for s in cfg.pipeline.stages]


@pytest.mark.parametrize("preset", _options("experiment"))
def test_every_experiment_preset_composes_and_validates(preset, tmp_path):
    plan(compose([f"experiment={preset}"], root=tmp_path))


@pytest.mark.parametrize("marker,schema,cols", [
    ("algorithm-table", "rl", ["advantage_estimator", "kl_penalty", "kl_estimator", "kl_coef", "num_generations",
                               "ppo_epochs", "num_mini_batches"]),
    ("nlhf-table", "nlhf", ["loss", "update_rule", "beta", "mixture_coef", "eta", "inner_steps", "num_generations"]),
])
def test_readme_algorithm_tables_match_the_presets(marker, schema, cols, tmp_path):
    """The README's algorithm tables state each preset's numbers: they must be the configs' numbers."""
    text = (ROOT / "README.md").read_text()
    table = text.split(f"<!-- {marker} -->")[1]
    rows = [r for r in table.splitlines() if r.startswith("| `") and "algorithm=" not in r]
    seen = set()
    for row in rows:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        name = cells[0]
        a = compose([f"algorithm={name}"], root=tmp_path).algorithm
        for col, cell in zip(cols, cells[1:len(cols) + 1]):
            want = str(getattr(a, col))
            assert cell in (want, "-") and (cell != "-" or col in ("mixture_coef", "eta", "inner_steps")), \
                f"README says {name}.{col}={cell}, conf/algorithm says {want}"
        seen.add(name)
    assert seen == {o for o in _options("algorithm") if _schema(o) == schema}


# ----------------------------------------------------------------------------- per-stage settings
def _stage_cfgs(tmp_path, overrides):
    return {s.name: s for s in plan(compose(["pipeline=compare_rl", *overrides], root=tmp_path))}


def test_compare_rl_gives_each_stage_its_algorithm(tmp_path):
    st = _stage_cfgs(tmp_path, [])
    assert {n: st[n].cfg.algorithm.name for n in ("ppo", "grpo", "rloo", "remax", "reinforce_pp")} == \
        {n: n for n in ("ppo", "grpo", "rloo", "remax", "reinforce_pp")}
    assert st["grpo"].cfg.algorithm.kl_estimator == "k3" and st["ppo"].cfg.algorithm.kl_estimator == "k1"
    assert st["remax"].cfg.rl.prompts_per_step == 64 and st["ppo"].cfg.rl.prompts_per_step == 16
    # stages without settings of their own share the run's config and fingerprints are distinct
    assert st["sft"].cfg is st["rm"].cfg
    assert len({s.fingerprint for s in st.values()}) == len(st)


def test_command_line_key_applies_to_every_stage_and_targeting_one_stage_wins(tmp_path):
    st = _stage_cfgs(tmp_path, ["algorithm.kl_coef=0.3", "stages.grpo.algorithm.kl_coef=0.07",
                                "stages.rloo.rl.total_steps=7"])
    assert [st[n].cfg.algorithm.kl_coef for n in ("ppo", "rloo", "remax", "reinforce_pp")] == [0.3] * 4
    assert st["grpo"].cfg.algorithm.kl_coef == 0.07
    assert st["rloo"].cfg.rl.total_steps == 7 and st["ppo"].cfg.rl.total_steps == 50
    # a command-line key beats a stage's own file setting (remax sets rl.prompts_per_step=64)
    st = _stage_cfgs(tmp_path, ["rl.prompts_per_step=8"])
    assert st["remax"].cfg.rl.prompts_per_step == 8 and st["ppo"].cfg.rl.prompts_per_step == 8


def test_stage_group_choice_on_the_command_line(tmp_path):
    st = _stage_cfgs(tmp_path, ["stages.ppo.algorithm=rloo"])
    assert st["ppo"].cfg.algorithm.name == "rloo" and st["ppo"].cfg.algorithm.num_generations == 4
    assert st["grpo"].cfg.algorithm.name == "grpo"
    # a group chosen on the command line beats the pipeline file's choices (command line beats files) ...
    st = _stage_cfgs(tmp_path, ["algorithm=grpo"])
    assert {st[n].cfg.algorithm.name for n in ("ppo", "grpo", "rloo", "remax", "reinforce_pp")} == {"grpo"}
    assert st["remax"].cfg.rl.prompts_per_step == 64  # the stage's own keys still apply
    # ... and targeting one stage beats both
    st = _stage_cfgs(tmp_path, ["algorithm=grpo", "stages.ppo.algorithm=ppo"])
    assert st["ppo"].cfg.algorithm.name == "ppo" and st["rloo"].cfg.algorithm.name == "grpo"


def test_changing_one_stage_changes_only_its_fingerprint_and_downstream(tmp_path):
    base = {n: s.fingerprint for n, s in _stage_cfgs(tmp_path, []).items()}
    moved = {n: s.fingerprint for n, s in _stage_cfgs(tmp_path, ["stages.grpo.algorithm.kl_coef=0.02"]).items()}
    assert {n for n in base if base[n] != moved[n]} == {"grpo", "eval"}


@pytest.mark.parametrize("override,where,fragment", [
    ("stages.grpoo.algorithm.kl_coef=0.1", "stages.grpoo", "no stage named 'grpoo' in pipeline 'compare_rl' "
                                                           "(did you mean 'grpo'?)"),
    ("stages.grpo.algorithm.kl_cof=0.1", "stages.grpo.algorithm.kl_cof", "has no key 'kl_cof' (did you mean 'kl_coef'?)"),
    ("stages.grpo.algorithm.kl_coef=abc", "stages.grpo.algorithm.kl_coef", "ValidationError"),
    ("pipeline.stages.3.overrides=['pipeline=default']", "pipeline.stages[3] (grpo).overrides", "run-wide setting"),
    ("pipeline.stages.3.overrides=['algorithm=nope']", "pipeline.stages[3] (grpo).overrides", "nope"),
])
def test_bad_stage_settings_are_clear_errors(override, where, fragment, tmp_path):
    with pytest.raises(ConfigError) as err:
        plan(compose(["pipeline=compare_rl", override], root=tmp_path))
    assert err.value.where == where and fragment in err.value.message, err.value.render()


def test_a_config_edited_after_composing_cannot_recompose_its_stages(tmp_path):
    cfg = compose(["pipeline=compare_rl"], root=tmp_path)
    cfg.seed = 5  # not in cfg.overrides: the grpo stage could not be composed on top of it
    with pytest.raises(ConfigError, match="changed after composing"):
        plan(cfg)
    cfg = compose(["pipeline=rm_eval"], root=tmp_path)
    cfg.seed = 5  # no stage with settings of its own: editing is fine
    assert plan(cfg)[0].cfg.seed == 5


@pytest.mark.slow  # > 20 s: in the slow suite (make test-slow, CI)
def test_compare_rl_runs_reuses_and_reruns_only_the_changed_stage(tmp_path):
    small = TINY + ["pipeline=compare_rl", "rl.total_steps=2", "rl.eval_every=0", "rl.log_completions_every=0",
                    "task.num_eval_prompts=8", "eval.num_samples=1", "eval.max_new_tokens=8"]
    first = run_pipeline(compose(small, root=tmp_path, output_dir=tmp_path / "runs" / "a"))
    ev = json.loads((tmp_path / "runs" / "a" / "stages" / "eval" / "evaluation.json").read_text())
    assert list(ev["policies"]) == ["sft", "ppo", "grpo", "rloo", "remax", "reinforce_pp"]
    assert ev["reference"] == "sft" and "rm" in ev["reward_models"]
    assert all(k in ev["policies"]["grpo"] for k in ("gold_reward", "gold_reward_ci95", "proxy_reward", "kl"))
    manifest = json.loads((tmp_path / "runs" / "a" / "stages" / "grpo" / "manifest.json").read_text())
    assert manifest["config"]["algorithm"]["name"] == "grpo" and manifest["overrides"] == ["algorithm=grpo"]

    again = run_pipeline(compose(small, root=tmp_path, output_dir=tmp_path / "runs" / "b"))
    assert again == first
    info = json.loads((tmp_path / "runs" / "b" / "run.json").read_text())
    assert all(s["reused"] for s in info["stages"].values())

    run_pipeline(compose(small + ["stages.grpo.algorithm.kl_coef=0.02"], root=tmp_path,
                         output_dir=tmp_path / "runs" / "c"))
    info = json.loads((tmp_path / "runs" / "c" / "run.json").read_text())
    assert {n for n, s in info["stages"].items() if not s["reused"]} == {"grpo", "eval"}


# ----------------------------------------------------------------------------- typed inputs
@pytest.mark.parametrize("inputs,where,fragment", [
    ({"policy": "sft", "reward": "sft"}, "pipeline.stages[2] (rl).inputs.reward",
     "stage 'sft' (kind sft) publishes a policy, but 'reward' of a rl stage accepts reward model"),
    ({"polcy": "sft", "reward": "rm"}, "pipeline.stages[2] (rl).inputs.polcy",
     "stage kind 'rl' has no input 'polcy' (did you mean 'policy'?)"),
    ({"policy": ["sft", "sft"], "reward": "rm"}, "pipeline.stages[2] (rl).inputs.policy", "takes one stage"),
    ({"reward": "rm"}, "pipeline.stages[2] (rl).inputs", "needs an input 'policy'"),
])
def test_typed_inputs_are_checked_before_anything_runs(inputs, where, fragment, tmp_path):
    cfg = compose([], root=tmp_path)
    cfg.pipeline.stages[2].inputs = inputs
    with pytest.raises(ConfigError) as err:
        run_pipeline(cfg)
    assert err.value.where == where and fragment in err.value.message, err.value.render()
    assert not (tmp_path / "outputs").exists()


def test_reference_must_be_a_policy(tmp_path):
    with pytest.raises(ConfigError) as err:
        plan(compose(["pipeline.stages.3.inputs.reference=rm"], root=tmp_path))
    assert "publishes a reward model, but 'reference' of a evaluate stage accepts policy" in err.value.message


# ----------------------------------------------------------------------------- typed task options
def test_task_options_are_typed_with_defaults_written_once(tmp_path):
    from pipeline.tasks.lexicon import LexiconOptions

    cfg = compose([], root=tmp_path)
    assert cfg.task.options.max_words == LexiconOptions.max_words  # from the dataclass, not a YAML copy
    assert compose(["task=arithmetic"], root=tmp_path).task.options.operators == "+"
    assert compose(["task.options.max_words=20"], root=tmp_path).task.options.max_words == 20
    for bad in ("task.options.max_word=20", "task.options.max_words=many"):
        with pytest.raises(Exception, match="max_word"):
            compose([bad], root=tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'max_words'"):  # Hydra lets `+` add it: checked up front
        plan(compose(["+task.options.max_word=20"], root=tmp_path))


def test_task_options_typo_from_python_names_the_closest_option():
    from types import SimpleNamespace

    from pipeline.tasks import build_task

    cfg = SimpleNamespace(name="lexicon", seed=1, num_train_prompts=4, num_pref_prompts=4, num_eval_prompts=4,
                          bt_beta=4.0, label_noise=0.0, demo_quality=0.3, options={"max_word": 3})
    with pytest.raises(ConfigError) as err:
        build_task(cfg)
    assert err.value.where == "task.options.max_word" and "did you mean 'max_words'" in err.value.message
    with pytest.raises(ConfigError, match="operators"):
        build_task(SimpleNamespace(**{**vars(cfg), "name": "arithmetic", "options": {"operators": "+/"}}))


# ----------------------------------------------------------------------------- renamed names
def test_old_names_say_the_new_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"'policy.total_steps' was renamed 'rl.total_steps'"):
        compose(["policy.total_steps=5"], root=tmp_path)
    with pytest.raises(ConfigError, match="stage kind 'policy' was renamed 'rl'"):
        plan(compose(["pipeline.stages.2.kind=policy"], root=tmp_path))
    proc = run_cli(["policy.optim.lr=0.1"], tmp_path)
    assert proc.returncode == 2 and "was renamed 'rl.optim.lr'" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"fix: write rl\.optim\.lr=0\.1", proc.stderr)


def test_layering_nothing_below_stages_imports_them():
    """algorithms <- models/rollout/data <- modules <- stages <- run, tune: no import runs back up."""
    pkg = ROOT / "pipeline"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        text = path.read_text()
        if rel.startswith("stages/"):
            others = re.findall(r"from pipeline\.stages\.(\w+) import", text)
            assert set(others) <= {"base"}, f"{rel} imports another stage module: {others}"
        elif rel not in ("run.py",) and not rel.startswith("tune/"):  # the tuner drives stages (PBT)
            assert not re.search(r"(from|import) pipeline\.stages", text), f"{rel} imports pipeline.stages"
        if rel.startswith("algorithms/"):
            assert not re.search(r"from pipeline\.(modules|models|rollout|data|stages|run)", text), rel
