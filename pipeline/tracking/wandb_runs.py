"""One Weights & Biases run per stage (``logger=wandb``, or ``wandb`` in ``logger.backends``).

The runner opens the run around a stage it builds (:func:`stage_run`): ``group`` = the pipeline
run (``logger.wandb.group``, default the run directory under ``outputs/``; the tuner sets the
study), ``job_type`` = the stage name, ``name`` = ``<run_name>/<stage>``, the stage's resolved
config (secrets scrubbed). Lightning's ``WandbLogger`` of the stage's trainer logs into that same
run (its training history); when the stage finishes the run gets the final metrics in its summary
and chart-ready tables of what the stage wrote: ``completions`` (online RL samples), the
``overoptimisation`` curve (held-out KL, gold and proxy reward per step, with line plots),
``policies`` / ``examples`` / ``win_rates`` / ``reward_models`` (evaluations).

Offline unless credentials exist (:func:`resolve_wandb_mode`); an online run without credentials
is a config error, never a login prompt. Offline runs are written in the stage's artifact
(``<artifact>/wandb/offline-run-*``); :func:`sync_command` prints how to upload them later.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import ConfigError
from pipeline.tracking.loggers import has_wandb_credentials, resolve_wandb_mode, scrub_secrets

log = logging.getLogger("pipeline")

#: the W&B run of the stage being built (Lightning's WandbLogger logs into it)
_ACTIVE: list = []


def active_run():
    """The current stage's W&B run, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def enabled(cfg) -> bool:
    return "wandb" in list(cfg.logger.backends)


def check_mode(mode: str) -> None:
    """An online run needs credentials: without them W&B would ask for a key on the terminal."""
    if mode == "online" and not has_wandb_credentials():
        raise ConfigError("W&B is set to run online but no credentials are configured (it would prompt for a key)",
                          where="logger.wandb.mode",
                          fix="set WANDB_API_KEY or run `wandb login` once; or use logger.wandb.mode=offline and "
                              "upload later with `wandb sync`")


def default_group(cfg) -> str:
    """The pipeline run: its directory relative to ``<root>/outputs`` (``runs/<date>/<time>``,
    ``multirun/<date>/<time>/<job>``), else the directory's name."""
    out = Path(str(cfg.paths.output_dir))
    try:
        return str(out.resolve().relative_to((Path(str(cfg.paths.root_dir)) / "outputs").resolve()))
    except (ValueError, OSError):
        return out.name


def init(*, mode: str | None, dir: Path, config: dict, **kwargs):
    """``wandb.init`` the way every run of this project starts: mode resolved (offline without
    credentials), never a prompt, secrets scrubbed from the config, quiet console."""
    import wandb

    mode = resolve_wandb_mode(mode)
    check_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(mode=mode, dir=str(dir), config=scrub_secrets(config), reinit="create_new",
                      settings=wandb.Settings(silent=True, show_info=False, console="off"), **kwargs)


class StageRun:
    """The W&B run of one stage (a no-op when W&B is off)."""

    def __init__(self, run=None, work_dir: Path | None = None):
        self.run, self.work_dir = run, work_dir

    def finish(self, metrics: dict) -> None:
        """Final metrics into the summary, the stage's tables, then finish the run."""
        if self.run is None:
            return
        try:
            summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.run.summary.update(summary)
            tables = stage_tables(self.work_dir)
            if tables:
                self.run.log(tables)
        except Exception as err:  # noqa: BLE001 - tracking never fails a stage
            log.warning("W&B: could not log the final tables: %s", err)
        self.run.finish()
        self.run = None


