"""Reports (python -m pipeline.report): a real tiny run, a real Hydra multirun and a real tiny study
(one shared artifact cache, SFT and reward model trained once), a synthetic two-objective study with
known trials, damaged run directories; the pages checked in headless Chromium."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.report import kind_of, latest, make_report
from tests.conftest import compose
from tests.report_helpers import TRIALS, hparams_session, make_study_dir
from tests.tune_helpers import BASE, write_sweep

#: the default pipeline at tune-test size, with the held-out curve and training completions logged
RUN = BASE + ["rl.log_completions_every=2", "eval.num_samples=2", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "print_summary=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def run_dir(root) -> Path:
    from pipeline.run import run_pipeline

    cfg = compose(RUN, root, run="2026-01-01/12-00-00-000000")
    run_pipeline(cfg)
    return Path(cfg.paths.output_dir)


@pytest.fixture(scope="module")
def multirun_dir(root, run_dir) -> Path:
    """A real Hydra multirun (2 jobs, SFT and RM from the cache), with TensorBoard HParams."""
    env = dict(os.environ, PIPELINE_ROOT=str(root), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", *RUN, "logger=tensorboard",
                           "algorithm.kl_coef=0.05,0.3"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (d,) = list((root / "outputs" / "multirun").glob("*/*"))
    return d


@pytest.fixture(scope="module")
def study_dir(root, run_dir) -> Path:
    """A real study: 3 trials on one tuning seed, a pruner that watches the held-out curve but never
    prunes (intermediate values recorded, every trial complete), one test seed; TensorBoard on (HParams
    per trial). Pruned trials are drawn in the synthetic study below."""
    from pipeline.tune import run_study

    path = write_sweep(root, "rep", base=["logger=tensorboard"],
                       space={"algorithm.kl_coef": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
                              "rl.optim.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True},
                              "algorithm.kl_estimator": ["k1", "k3"]},
                       tune={"n_trials": 3, "seeds": [0], "test_seeds": [5],
                             "pruner": {"name": "median", "options": {"n_startup_trials": 100}}})
    return run_study(str(path), root=root).study_dir


def _html(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _self_contained(html: str) -> None:
    """No request leaves the file: no http(s) / protocol-relative URL in src / href, no script."""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script" not in html and "@import" not in html
    assert "Content-Security-Policy" in html


def _figures_match_files(report: Path, html: str) -> int:
    """Every embedded figure is also a PNG file next to report.html (same bytes), and nothing else is."""
    images = _images(html)
    files = sorted(report.parent.glob("*.png"))
    assert len(images) == len(files) and images
    assert sorted(images) == sorted(f.read_bytes() for f in files)
    assert all(img.startswith(b"\x89PNG") for img in images)
    return len(images)


# ----------------------------------------------------------------------------- a run
def test_run_report_shows_curves_overoptimisation_policies_models_examples_config(run_dir):
    report = make_report(run_dir)
    assert report == run_dir / "report" / "report.html"
    html = _html(report)
    _self_contained(html)
    for section in ("Summary", "Training curves", "Over-optimisation", "Policies (eval)",
                    "Reward and preference models", "Example completions", "Configuration and versions"):
        assert f"<h2>{section}</h2>" in html, section
    names = sorted(p.stem.split("-", 1)[1] for p in report.parent.glob("*.png"))
    assert names == sorted(["curves-sft", "curves-rm", "curves-rl", "overoptimisation", "policies-eval",
                            "win-rates-eval-gold-preference", "model-accuracy", "calibration"])
    assert _figures_match_files(report, html) == 8
    assert "Not in this report" not in html  # nothing is missing from a finished run
    # the numbers on the page are the run's: final metrics, policies, curve points, examples, versions
    results = json.loads((run_dir / "results.json").read_text())
    ev = json.loads((run_dir / "stages" / "eval" / "evaluation.json").read_text())
    assert f"{ev['policies']['rl']['gold_reward']:.4g}" in html
    curve = [json.loads(line) for line in (run_dir / "stages" / "rl" / "curve.jsonl").read_text().splitlines()]
    assert len(curve) == 3 and all(f"{p['eval/kl']:.4g}" in html for p in curve)
    assert ev["examples"][0]["completion"].strip()[:20].replace("&", "&amp;") in html
    assert f"{results['stages']['rm']['metrics']['val/accuracy']:.4g}" in html
    assert json.loads((run_dir / "run.json").read_text())["versions"]["torch"] in html
    # the reward model's reliability diagram comes from evaluation.json
    cal = ev["reward_models"]["rm"]["calibration"]
    assert sum(b["count"] for b in cal["bins"]) == ev["reward_models"]["rm"]["pairs"]
    # the learning rate is logged (LearningRateMonitor) and drawn with the curves
    header = (run_dir / "stages" / "sft" / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW" in header


def test_report_cli_is_fast_and_prints_where(run_dir, root):
    env = dict(os.environ, PIPELINE_ROOT=str(root))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", str(run_dir), "--out", str(root / "cli-report")],
                          env=env, capture_output=True, text=True, timeout=120)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    assert f"report: {root / 'cli-report' / 'report.html'}" in proc.stdout
    assert len(list((root / "cli-report").glob("*.png"))) == 8
    assert seconds < 10, f"the report of a run took {seconds:.1f}s"


def test_report_cli_errors_are_one_line_exit_2(tmp_path):
    """A nonexistent PATH is one line; other mistakes say what to do on a second (``fix:``) line."""
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path))
    for args, text, n_lines in (([str(tmp_path / "nope")], "no such directory", 1), ([], "no runs under", 2),
                                ([str(tmp_path)], "is not a run, multirun or study directory", 1)):
        proc = subprocess.run([sys.executable, "-m", "pipeline.report", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and len(lines) == n_lines, proc.stderr
        assert lines[0].startswith("error: PATH: ") and text in lines[0]


def test_latest_run_is_chosen_when_no_path_is_given(tmp_path):
    for d in ("runs/2026-01-01/10-00-00", "runs/2026-01-02/09-00-00", "multirun/2026-01-01/23-00-00/0"):
        (tmp_path / "outputs" / d).mkdir(parents=True)
        (tmp_path / "outputs" / d / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "outputs" / "runs" / "2026-01-03" / "not-a-run").mkdir(parents=True)
    assert latest(tmp_path) == tmp_path / "outputs" / "runs" / "2026-01-02" / "09-00-00"
    assert kind_of(tmp_path / "outputs" / "multirun" / "2026-01-01" / "23-00-00") == "multirun"
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pipeline.report"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "latest run: " + str(tmp_path / "outputs" / "runs" / "2026-01-02" / "09-00-00") in proc.stdout


def test_damaged_run_directory_gives_a_report_of_what_exists(run_dir, tmp_path):
    """No results.json / run.json (the run failed), the rl stage's link broken, the SFT artifact without its
    metrics file, a malformed curve line, an error in run.log: a report with notes, no traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, symlinks=True, ignore=shutil.ignore_patterns("report"))
    (broken / "results.json").unlink()
    (broken / "run.json").unlink()
    (broken / "stages" / "rl").unlink()
    (broken / "stages" / "rl").symlink_to(tmp_path / "gone")
    sft = tmp_path / "sft-copy"
    shutil.copytree(run_dir / "stages" / "sft", sft, ignore=shutil.ignore_patterns("model", "checkpoints"))
    (sft / "logs" / "metrics.csv").unlink()
    (broken / "stages" / "sft").unlink()
    (broken / "stages" / "sft").symlink_to(sft)
    with open(broken / "run.log", "a") as fh:
        fh.write("[2026-01-01 12:00:09,000][pipeline][ERROR] run failed: rl: loss became nan at rollout step 3\n")
    html = _html(make_report(broken))
    assert "Not in this report" in html
    for note in ("results.json (written when a run finishes) is missing", "run.json (timings, versions) is missing",
                 "stage rl: its artifact link is broken", "stage sft (sft): no metrics file",
                 "the run log says: run failed: rl: loss became nan at rollout step 3"):
        assert note in html, note
    # what exists is still there: the reward model's curves, the evaluation, the config
    assert "curves-rm" in html and "policies-eval" in html and "resolved config (config.yaml)" in html
    assert "curves-rl" not in html and "curves-sft" not in html

    # a run that failed in its first stage: only config.yaml and run.log
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(run_dir / "config.yaml", first / "config.yaml")
    html = _html(make_report(first))
    for stage, kind in (("sft", "sft"), ("rm", "reward"), ("rl", "rl"), ("eval", "evaluate")):
        assert f"stage {stage} ({kind}): no artifact (it did not run or did not finish)" in html
    # unreadable files are notes too
    (first / "results.json").write_text("{not json")
    assert "results.json (written when a run finishes) is unreadable" in _html(make_report(first))


