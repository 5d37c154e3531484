"""The report of one pipeline run: summary, training curves, the over-optimisation picture, the
policies side by side (gold reward with CI, proxy reward, KL, length, EOS rate, win rates), reward /
preference model accuracy per subset and calibration, example completions, config and versions."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.report import plots
from pipeline.report.data import Problems, RunData, load_run, read_json, read_jsonl, read_metrics_csv
from pipeline.report.page import Page, fmt

#: stage kinds that train (their missing metrics file is worth a note)
_NOT_TRAINED = ("evaluate",)
#: examples per policy and training completions per step shown
N_EXAMPLES = 4


def evaluations(run: RunData) -> dict[str, dict]:
    out = {}
    for st in run.stages:
        if st.kind == "evaluate" and st.path is not None:
            ev = read_json(st.path / "evaluation.json", run.problems, f"stage {st.name}: evaluation.json")
            if isinstance(ev, dict):
                out[st.name] = ev
    return out


# ----------------------------------------------------------------------------- sections
def summary_section(page: Page, run: RunData) -> None:
    page.section("Summary")
    if run.info and run.info.get("overrides"):
        page.text("overrides: " + " ".join(run.overrides), muted=True)
    rows = []
    for st in run.stages:
        status = "ok" if st.path is not None else "missing"
        hl = "  ".join(f"{k}={fmt(v)}" for k, v in st.headline_metrics.items())
        rows.append([st.name, st.kind, status, "" if st.reused is None else ("yes" if st.reused else "no"),
                     "" if st.seconds is None else f"{st.seconds:.1f}", hl])
    if rows:
        page.table(["stage", "kind", "artifact", "cached", "seconds", "headline metrics"], rows, text_cols=(0, 1, 2, 3, 5))
    else:
        page.note("no stages found (neither config.yaml, results.json nor stages/)")
    for p in run.problems:
        page.note(p)
    rows = [[st.name, k, v] for st in run.stages for k, v in sorted(st.metrics.items())]
    if rows:
        page.table(["stage", "metric", "value"], rows, text_cols=(0, 1), summary="all final metrics")
    if not run.finished and run.errors:
        page.pre("\n".join(run.errors[-5:]), summary="errors in run.log")


def curves_section(page: Page, run: RunData) -> None:
    page.section("Training curves")
    drawn = 0
    for st in run.stages:
        if st.path is None or st.kind in _NOT_TRAINED:
            continue
        path = st.path / "logs" / "metrics.csv"
        if not path.is_file():
            page.note(f"stage {st.name} ({st.kind}): no metrics file ({path})")
            continue
        problems = Problems()
        series = read_metrics_csv(path, problems)
        for p in problems:
            page.note(f"stage {st.name}: {p}")
        with page.guard(f"the curves of stage {st.name}"):
            fig, skipped = plots.training_curves(series, f"{st.name} ({st.kind})")
            if fig is None:
                page.note(f"stage {st.name}: its metrics file has no curves to draw")
                continue
            cap = f"{st.name}: metrics logged during training (logs/metrics.csv)"
            if skipped:
                cap += "; not drawn: " + ", ".join(skipped[:12]) + (" ..." if len(skipped) > 12 else "")
            page.figure(fig, f"curves-{st.name}", cap)
            drawn += 1
    if not drawn and not any(st.kind not in _NOT_TRAINED for st in run.stages):
        page.text("no training stage in this run", muted=True)


def overoptimisation_section(page: Page, run: RunData, evals: dict[str, dict]) -> None:
    online = [st for st in run.stages if st.path is not None and (st.path / "curve.jsonl").exists()]
    if not online and not any(st.kind in ("rl", "nlhf") for st in run.stages):
        return
    page.section("Over-optimisation")
    curves = {}
    for st in online:
        problems = Problems()
        curves[st.name] = read_jsonl(st.path / "curve.jsonl", problems)
        for p in problems:
            page.note(f"stage {st.name}: {p}")
    for st in run.stages:
        if st.kind in ("rl", "nlhf") and st.name not in curves:
            page.note(f"stage {st.name} ({st.kind}): no held-out curve (curve.jsonl; rl.eval_every=0, user prompts, "
                      f"or the stage did not finish)")
    final = {}
    for ev in evals.values():
        final.update(ev.get("policies") or {})
    with page.guard("the over-optimisation plot"):
        fig = plots.overoptimisation(curves, final)
        if fig is None:
            if curves:
                page.note("the held-out curves have no KL / gold reward points")
            return
        page.figure(fig, "overoptimisation", "Held-out gold (true) and proxy (reward-model) reward against the KL to the "
                    "reference during online training (labels: rollout step); stars: the evaluation's policies (± 95% "
                    "CI). Proxy reward rising while gold reward falls is reward over-optimisation.")
    rows = []
    for name, pts in curves.items():
        for p in pts:
            rows.append([name, p.get("step")] + [p.get(k) for k in ("eval/kl", "eval/gold_reward", "eval/proxy_reward",
                                                                     "eval/win_rate")])
    if rows:
        page.table(["stage", "step", "KL", "gold reward", "proxy reward", "win rate"], rows, text_cols=(0,),
                   summary="curve points")


def policies_section(page: Page, evals: dict[str, dict]) -> None:
    for stage, ev in evals.items():
        policies = ev.get("policies") or {}
        if not policies and not (ev.get("win_rates") or {}):
            continue
        page.section(f"Policies ({stage})")
        ref = ev.get("reference")
        page.text(f"held-out prompts; KL and win rate against {ref!r}" if ref else "held-out prompts", muted=True)
        cols = [k for k, _, _ in plots.POLICY_PANELS if any(k in m for m in policies.values())]
        extra = [k for k in ("gold_reward_std", "gold_reward_ci95", "win_rate_ci95", "num_samples")
                 if any(k in m for m in policies.values())]
        page.table(["policy"] + cols + extra, [[n] + [m.get(k) for k in cols + extra] for n, m in policies.items()])
        with page.guard(f"the policy comparison of {stage}"):
            fig = plots.policy_comparison(policies, ref)
            if fig is not None:
                page.figure(fig, f"policies-{stage}", "Policies side by side (error bars: 95% confidence intervals).")
        titles = {"gold_preference": "win rate of row over column, gold preference (± 95% CI)",
                  "preference_model": "win rate of row over column, learned preference model",
                  "class_game": "win rate of row over column, class game (exact)"}
        for judge, matrix in (ev.get("win_rates") or {}).items():
            if not matrix:
                continue
            with page.guard(f"the {judge} win rates of {stage}"):
                fig = plots.win_rate_matrix(matrix, titles.get(judge, judge))
                if fig is not None:
                    page.figure(fig, f"win-rates-{stage}-{judge}", titles.get(judge, judge))


def models_section(page: Page, evals: dict[str, dict]) -> None:
    models = {}
    for ev in evals.values():
        models.update({f"{k} (reward model)": v for k, v in (ev.get("reward_models") or {}).items()})
        models.update({f"{k} (preference model)": v for k, v in (ev.get("preference_models") or {}).items()})
    if not models:
        return
    page.section("Reward and preference models")
    subsets = sorted({s for m in models.values() for s in (m.get("by_subset") or {})})
    page.table(["model", "accuracy"] + subsets + ["ECE", "gold MAE", "pairs"],
               [[n, m.get("accuracy")] + [(m.get("by_subset") or {}).get(s) for s in subsets]
                + [m.get("ece"), m.get("gold_mae"), m.get("pairs")] for n, m in models.items()])
    with page.guard("model accuracy"):
        fig = plots.accuracy_by_subset(models)
        if fig is not None:
            page.figure(fig, "model-accuracy", "Pairwise accuracy on held-out pairs labelled by the gold preference, "
                        "overall and per subset.")
    with page.guard("calibration"):
        fig = plots.calibration(models)
        if fig is not None:
            page.figure(fig, "calibration", "Calibration: accuracy against confidence of P(chosen ≻ rejected) "
                        "(reward models: Bradley-Terry sigmoid of the score margin); marker area ~ pairs in the bin.")
        else:
            page.note("no calibration recorded (evaluations made before reliability bins were recorded)", missing=False)


def examples_section(page: Page, run: RunData, evals: dict[str, dict]) -> None:
    rows = []
    for stage, ev in evals.items():
        by_policy: dict[str, list] = {}
        for ex in ev.get("examples") or []:
            by_policy.setdefault(str(ex.get("policy")), []).append(ex)
        for policy, exs in by_policy.items():
            for ex in exs[:N_EXAMPLES]:
                rows.append([policy, ex.get("prompt", ""), ex.get("completion", ""), ex.get("gold_reward"),
                             ex.get("proxy_reward")])
    training = []
    for st in run.stages:
        if st.path is None or not (st.path / "completions.jsonl").exists():
            continue
        comp = read_jsonl(st.path / "completions.jsonl", Problems())
        steps = sorted({c.get("step") for c in comp if isinstance(c.get("step"), int)})
        for step in (steps[:1] + steps[-1:] if len(steps) > 1 else steps):
            for c in [c for c in comp if c.get("step") == step][:N_EXAMPLES]:
                training.append([st.name, step, c.get("prompt", ""), c.get("completion", ""), c.get("reward"),
                                 c.get("gold_reward")])
    if not rows and not training:
        return
    page.section("Example completions")
    if rows:
        page.heading("evaluation samples per policy")
        page.table(["policy", "prompt", "completion", "gold reward", "proxy reward"], rows, text_cols=(0,),
                   long_text_cols=(1, 2))
    if training:
        page.heading("during online training (first and last logged step)")
        page.table(["stage", "step", "prompt", "completion", "reward", "gold reward"], training, text_cols=(0,),
                   long_text_cols=(2, 3))


def config_section(page: Page, run: RunData) -> None:
    page.section("Configuration and versions")
    info = run.info or {}
    if info.get("versions"):
        page.table(["package", "version"], [[k, v] for k, v in sorted(info["versions"].items())], text_cols=(0, 1))
    if info.get("runtime"):
        page.text("runtime: " + ", ".join(f"{k}={v}" for k, v in info["runtime"].items()), muted=True)
    if run.stages:
        page.table(["stage", "kind", "fingerprint", "artifact"],
                   [[s.name, s.kind, ((run.results or {}).get("stages", {}).get(s.name) or {}).get("fingerprint")
                     or (s.manifest or {}).get("fingerprint", ""), str(s.path or "")] for s in run.stages],
                   text_cols=(0, 1, 2, 3))
    try:
        text = (run.dir / "config.yaml").read_text()
        page.pre(text, summary="resolved config (config.yaml)")
    except OSError:
        page.note("no resolved config (config.yaml)")
    if info:
        page.pre(json.dumps({k: v for k, v in info.items() if k != "versions"}, indent=2), summary="run.json")


def add_run(page: Page, run: RunData) -> None:
    summary_section(page, run)
    evals = evaluations(run)
    for name, fn in (("over-optimisation", lambda: overoptimisation_section(page, run, evals)),
                     ("policies", lambda: policies_section(page, evals)),
                     ("training curves", lambda: curves_section(page, run)),
                     ("models", lambda: models_section(page, evals)),
                     ("examples", lambda: examples_section(page, run, evals)),
                     ("config", lambda: config_section(page, run))):
        with page.guard(name):
            fn()


def build(run_dir: Path) -> Page:
    run = load_run(run_dir)
    name = ((run.results or {}).get("pipeline") or ((run.config or {}).get("pipeline") or {}).get("name") or "?")
    seed = (run.results or {}).get("seed", (run.config or {}).get("seed"))
    page = Page(f"Run report: pipeline {name!r}", f"{run.dir}  (seed {seed})"
                + ("" if run.finished else "  - unfinished or failed run"))
    add_run(page, run)
    return page