@contextlib.contextmanager
def stage_run(cfg, stage: str, kind: str, work_dir: Path) -> Iterator[StageRun]:
    """Open the stage's W&B run for the duration of the block (see the module docstring); a failed
    stage's run finishes with exit code 1."""
    if not enabled(cfg) or resolve_wandb_mode(cfg.logger.wandb.mode) == "disabled" or not _rank_zero():
        yield StageRun()
        return
    from pipeline.config import plain

    wcfg = cfg.logger.wandb
    run = init(mode=wcfg.mode, dir=Path(work_dir), config=plain(cfg), project=wcfg.project, entity=wcfg.entity,
               group=wcfg.group or default_group(cfg), job_type=stage, name=f"{cfg.run_name}/{stage}",
               tags=list(wcfg.tags) + [f"kind:{kind}"])
    # Lightning's training history is stepped by trainer/global_step (as WandbLogger does for its own runs)
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    tracked = StageRun(run, Path(work_dir))
    _ACTIVE.append(run)
    try:
        yield tracked
    except BaseException:
        if tracked.run is not None:
            with contextlib.suppress(Exception):
                tracked.run.finish(exit_code=1)
        raise
    finally:
        _ACTIVE.remove(run)
        if tracked.run is not None:  # the block did not call finish()
            with contextlib.suppress(Exception):
                tracked.run.finish()


def _rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# ----------------------------------------------------------------------------- tables
def _jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if line.strip():
                    rows.append(json.loads(line))
    return rows


def _table(rows: list[dict], columns: list[str] | None = None):
    import wandb

    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])


def stage_tables(work_dir: Path | None) -> dict:
    """W&B tables (and line plots) of the files a stage wrote in ``work_dir``."""
    if work_dir is None:
        return {}
    import wandb

    work_dir = Path(work_dir)
    out: dict = {}
    curve = _jsonl(work_dir / "curve.jsonl")
    if curve:
        cols = ["step"] + [k for k in ("eval/kl", "eval/gold_reward", "eval/proxy_reward", "eval/win_rate")
                           if any(k in p for p in curve)]
        table = _table(curve, cols)
        out["overoptimisation"] = table
        if "eval/kl" in cols:
            for y in ("eval/gold_reward", "eval/proxy_reward"):
                if y in cols:
                    out[f"overoptimisation/{y.split('/')[-1]}_vs_kl"] = wandb.plot.line(
                        table, "eval/kl", y, title=f"held-out {y.split('/')[-1].replace('_', ' ')} vs KL")
    completions = _jsonl(work_dir / "completions.jsonl")
    if completions:
        out["completions"] = _table(completions)
    try:
        ev = json.loads((work_dir / "evaluation.json").read_text())
    except (OSError, json.JSONDecodeError):
        ev = None
    if isinstance(ev, dict):
        policies = ev.get("policies") or {}
        if policies:
            rows = [{"policy": n, **{k: v for k, v in m.items() if isinstance(v, (int, float))}}
                    for n, m in policies.items()]
            out["policies"] = _table(rows)
        examples = _jsonl(work_dir / "examples.jsonl") or ev.get("examples") or []
        if examples:
            out["examples"] = _table(examples)
        for judge, matrix in (ev.get("win_rates") or {}).items():
            rows = [{"policy": a, "opponent": b, "win_rate": c.get("mean"), "ci95": c.get("ci95")}
                    for a, row in matrix.items() for b, c in row.items()]
            if rows:
                out[f"win_rates/{judge}"] = _table(rows)
        for section in ("reward_models", "preference_models"):
            models = ev.get(section) or {}
            rows = [{"model": n, "subset": s, "accuracy": acc} for n, m in models.items()
                    for s, acc in [("all", m.get("accuracy"))] + sorted((m.get("by_subset") or {}).items())]
            if rows:
                out[section] = _table(rows)
    return out


# ----------------------------------------------------------------------------- offline runs
def offline_runs(artifact_dirs) -> list[Path]:
    """Offline W&B runs written inside these artifacts."""
    out = []
    for d in artifact_dirs:
        out += sorted(Path(d).glob("wandb/offline-run-*"))
    return out


def sync_command(runs: list[Path]) -> str | None:
    """The command that uploads offline runs (once credentials exist)."""
    if not runs:
        return None
    return "wandb sync " + " ".join(str(r) for r in runs)