# ----------------------------------------------------------------------------- a multirun
def test_multirun_report_has_a_row_per_job_and_objectives_against_swept_parameters(multirun_dir):
    assert kind_of(multirun_dir) == "multirun"
    html = _html(make_report(multirun_dir))
    _self_contained(html)
    assert "<h2>Jobs</h2>" in html and "<h2>Objectives against swept parameters</h2>" in html
    rows = re.findall(r"<tr><td class='l'>(\d+)</td><td class='l'>([^<]*)</td><td class='l'>(\w+)</td>"
                      r"<td class='l'>([^<]*)</td>", html)
    assert rows == [("0", "0.05", "done", "sft, rm"), ("1", "0.3", "done", "sft, rm")]
    assert "algorithm.kl_coef" in html and "objectives-vs-parameters" in html
    for job in ("0", "1"):
        results = json.loads((multirun_dir / job / "results.json").read_text())
        assert f"{results['stages']['eval']['metrics']['eval/gold_reward']:.4g}" in html


def test_multirun_jobs_are_tensorboard_hparams_sessions(multirun_dir):
    for job, kl in (("0", 0.05), ("1", 0.3)):
        hp, metrics = hparams_session(multirun_dir / job / "hparams")
        assert hp["algorithm.kl_coef"] == pytest.approx(kl) and hp["pipeline"] == "default"
        results = json.loads((multirun_dir / job / "results.json").read_text())
        assert metrics["eval/eval/gold_reward"] == pytest.approx(results["stages"]["eval"]["metrics"]["eval/gold_reward"])
        assert "rl/eval/gold_reward" in metrics and "rm/val/accuracy" in metrics


