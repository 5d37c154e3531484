"""Reading what runs leave on disk, tolerating damage: every reader returns what it could read and
records what it could not in ``problems`` (shown on the page) instead of raising.

A run directory (:mod:`pipeline.run`) holds ``config.yaml``, ``results.json`` (final metrics per
stage; written when the run finishes), ``run.json`` (reused / seconds / headline metrics per stage,
versions), ``run.log`` and ``stages/<name>`` links to the stage artifacts (each with its
``manifest.json``, ``logs/metrics.csv`` for training stages, ``curve.jsonl`` / ``completions.jsonl``
for online stages, ``evaluation.json`` / ``examples.jsonl`` for evaluations).
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.summary import headline_keys

#: metrics shown in summaries when a run does not record its stages' headline (runs made before it did)
DEFAULT_HEADLINE = ("eval/gold_reward", "eval/proxy_reward", "eval/kl", "eval/win_rate", "eval/rm_accuracy",
                    "eval/pm_accuracy", "val/loss", "val/accuracy", "rollout/reward_mean", "train/steps")


class Problems(list):
    """What could not be read (one line each)."""

    def add(self, text: str) -> None:
        if text not in self:
            self.append(text)


def read_json(path: Path, problems: Problems, what: str | None = None, *, required: bool = True):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            problems.add(f"{what or path.name} is missing ({path})")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.add(f"{what or path.name} is unreadable ({path}: {str(err).splitlines()[0]})")
    return None


def read_jsonl(path: Path, problems: Problems) -> list[dict]:
    """Rows of a JSON-lines file; a malformed line (e.g. the last one of a killed writer) is skipped."""
    rows, bad = [], 0
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        problems.add(f"{path} is unreadable: {err}")
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        problems.add(f"{path}: {bad} malformed line(s) skipped")
    return rows


def read_yaml(path: Path, problems: Problems, what: str):
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        problems.add(f"{what} is missing ({path})")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        problems.add(f"{what} is unreadable ({path}: {str(err).splitlines()[0]})")
    return None


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_metrics_csv(path: Path, problems: Problems) -> dict[str, list[tuple[float, float]]]:
    """Lightning's ``metrics.csv``: metric -> [(step, value)] (empty cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            for i, row in enumerate(reader):
                step = _number(row.get("step")) if "step" in row else float(i)
                if step is None:
                    step = float(i)
                for k, v in row.items():
                    if k in (None, "step", "epoch"):
                        continue
                    x = _number(v)
                    if x is not None:
                        series.setdefault(k, []).append((step, x))
    except FileNotFoundError:
        problems.add(f"no metrics file {path}")
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        problems.add(f"{path} is unreadable: {err}")
    return series


# ----------------------------------------------------------------------------- a run
@dataclass
class StageData:
    name: str
    kind: str
    #: the artifact directory (None: the stage has none: not run, failed, or its link is broken)
    path: Path | None
    metrics: dict = field(default_factory=dict)
    reused: bool | None = None
    seconds: float | None = None
    headline: list[str] = field(default_factory=list)
    manifest: dict | None = None

    def file(self, name: str) -> Path | None:
        return self.path / name if self.path is not None else None

    @property
    def headline_metrics(self) -> dict:
        keys = headline_keys(self.metrics, self.headline or DEFAULT_HEADLINE)
        return {k: self.metrics[k] for k in keys}


@dataclass
class RunData:
    dir: Path
    config: dict | None
    results: dict | None
    info: dict | None
    stages: list[StageData]
    problems: Problems
    #: errors the run logged (``run.log``)
    errors: list[str]

    @property
    def overrides(self) -> list[str]:
        if self.info and self.info.get("overrides") is not None:
            return [str(o) for o in self.info["overrides"]]
        if self.config and self.config.get("overrides"):
            return [str(o) for o in self.config["overrides"]]
        hydra = self.dir / ".hydra" / "overrides.yaml"
        if hydra.is_file():
            got = read_yaml(hydra, Problems(), "overrides")
            return [str(o) for o in got or []]
        return []

    @property
    def finished(self) -> bool:
        return self.results is not None

    def stage(self, name: str) -> StageData | None:
        return next((s for s in self.stages if s.name == name), None)


def is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in ("config.yaml", "results.json", "run.json")) or (path / "stages").is_dir()


def _artifact(run_dir: Path, name: str) -> Path | None:
    link = run_dir / "stages" / name
    if link.is_dir():
        return link.resolve()
    alt = link.with_suffix(".path")  # filesystems without symlinks
    if alt.is_file():
        p = Path(alt.read_text().strip())
        return p if p.is_dir() else None
    return None


def _log_errors(run_dir: Path) -> list[str]:
    try:
        lines = (run_dir / "run.log").read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        m = re.search(r"\]\[(ERROR|CRITICAL)\] (.*)$", line)
        if m:
            out.append(m.group(2))
    return out


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    problems = Problems()
    config = read_yaml(run_dir / "config.yaml", problems, "the resolved config (config.yaml)")
    results = read_json(run_dir / "results.json", problems, "results.json (written when a run finishes)")
    info = read_json(run_dir / "run.json", problems, "run.json (timings, versions)")
    errors = _log_errors(run_dir)
    planned: list[tuple[str, str]] = []
    try:
        planned = [(str(s["name"]), str(s["kind"])) for s in config["pipeline"]["stages"]]
    except (TypeError, KeyError):
        pass
    res_stages = (results or {}).get("stages") or {}
    info_stages = (info or {}).get("stages") or {}
    names = [n for n, _ in planned] + [n for n in res_stages if n not in dict(planned)]
    linked = sorted(p.name.removesuffix(".path") for p in (run_dir / "stages").iterdir()) \
        if (run_dir / "stages").is_dir() else []
    names += [n for n in linked if n not in names]
    stages = []
    for name in names:
        kind = dict(planned).get(name) or (res_stages.get(name) or {}).get("kind") or "?"
        path = _artifact(run_dir, name)
        manifest = read_json(path / "manifest.json", problems, f"stage {name}: manifest.json") if path else None
        metrics = (res_stages.get(name) or {}).get("metrics") or (manifest or {}).get("metrics") or {}
        si = info_stages.get(name) or {}
        st = StageData(name, kind if kind != "?" else (manifest or {}).get("kind", "?"), path,
                       {k: v for k, v in metrics.items() if not str(k).startswith("perf/")},
                       si.get("reused"), si.get("seconds"), list(si.get("headline") or []), manifest)
        if path is None:
            if (run_dir / "stages" / name).is_symlink():
                problems.add(f"stage {name}: its artifact link is broken ({(run_dir / 'stages' / name)} -> "
                              f"{(run_dir / 'stages' / name).readlink()})")
            else:
                problems.add(f"stage {name} ({st.kind}): no artifact (it did not run or did not finish)")
        stages.append(st)
    if results is None and errors:
        problems.add("the run log says: " + errors[-1])
    return RunData(run_dir, config, results, info, stages, problems, errors)
