"""``python -m pipeline.tune sweep=<name> [tune.<key>=<value> ...] [pipeline overrides ...]``

A Hydra app over the pipeline's own config: ``sweep=`` and ``tune.*`` are the tuner's
arguments, everything else is a pipeline override applied to every trial (checked by Hydra
like ``python -m pipeline`` checks it). Being a Hydra app, Hydra's launchers start tuner
workers too: ``python -m pipeline.tune -m hydra/launcher=submitit_slurm sweep=ppo
tune.storage=postgresql://... tune.worker=0,1,2,3`` runs four workers of one study.
"""
from __future__ import annotations

import logging
import signal
import sys

USAGE = """usage: python -m pipeline.tune sweep=<name|file.yaml> [tune.<key>=<value> ...] [pipeline overrides ...]

Runs (or resumes) an Optuna study over the pipeline: each trial composes the sweep's base
overrides, your overrides and its sampled values, runs the pipeline on the tuning seeds
(upstream stages come from the stage cache), and the best configuration is re-run on the
test seeds at the end. Outputs: outputs/studies/<study>/ (best.yaml, trials.csv,
test_results.json, summary.json).

  python -m pipeline.tune sweep=ppo                          run / resume the study of sweeps/ppo.yaml
  python -m pipeline.tune sweep=ppo tune.n_trials=32 tune.n_workers=2
  python -m pipeline.tune sweep=ppo rl.total_steps=30        a pipeline override for every trial
  python -m pipeline.tune sweep=ppo tune.storage=postgresql://user@host/db   workers on several machines
  python -m pipeline.tune -m sweep=ppo tune.worker=0,1,2,3 hydra/launcher=submitit_slurm tune.storage=...
  python -m pipeline --config-dir outputs/studies/ppo experiment=best        run the best configuration
  python -m pipeline.tune sweep=ppo_pbt                      population-based training (a sweep with a pbt: section)
  python -m pipeline --config-dir outputs/studies/ppo_pbt experiment=ppo_pbt_schedule   replay the best schedule

tune.* settings (defaults: pipeline/tune/spec.py): study_name, n_trials, timeout, n_workers,
sampler (tpe|random|gp|cmaes|nsga2|grid), pruner (hyperband|successive_halving|median|wilcoxon|none),
seeds, test_seeds, seed_stages, test_top_k, storage, study_dir, heartbeat_interval, grace_period,
max_retries, fail_fast, phase (all|trials|report), worker, progress.
"""

#: command-line flags that take a value (passed on to Hydra and to local workers)
_VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _is_tuner_arg(arg: str) -> bool:
    key = arg.lstrip("+").split("=", 1)[0]
    return key == "sweep" or key.startswith("tune.") or key == "tune"


def _rewrite(args: list[str]) -> tuple[list[str], list[str]]:
    """(args for Hydra, --config-dir values): tuner keys become ``++sweep=`` / ``++tune.x=`` (keys the
    pipeline config does not have; the last one given wins), ``stages.*`` the ``++`` form as in
    ``python -m pipeline``."""
    from pipeline.config.compose import open_sections

    out, config_dirs = [], []
    it = iter(args)
    for arg in it:
        if arg in _VALUE_FLAGS:
            value = next(it, "")
            if arg in ("--config-dir", "-cd"):
                config_dirs.append(value)
            out += [arg, value]
        elif arg.startswith("-"):
            out.append(arg)
        elif _is_tuner_arg(arg):
            out.append("++" + arg.lstrip("+"))
        else:
            out += open_sections([arg])
    return out, config_dirs


def split_overrides(task: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Hydra's task overrides -> (sweep, tune settings without the prefix, pipeline overrides)."""
    sweep, tune, pipeline = None, [], []
    for o in task:
        key, _, value = o.lstrip("+").partition("=")
        if key == "sweep":
            sweep = _unquote(value)
        elif key.startswith("tune."):
            tune.append(f"{key[len('tune.'):]}={value}")
        else:
            pipeline.append(o)
    return sweep, tune, pipeline


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _study_dir_args(args: list[str]) -> list[str]:
    """For a single run: Hydra's run directory is the study directory (its log: tune.log)."""
    import os
    from pathlib import Path

    from pipeline.tune.spec import load_spec

    if any(a.startswith(("hydra.run.dir=", "hydra.job.name=")) for a in args):
        return []
    sweep, tune, _ = split_overrides([a for a in args if not a.startswith("-")])
    if sweep is None:
        from pipeline.errors import ConfigError
        from pipeline.tune.spec import sweep_names

        raise ConfigError("which sweep? pass sweep=<name>", where="sweep",
                          fix=f"sweeps: {', '.join(sweep_names()) or 'none'} (or sweep=<path/to/file.yaml>)")
    root = Path(os.environ.get("PIPELINE_ROOT") or Path.cwd())
    spec = load_spec(sweep, tune, root)
    name = spec.tune.study_name or spec.name
    study_dir = root / (spec.tune.study_dir or Path("outputs") / "studies" / name)
    return [f"hydra.run.dir={study_dir.resolve()}", "hydra.output_subdir=null", "hydra.job.name=tune"]


def _interrupt(signum, frame):  # SIGTERM (e.g. a scheduler's) stops a trial the way Ctrl-C does
    raise KeyboardInterrupt


class _ConsoleFilter(logging.Filter):
    """While the progress display runs, the console shows the tuner's warnings and any error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.name.startswith("pipeline.tune")
                                                   and record.levelno >= logging.WARNING)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig
    from rich.console import Console

    from pipeline.config import CONF_DIR
    from pipeline.config.schema import register_configs
    from pipeline.errors import PipelineError
    from pipeline.run import report_error

    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        from pipeline.tune.spec import sweep_names

        print(USAGE + f"\nsweeps (sweeps/*.yaml): {', '.join(sweep_names())}")
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        hydra_args, config_dirs = _rewrite(args)
        if not any(a in ("-m", "--multirun") or a.startswith("--cfg") or a == "-c" for a in hydra_args):
            hydra_args += _study_dir_args([a for a in hydra_args if not a.startswith("-")])
    except PipelineError as err:
        report_error(err)
        sys.exit(2)
    sys.argv[1:] = hydra_args
    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        from pipeline.tune import run_study

        sweep, tune, overrides = split_overrides(list(HydraConfig.get().overrides.task))
        console = Console(highlight=False)
        handlers = [h for h in logging.getLogger().handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        quiet = not any(t.replace(" ", "") in ("progress=false", "progress=False") for t in tune)
        if quiet:  # library warnings (Lightning's ...) go to the log file, not over the progress display
            logging.captureWarnings(True)
            for h in handlers:
                h.addFilter(_ConsoleFilter())
        try:
            if sweep is None:
                from pipeline.errors import ConfigError

                raise ConfigError("which sweep? pass sweep=<name>", where="sweep")
            run_study(sweep, tune, overrides, root=cfg.paths.root_dir, config_dirs=config_dirs, console=console)
        except PipelineError as err:
            report_error(err)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