# ----------------------------------------------------------------------------- studies
def test_study_report_of_a_real_study(study_dir):
    assert kind_of(study_dir) == "study"
    html = _html(make_report(study_dir))
    _self_contained(html)
    names = {p.stem.split("-", 1)[1] for p in (study_dir / "report").glob("*.png")}
    assert {"history", "importances", "parallel-coordinates", "slices", "intermediate-values", "timeline",
            "tuning-vs-test"} <= names, names
    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["trials"]["COMPLETE"] == 3
    assert f"best: trial {summary['best']['trial']}" in html
    assert "trials read from study storage" in html


def test_study_trials_are_tensorboard_hparams_sessions(study_dir):
    import optuna

    from tests.tune_helpers import load_study

    study = load_study(study_dir, "rep")
    for t in study.get_trials():
        hp, metrics = hparams_session(study_dir / "tensorboard" / f"trial-{t.number}")
        assert hp["state"] == t.state.name and hp["algorithm.kl_estimator"] == t.params["algorithm.kl_estimator"]
        assert hp["algorithm.kl_coef"] == pytest.approx(t.params["algorithm.kl_coef"])
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert metrics["eval/gold_reward"] == pytest.approx(t.value)


def test_study_report_of_a_two_objective_study_with_pruned_and_failed_trials(tmp_path):
    import numpy as np
    import optuna
    from optuna._hypervolume import compute_hypervolume

    from pipeline.report.study import hypervolume_history, importances, load_study_data, pareto_front

    study_dir = make_study_dir(tmp_path)
    data = load_study_data(study_dir)
    assert [t.number for t in data.trials] == [n for n, *_ in TRIALS]
    study = optuna.load_study(study_name="synthetic", storage=data.study._storage)
    assert pareto_front(data) == {t.number for t in study.best_trials} == {0, 1, 3}
    hv = hypervolume_history(data, [0.5, 4.0])
    assert [n for n, _ in hv] == [0, 1, 2, 3, 6]
    assert all(b >= a for (_, a), (_, b) in zip(hv, hv[1:]))  # never decreases
    front = np.array([[-1.0, 1.0], [-2.0, 2.0], [-3.0, 4.0]])
    assert hv[-1][1] == pytest.approx(compute_hypervolume(front, np.array([-0.5, 4.0]))) == pytest.approx(3.5)
    imps = importances(data)
    assert set(imps) == {"eval/gold_reward", "eval/kl"}
    assert all(set(v) == {"algorithm.kl_coef", "algorithm.kl_estimator"} and sum(v.values()) == pytest.approx(1.0)
               for v in imps.values())

    html = _html(make_report(study_dir))
    names = {p.stem.split("-", 1)[1] for p in (study_dir / "report").glob("*.png")}
    assert {"history", "importances", "parallel-coordinates", "slices", "pareto-front", "hypervolume-history",
            "intermediate-values", "timeline", "tuning-vs-test"} == names
    assert "TrainingError: loss became nan" in html  # the failed trial's reason in the trials table
    assert "host:100" in html or "timeline" in html


def test_study_report_from_trials_csv_when_the_storage_is_gone(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("storage.journal", "trials", "test", "report",
                                                                   "tensorboard"))
    summary = json.loads((copy / "summary.json").read_text())
    summary["storage"] = "postgresql://user:***@db.example/optuna"
    (copy / "summary.json").write_text(json.dumps(summary))
    html = _html(make_report(copy))
    assert "masked password" in html and "trials read from trials.csv" in html
    assert "history" in {p.stem.split("-", 1)[1] for p in (copy / "report").glob("*.png")}


