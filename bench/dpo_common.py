"""Shared measuring code for the offline DPO benchmark (ours vs TRL's ``DPOTrainer``).

Imported by ``bench/dpo_ours.py`` (project venv) and ``bench/dpo_trl.py`` (TRL venv, where the
project is not installed), so it needs only torch and transformers. Both sides report:

- per optimizer step: ``step_s`` = wall time since the previous step ended (everything the
  trainer does per step: data loading, collation, forward/backward, optimizer, logging), with
  the clock paused during the benchmark's own held-out evaluations; ``train_s`` = their sum;
- every ``eval_every`` steps: the held-out implicit-reward accuracy (fraction of held-out pairs
  with β·(h_w − h_l) > 0, h = log π − log π_ref summed over response tokens), mean margin and
  DPO loss, computed by :func:`heldout_eval` below on the side's current policy weights;
- :func:`summarize`: median s/step (first, warm-up step excluded), pairs/s, time to the
  held-out accuracy target (``train_s`` at the first evaluation that reaches it).
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent


class StepTimer:
    """Per-step wall times with pauses (held-out evaluations are not training time)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.train_s = 0.0
        self._last: float | None = None

    def start(self) -> None:
        self._last = time.perf_counter()

    def step(self, **extra) -> dict:
        now = time.perf_counter()
        if self._last is None:
            raise RuntimeError("StepTimer.start() was not called")
        dt = now - self._last
        self.train_s += dt
        self._last = now
        row = {"step": len(self.rows) + 1, "step_s": dt, "train_s": self.train_s, **extra}
        self.rows.append(row)
        return row

    @contextlib.contextmanager
    def paused(self):
        try:
            yield
        finally:
            self._last = time.perf_counter()


def load_heldout(path: str | Path) -> dict:
    """``heldout.json`` written by ``dpo_ours.py export``: token ids of the held-out pairs
    (prompt / chosen / rejected, the project's tokenization) and their reference log-probs."""
    return json.loads(Path(path).read_text())


def _response_logps(model, pairs: Sequence[Sequence[list[int]]], which: int, pad_id: int, batch: int):
    """Summed log-probs of response ``which`` (1 = chosen, 2 = rejected) given the prompt, unpadded per row
    (right padding + attention mask), log_softmax over the full vocabulary: an independent reference
    implementation, not either side's training code."""
    import torch

    out = []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        seqs = [list(p[0]) + list(p[which]) for p in chunk]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        for i, p in enumerate(chunk):
            start = len(p[0]) - 1  # position predicting the first response token
            out.append(float(lp[i, start:start + len(p[which])].sum()))
    return out


def heldout_logps(model, pairs, pad_id: int, batch: int = 64) -> list[tuple[float, float]]:
    """[(logπ(chosen), logπ(rejected))] per held-out pair."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            c = _response_logps(model, pairs, 1, pad_id, batch)
            r = _response_logps(model, pairs, 2, pad_id, batch)
    finally:
        model.train(was_training)
    return list(zip(c, r))


def heldout_eval(model, heldout: dict, beta: float) -> dict:
    """Implicit-reward accuracy, mean margin β·(h_w − h_l) and DPO loss on the held-out pairs."""
    import math

    pol = heldout_logps(model, heldout["pairs"], heldout["pad_token_id"])
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(pol, heldout["ref_logps"])]
    loss = statistics.fmean(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins)
    return {"heldout_accuracy": statistics.fmean(m > 0 for m in margins), "heldout_margin": statistics.fmean(margins),
            "heldout_loss": loss}


def summarize(rows: Sequence[dict], *, batch: int, target: float | None, **meta) -> dict:
    step_s = [r["step_s"] for r in rows[1:]] or [r["step_s"] for r in rows]
    evals = [r for r in rows if "heldout_accuracy" in r]
    hit = next((r for r in evals if target is not None and r["heldout_accuracy"] >= target), None)
    med = statistics.median(step_s) if step_s else None
    return {
        **meta,
        "steps": len(rows),
        "batch_pairs": batch,
        "s_per_step_median": med,
        "s_per_step_mean": statistics.fmean(step_s) if step_s else None,
        "pairs_per_s": batch / med if med else None,
        "first_step_s": rows[0]["step_s"] if rows else None,
        "train_s": rows[-1]["train_s"] if rows else None,
        "target_accuracy": target,
        "time_to_target_s": hit["train_s"] if hit else None,
        "step_to_target": hit["step"] if hit else None,
        # contention-robust estimate: steps to target x median step time
        "time_to_target_est_s": hit["step"] * med if hit and med else None,
        "heldout_first": evals[0] if evals else None,
        "heldout_final": {k: v for k, v in evals[-1].items() if k.startswith("heldout")} if evals else None,
    }


def write_result(path, summary: dict, rows: Sequence[dict], config: dict) -> None:
    out = {"summary": summary, "config": config, "steps": list(rows)}
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
