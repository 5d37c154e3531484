"""TensorBoard HParams: a run's (or a study trial's) hyperparameters and final metrics written as
one HParams session, so that ``tensorboard --logdir <multirun or study directory>`` compares
the jobs / trials in its HParams view (table, parallel coordinates, scatter plots).

Written when ``tensorboard`` is in ``logger.backends``: by the runner into ``<run>/hparams/``
(a multirun's jobs are ``<multirun>/<job>/hparams/``) and by the tuner into
``<study>/tensorboard/trial-<n>/``.
"""
from __future__ import annotations

import math
from pathlib import Path

HPARAMS_DIR = "hparams"


def enabled(cfg) -> bool:
    return "tensorboard" in list(cfg.logger.backends)


def _hparam(v):
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    return str(v)


def parse_overrides(overrides) -> dict:
    """``key=value`` overrides -> {key: value} (values typed as YAML reads them)."""
    import yaml

    out = {}
    for o in overrides or []:
        key, sep, value = str(o).partition("=")
        if not sep:
            continue
        try:
            v = yaml.safe_load(value)
        except yaml.YAMLError:
            v = value
        out[key.lstrip("+~")] = v if isinstance(v, (int, float, str, bool)) else value
    return out


def write_hparams(logdir: Path, hparams: dict, metrics: dict) -> Path:
    """One HParams session in ``logdir``: ``hparams`` (numbers, strings, booleans; anything else
    as text) and the finite numbers of ``metrics`` (also as scalars, which the view reads)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    hp = {str(k): _hparam(v) for k, v in hparams.items()}
    mt = {str(k): float(v) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    exp, ssi, sei = hparams_summary(hp, mt)
    with SummaryWriter(log_dir=str(logdir)) as w:
        fw = w._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)
        for k, v in mt.items():
            w.add_scalar(k, v)
    return logdir


def run_metrics(results: dict, headline: dict[str, list]) -> dict:
    """``<stage>/<metric>`` for the stages' headline metrics and the evaluations' top-level ones."""
    from pipeline.summary import headline_keys

    out = {}
    for name, st in results["stages"].items():
        m = st["metrics"]
        keys = headline_keys(m, headline.get(name, ()))
        if st["kind"] == "evaluate":
            keys += [k for k in m if k.count("/") == 1]
        for k in dict.fromkeys(keys):
            out[f"{name}/{k}"] = m[k]
    return out
