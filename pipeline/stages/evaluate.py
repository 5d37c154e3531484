"""Evaluation stage: policies against the gold reward and the gold preference, reward and
preference models against gold labels.

Inputs (all optional, at least one of ``policies`` / ``reward`` / ``preference``):
``policies`` (policy stages), ``reference`` (the policy the KL and ``win_rate`` are measured
against; usually ``sft``), ``reward`` (a reward stage: the proxy reward and its accuracy),
``preference`` (a preference-model stage: its accuracy / calibration and win rates under it).

Per policy, on held-out prompts with ``eval.num_samples`` samples each (the same prompts for
every policy): gold reward (mean, std, 95% CI), proxy reward, KL(pi || pi_ref) (Monte-Carlo,
summed over response tokens), response length, EOS rate, gold win rate against the reference
(with a 95% CI) and, on tasks with a class game (``intransitive``), the class distribution and
the exploitability (plain and ``eval.exploitability_beta``-regularised). Between every two
policies: the win-rate matrix under the gold preference, under the preference model, and
(class game) exactly from the class distributions. For the reward / preference model:
pairwise accuracy on held-out gold-labelled pairs, overall and per subset (+ ECE for the
preference model). Everything goes to ``evaluation.json`` (see :mod:`pipeline.evaluation`);
the metrics are its flat view.

Evaluation follows the data the inputs trained on (:meth:`EvaluateStage._data`): ``eval.data.path``
when set; else the held-out part of a user's data published by an input (prompts of an RL or
Nash stage, pairs of a reward, DPO or preference-model stage); else the built-in task's
held-out prompts and pairs. Gold metrics exist only on the built-in task's prompts; on a
user's prompts policies are scored by the reward model, the preference model and
``eval.reward_fn``. ``evaluation.json``'s ``data`` says where each number's data comes from.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.data import fit_prompts, load_eval_data
from pipeline.data.formats import SOURCE
from pipeline.errors import ConfigError
from pipeline.evaluation import (
    SamplingSettings,
    class_distribution,
    evaluate_policy,
    flat_metrics,
    game_metrics,
    preference_accuracy,
    read_heldout,
    rm_accuracy,
    win_rate_matrix,
    write_evaluation,
)
from pipeline.models.loading import check_model_config, context_length, load_tokenizer
from pipeline.scoring import CallableScorer, import_callable
from pipeline.models.policy import policy_from_artifact
from pipeline.models.preference import PreferenceScorer
from pipeline.models.reward import RewardScorer
from pipeline.stages.base import STAGES, Role, Stage
from pipeline.tasks import build_task

log = logging.getLogger(__name__)


def policy_seed(seed: int, name: str) -> int:
    """Each policy samples with its own stream: with one shared seed, inverse-CDF sampling would
    couple the policies' samples (common random numbers) and bias every win rate between them."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