def test_pruned_trials_are_marked_in_the_intermediate_values():
    from pipeline.report.study import TrialRecord
    from pipeline.report.study_plots import intermediate

    trials = [TrialRecord(0, "COMPLETE", [1.0], {}, {1: 0.1, 2: 0.2}), TrialRecord(1, "PRUNED", None, {}, {1: -0.5}),
              TrialRecord(2, "PRUNED", None, {}, {1: -0.1, 2: -0.2}), TrialRecord(3, "FAIL", None, {}, {})]
    ax = intermediate(trials, "eval/gold_reward").axes[0]
    assert len(ax.lines) == 3  # trials with intermediate values
    marks = [c for c in ax.collections]
    assert len(marks) == 2 and sorted(tuple(c.get_offsets()[0]) for c in marks) == [(1.0, -0.5), (2.0, -0.2)]


def test_training_curve_panels():
    from pipeline.report.plots import panel_of, training_curves

    assert [panel_of(k) for k in ("train/loss", "policy/pg_loss", "val/accuracy", "rollout/reward_mean",
                                  "eval/gold_reward", "policy/kl", "eval/kl", "policy/kl_coef", "policy/entropy",
                                  "rollout/response_length", "lr-AdamW", "lr-AdamW/pg2", "perf/tokens_per_s",
                                  "train/steps", "rollout/reward_std")] == [
        "loss", "loss", "accuracy", "reward", "reward", "KL", "KL", None, "entropy", "response length",
        "learning rate", "learning rate", None, None, None]
    fig, skipped = training_curves({"train/loss": [(0, 2.0), (1, 1.0)], "lr-AdamW": [(0, 1e-3), (1, 5e-4)],
                                    "perf/step_time_s": [(0, 0.1)]}, "x")
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["loss", "learning rate"]
    assert skipped == ["perf/step_time_s"]


# ----------------------------------------------------------------------------- in a browser
def _chromium_or_skip():
    from pipeline.report.browser import find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return exe


def _not_blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as im:
        lo_hi = im.convert("L").getextrema()
    return lo_hi[1] - lo_hi[0] > 50


def test_reports_render_in_headless_chromium(run_dir, multirun_dir, study_dir, tmp_path):
    from pipeline.report.browser import check_page

    exe = _chromium_or_skip()
    for name, d in (("run", run_dir), ("multirun", multirun_dir), ("study", study_dir)):
        report = make_report(d, tmp_path / name)
        shot = tmp_path / f"{name}.png"
        page = check_page(report, screenshot=shot, chromium=exe)
        assert page.ok, page.problems()
        assert len(page.images) == len(list(report.parent.glob("*.png"))) > 0
        assert all(i["shown_width"] > 100 for i in page.images)
        assert page.title.endswith(("'default'", "Multirun report", "rep")) and page.sections >= 2
        assert shot.is_file() and _not_blank(shot)


def test_the_browser_check_catches_console_errors_blank_images_and_requests(tmp_path):
    """The detector itself: a page with a console error, an uncaught exception, a blank image and a
    request to the network fails the check on each count."""
    import io

    from PIL import Image

    from pipeline.report.browser import check_page

    exe = _chromium_or_skip()
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), "white").save(buf, format="PNG")
    blank = base64.b64encode(buf.getvalue()).decode()
    page = tmp_path / "bad.html"
    page.write_text(f"<html><head><title>bad</title></head><body><img src='data:image/png;base64,{blank}' "
                    f"data-name='blank'><img src='http://127.0.0.1:9/x.png' data-name='remote'>"
                    f"<script>console.error('boom'); undefined_function();</script></body></html>")
    result = check_page(page, chromium=exe)
    text = "\n".join(result.problems())
    assert "boom" in text and "undefined_function" in text
    assert "network request: http://127.0.0.1:9/x.png" in text
    assert {i["name"] for i in result.blank_images()} == {"blank", "remote"}


def test_importances_of_an_objective_that_never_varied_are_explained_not_drawn():
    from pipeline.report.data import Problems
    from pipeline.report.study import StudyData, TrialRecord, importances

    trials = [TrialRecord(i, "COMPLETE", [1.0, float(i)], {"x": 0.1 * (i + 1)}) for i in range(4)]
    data = StudyData(Path("."), "s", None, [{"metric": "flat", "direction": "maximize"},
                                            {"metric": "rising", "direction": "minimize"}], trials, None, None,
                     Problems(), "trials.csv")
    why: list[str] = []
    imps = importances(data, why)
    assert list(imps) == ["rising"] and imps["rising"] == {"x": pytest.approx(1.0)}
    assert why == ["flat is the same in every complete trial: no parameter explains any of it"]


def test_any_directory_of_runs_is_reported_like_a_multirun(study_dir):
    """A tuner trial's seed runs (or a day of outputs/runs) compare like the jobs of a multirun."""
    trial = study_dir / "trials" / "0000"
    assert kind_of(trial) == "multirun"
    html = _html(make_report(trial))
    assert re.search(r"<td class='l'>seed-0</td>", html) and "Objectives against swept parameters" in html
