"""Evaluation stage: policies against the gold reward, reward models against gold labels.

Inputs (all optional, at least one): ``policies`` (list of policy stages), ``reference``
(policy stage the KL is measured against; usually ``sft``), ``reward`` (reward stage).

Per policy ``p`` (on held-out prompts, ``eval.num_samples`` samples each):
``eval/p/{gold_reward,gold_reward_std,proxy_reward,kl,response_length,eos_rate}``;
the last policy's metrics are also reported without the ``p/`` prefix (what sweeps
optimise). KL is the Monte-Carlo estimate E_{y~pi} [log pi(y) - log pi_ref(y)] summed
over response tokens. For the reward model: pairwise accuracy on held-out pairs labelled
by the gold reward, overall and per subset (``eval/rm_accuracy/<subset>``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.data.records import PreferenceExample
from pipeline.models.policy import policy_from_artifact
from pipeline.models.reward import RewardScorer
from pipeline.rollout.engine import HFRolloutEngine, SamplingParams, sequence_logprobs
from pipeline.stages.base import STAGES, Stage
from pipeline.tasks import build_task


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: list[str], ecfg, seed: int, max_prompt_length: int | None = None):
    engine = HFRolloutEngine(model, tokenizer, max_prompt_length=max_prompt_length, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, top_p=ecfg.top_p,
                            n=ecfg.num_samples)
    gen = torch.Generator().manual_seed(seed)
    batches = [engine.generate(prompts[i:i + ecfg.batch_size], params, generator=gen)
               for i in range(0, len(prompts), ecfg.batch_size)]
    return batches


@torch.no_grad()
def kl_to_reference(batch, model, ref_model, temperature: float) -> torch.Tensor:
    """[N] sum over response tokens of log pi - log pi_ref on the sampled tokens."""
    ids, mask, start = batch.input_ids, batch.attention_mask, batch.response_start
    lp = sequence_logprobs(model, ids, mask, start, temperature)
    lp_ref = sequence_logprobs(ref_model, ids, mask, start, temperature)
    return ((lp - lp_ref) * batch.response_mask).sum(1)


def rm_accuracy(scorer: RewardScorer, pairs: list[PreferenceExample]) -> dict:
    prompts = [p.prompt for p in pairs]
    r_c = scorer.score(prompts, [p.chosen for p in pairs])
    r_r = scorer.score(prompts, [p.rejected for p in pairs])
    correct = (r_c > r_r).float()
    out = {"eval/rm_accuracy": float(correct.mean())}
    for subset in sorted({p.subset for p in pairs}):
        idx = torch.tensor([p.subset == subset for p in pairs])
        out[f"eval/rm_accuracy/{subset}"] = float(correct[idx].mean())
    return out


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    kind = "evaluate"
    config_keys = ("task", "eval")
    ignored_task_fields = ("num_train_prompts", "num_pref_prompts", "label_noise", "bt_beta")

    @classmethod
    def fingerprint_config(cls, cfg, spec) -> dict:
        out = super().fingerprint_config(cfg, spec)
        out["max_length"] = cfg.model.max_length
        return out

    def run(self, work_dir: Path) -> dict:
        ecfg = self.cfg.eval
        task = build_task(self.cfg.task)
        metrics: dict = {}
        examples: list[dict] = []
        scorer = None
        if "reward" in self.inputs:
            scorer = RewardScorer.from_artifact(self.inputs["reward"], aggregation=ecfg.reward_aggregation)
            metrics.update(rm_accuracy(scorer, task.eval_pairs()))
        policies = list(self.inputs.get("policies", []))
        names = list(self.spec.inputs.get("policies", []))
        if policies:
            ref_model = None
            if "reference" in self.inputs:
                ref_model, _ = policy_from_artifact(self.inputs["reference"])
                ref_model.eval()
            prompts = [r["prompt"] for r in task.prompts("eval")]
            candidates = [(n, lambda a=a: policy_from_artifact(a)) for n, a in zip(names, policies)]
            if ecfg.include_base:
                candidates.insert(0, ("base", lambda: self._base_policy(task)))
            for name, load in candidates:
                model, tokenizer = load()
                m, ex = self._eval_policy(name, model.eval(), tokenizer, prompts, task, scorer, ref_model)
                metrics.update(m)
                examples += ex
            last = names[-1]
            metrics.update({k.replace(f"eval/{last}/", "eval/"): v for k, v in list(metrics.items())
                            if k.startswith(f"eval/{last}/")})
        with open(work_dir / "examples.jsonl", "w") as fh:
            for row in examples:
                fh.write(json.dumps(row) + "\n")
        self.record["examples"] = [e for e in examples if e["index"] < ecfg.num_examples]
        return metrics

    def _base_policy(self, task):
        """The SFT stage's starting point (same seed, same tokenizer recipe)."""
        import lightning as L

        from pipeline.models.policy import base_policy

        L.seed_everything(self.cfg.seed, verbose=False)
        return base_policy(self.cfg.model, task.corpus)

    def _eval_policy(self, name, model, tokenizer, prompts, task, scorer, ref_model):
        ecfg = self.cfg.eval
        batches = sample_policy(model, tokenizer, prompts, ecfg, self.cfg.seed)
        all_prompts = [p for b in batches for p in b.prompts]
        completions = [c for b in batches for c in b.completions]
        gold = torch.tensor(task.gold_reward(all_prompts, completions))
        m = {
            f"eval/{name}/gold_reward": float(gold.mean()),
            f"eval/{name}/gold_reward_std": float(gold.std()) if len(gold) > 1 else 0.0,
            f"eval/{name}/response_length": float(torch.cat([b.response_lengths for b in batches]).float().mean()),
            f"eval/{name}/eos_rate": float(torch.cat([b.has_eos for b in batches]).float().mean()),
        }
        proxy = None
        if scorer is not None:
            proxy = scorer.score(all_prompts, completions)
            m[f"eval/{name}/proxy_reward"] = float(proxy.mean())
        if ref_model is not None:
            kl = torch.cat([kl_to_reference(b, model, ref_model, ecfg.temperature) for b in batches])
            m[f"eval/{name}/kl"] = float(kl.mean())
        examples = []
        for i, (p, c) in enumerate(zip(all_prompts, completions)):
            row = {"policy": name, "index": i, "prompt": p, "completion": c, "gold_reward": float(gold[i])}
            if proxy is not None:
                row["proxy_reward"] = float(proxy[i])
            examples.append(row)
        return m, examples