@dataclass
class EvalData:
    """What an evaluation runs on: prompt rows for the policies, labelled pairs per judge input
    (None: no accuracy), and a description of each source."""

    prompts: list[dict]
    prompt_source: str
    builtin: bool  # the built-in task's prompts: gold metrics are defined
    pairs: dict[str, list | None] = field(default_factory=dict)
    pair_sources: dict[str, str] = field(default_factory=dict)
    builtin_pairs: set = field(default_factory=set)  # judges scored on the task's pairs (gold defined)


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    kind = "evaluate"
    produces = "evaluation"
    roles = {"policies": Role({"policy"}, required=False, many=True),
             "reference": Role({"policy"}, required=False),
             "reward": Role({"reward_model"}, required=False),
             "preference": Role({"preference_model"}, required=False)}
    config_keys = ("task", "eval")
    # bt_beta defines the gold preference (win rates); label noise only touches training pairs
    ignored_task_fields = ("num_train_prompts", "num_pref_prompts", "label_noise")
    headline = ("eval/rm_accuracy", "eval/rm_accuracy/", "eval/pm_accuracy", "eval/pm_ece")

    @classmethod
    def validate(cls, cfg, spec) -> None:
        if not {"policies", "reward", "preference"} & set(spec.inputs):
            raise ConfigError(f"stage {spec.name!r} has nothing to evaluate", where=f"pipeline.stages.{spec.name}.inputs",
                              fix="give it `policies: [...]`, `reward: <reward stage>` and/or "
                                  "`preference: <preference-model stage>`")
        if cfg.eval.include_base:
            check_model_config(cfg.model)
        if cfg.eval.exploitability_beta <= 0:
            raise ConfigError(f"must be > 0, got {cfg.eval.exploitability_beta}", where="eval.exploitability_beta")
        if cfg.eval.reward_fn:
            import_callable(cfg.eval.reward_fn, key="eval.reward_fn")

    @classmethod
    def check_data(cls, cfg, spec) -> None:
        if cfg.eval.data.path:  # format and columns (chat prompts are rendered when the policy is known)
            load_eval_data(cfg.eval.data, key="eval.data")

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        out["max_length"] = cfg.model.max_length
        return out

    # ------------------------------------------------------------------ data
    def _data(self, task, tokenizer) -> EvalData:
        """``eval.data`` if set; else held-out user data published by the inputs; else the task's."""
        ecfg = self.cfg.eval
        judges = {role: self.spec.inputs[role] for role in ("reward", "preference") if role in self.inputs}
        if ecfg.data.path:
            rows, pairs = load_eval_data(ecfg.data, key="eval.data", tokenizer=tokenizer)
            src = f"eval.data.path={ecfg.data.path}"
            data = EvalData(rows, src, builtin=False)
            for role, name in judges.items():
                data.pairs[name], data.pair_sources[name] = (pairs, src) if pairs else (None, f"{src}: no pairs")
            return data
        names = list(self.spec.inputs.get("policies", []))
        arts = dict(zip(names, self.inputs.get("policies", [])))
        if "reference" in self.inputs:
            arts.setdefault(self.spec.inputs["reference"], self.inputs["reference"])
        data = None
        for name in [*reversed(names), self.spec.inputs.get("reference")]:  # the last-trained policy first
            held = read_heldout(arts[name].path) if name in arts else None
            if held is not None and (held.prompts or held.pairs):
                rows = held.prompts or _pair_prompts(held.pairs)
                data = EvalData(rows, f"held-out prompts of stage {name!r}: {held.source}", builtin=False)
                break
        if data is None:
            data = EvalData(task.prompts("eval"), f"task {self.cfg.task.name!r} (built-in held-out prompts)",
                            builtin=True)
        for role, name in judges.items():
            held = read_heldout(self.inputs[role].path)
            if held is None:
                data.pairs[name], data.pair_sources[name] = task.eval_pairs(), \
                    f"task {self.cfg.task.name!r} (built-in held-out pairs)"
                data.builtin_pairs.add(name)
            elif held.pairs:
                data.pairs[name], data.pair_sources[name] = held.pairs, f"held-out pairs of stage {name!r}: {held.source}"
            else:
                data.pairs[name], data.pair_sources[name] = None, f"stage {name!r} held out no pairs ({held.source})"
                log.warning("eval: no accuracy for %r: it trained on user data and held none out (raise its "
                            "data.eval_fraction, or set eval.data.path to a preference file)", name)
        return data

    def _fit(self, data: EvalData, tokenizer, model) -> int | None:
        """Prompts the policies cannot answer in their context: eval.data's on_long_prompt for a
        user's evaluation file, cut from the left (with a warning) for held-out prompts."""
        limit = context_length(model) - self.cfg.eval.max_new_tokens
        if data.builtin or limit < 1:
            return None
        mode = self.cfg.eval.data.on_long_prompt if self.cfg.eval.data.path else "truncate_left"
        ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in data.prompts]
        _, dropped = fit_prompts(ids, limit, f"the model's context minus eval.max_new_tokens ({self.cfg.eval.max_new_tokens})",
                                 "eval.data", mode, [r.get(SOURCE) for r in data.prompts])
        data.prompts = [r for i, r in enumerate(data.prompts) if i not in dropped]
        return limit if mode == "truncate_left" else None

    def run(self, work_dir: Path) -> dict:
        ecfg = self.cfg.eval
        task = build_task(self.cfg.task)
        reference = self.spec.inputs.get("reference")
        names = list(self.spec.inputs.get("policies", []))
        first = self.inputs["policies"][0] if names else self.inputs.get("reference")
        tokenizer = load_tokenizer(str(first.model_dir)) if first is not None else None  # renders chat prompts
        data = self._data(task, tokenizer)
        result: dict = {"reference": reference, "policies": {}, "win_rates": {}, "reward_models": {},
                        "preference_models": {}, "data": {"prompts": data.prompt_source, "pairs": data.pair_sources}}
        scorer = pm = None
        if "reward" in self.inputs:
            name = self.spec.inputs["reward"]
            scorer = RewardScorer.from_artifact(self.inputs["reward"], aggregation=ecfg.reward_aggregation)
            if data.pairs.get(name):
                result["reward_models"][name] = rm_accuracy(scorer, data.pairs[name])
        if "preference" in self.inputs:
            name = self.spec.inputs["preference"]
            pm = PreferenceScorer.from_artifact(self.inputs["preference"])
            if data.pairs.get(name):
                result["preference_models"][name] = preference_accuracy(
                    pm, data.pairs[name], gold=task.gold_preference if name in data.builtin_pairs else None)
        candidates = [(n, lambda a=a: policy_from_artifact(a)) for n, a in zip(names, self.inputs.get("policies", []))]
        if candidates and ecfg.include_base:
            candidates.insert(0, ("base", lambda: self._base_policy(task)))
        ref_model, ref_tokenizer = False, None  # no KL without a reference
        if "reference" in self.inputs:
            ref_model, ref_tokenizer = policy_from_artifact(self.inputs["reference"])
            ref_model.eval()
        settings = SamplingSettings.from_config(ecfg)
        rows = data.prompts if candidates else []
        prompts = [r["prompt"] for r in rows]
        gold = task.gold_reward if data.builtin else None
        user = None
        if ecfg.reward_fn:
            fn, n = CallableScorer(ecfg.reward_fn, key="eval.reward_fn"), settings.num_samples
            user = lambda ps, cs: fn(ps, cs, [rows[i // n] for i in range(len(cs))]).tolist()  # noqa: E731
        samples: list[dict] = []
        completions: dict[str, list[str]] = {}
        limit = None
        for name, load in candidates:
            model, tokenizer = load()
            if name == candidates[0][0]:
                limit = self._fit(data, tokenizer, model)
                rows = data.prompts
                prompts = [r["prompt"] for r in rows]
            res = evaluate_policy(model, tokenizer, prompts, settings, seed=policy_seed(self.cfg.seed, name),
                                  gold=gold, proxy=scorer, reference=ref_model, user=user, max_prompt_length=limit)
            result["policies"][name] = res.metrics
            completions[name] = [s["completion"] for s in res.samples]
            samples += [{"policy": name, **s} for s in res.samples]
        if completions and ref_model is not False and reference not in completions:  # sample it for the comparisons
            res = evaluate_policy(ref_model, ref_tokenizer, prompts, settings, seed=policy_seed(self.cfg.seed, reference),
                                  max_prompt_length=limit)
            completions[reference] = [s["completion"] for s in res.samples]
        if completions:
            self._compare(result, task if data.builtin else None, prompts, completions, settings.num_samples,
                          reference, pm)
        with open(work_dir / "examples.jsonl", "w") as fh:
            for row in samples:
                fh.write(json.dumps(row) + "\n")
        result["examples"] = [s for s in samples if s["index"] < ecfg.num_examples]
        write_evaluation(work_dir, result)
        return flat_metrics(result)

    def _compare(self, result: dict, task, prompts: list[str], completions: dict[str, list[str]], n: int,
                 reference: str | None, pm) -> None:
        """Win rates between the policies (paired samples) and, on class-game tasks, exploitability.
        ``task`` is None on a user's prompts: no gold preference, only the preference model's."""
        flat_prompts = [p for p in prompts for _ in range(n)]  # sample i answers prompts[i // n]
        group = torch.arange(len(prompts)).repeat_interleave(n)
        evaluated = {k: v for k, v in completions.items() if k in result["policies"]}
        if self.cfg.eval.win_rates and len(completions) > 1:
            gold = None
            if task is not None:
                gold = win_rate_matrix(flat_prompts, completions, group, task.gold_preference)
                result["win_rates"]["gold_preference"] = {a: row for a, row in gold.items() if a in evaluated}
            if pm is not None:
                learned = win_rate_matrix(flat_prompts, completions, group, lambda p, a, b: pm.preference(p, a, b))
                result["win_rates"]["preference_model"] = {a: row for a, row in learned.items() if a in evaluated}
            if gold is not None and reference in completions:
                for name in evaluated:
                    if name != reference:
                        cell = gold[name][reference]
                        result["policies"][name].update(win_rate=cell["mean"], win_rate_ci95=cell["ci95"])
        game = task.class_game() if task is not None else None
        if game is None:
            return
        k = len(game.names)
        dists = {name: class_distribution(game.classify(flat_prompts, c), k) for name, c in completions.items()}
        ref_dist = dists.get(reference, torch.full((k,), 1.0 / k, dtype=torch.float64))
        count = len(flat_prompts)
        for name in evaluated:
            result["policies"][name]["class_distribution"] = dict(zip(game.names, dists[name].tolist()))
            result["policies"][name].update(game_metrics(game.matrix, dists[name], ref_dist, count=count,
                                                         ref_count=count if reference in dists else 10 ** 9,
                                                         beta=self.cfg.eval.exploitability_beta))
        matrix = torch.tensor(game.matrix, dtype=torch.float64)
        result["win_rates"]["class_game"] = {
            a: {b: {"mean": float(dists[a] @ matrix @ dists[b])} for b in evaluated if b != a}
            for a in evaluated}

    def _base_policy(self, task):
        """The SFT stage's starting point (same seed, same tokenizer recipe)."""
        import lightning as L

        from pipeline.models.policy import base_policy

        L.seed_everything(self.cfg.seed, verbose=False)
        return base_policy(self.cfg.model, task.corpus)


def _pair_prompts(pairs) -> list[dict]:
    """The distinct prompts of preference pairs, as prompt rows."""
    seen: dict[str, dict] = {}
    for p in pairs:
        if p.prompt:
            seen.setdefault(p.prompt, {"prompt": p.prompt})
    return list(seen.values())
