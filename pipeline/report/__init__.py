"""Reports: ``python -m pipeline.report [PATH]`` turns a run, a multirun or a study directory into
one self-contained HTML page (``report.html``, figures embedded; opens offline) and the same
figures as PNG files next to it.

Modules: :mod:`~pipeline.report.page` (the HTML page), :mod:`~pipeline.report.data` (reading run
directories, tolerating damage), :mod:`~pipeline.report.plots` (run and multirun figures),
:mod:`~pipeline.report.run`, :mod:`~pipeline.report.multirun`, :mod:`~pipeline.report.study`
(the three kinds of report), :mod:`~pipeline.report.browser` (a headless-Chromium check of a page).

From Python::

    from pipeline.report import make_report
    html_path = make_report("outputs/runs/2026-01-01/12-00-00-000000")
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import PipelineError

#: the directory (inside the reported one) that receives report.html and the figures
REPORT_DIR = "report"


def kind_of(path: Path) -> str | None:
    """``run``, ``multirun``, ``study`` or None for a directory that is none of them."""
    from pipeline.report.data import is_run_dir

    path = Path(path)
    if any((path / f).exists() for f in ("summary.json", "trials.csv", "storage.journal")):
        return "study"
    if is_run_dir(path):
        return "run"
    # a Hydra multirun (jobs 0, 1, ...), or any directory of runs: a day of outputs/runs, a trial's seeds
    if (path / "multirun.yaml").exists() or any(d.is_dir() and is_run_dir(d) for d in _children(path)):
        return "multirun"
    return None


def _children(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def latest(root: Path) -> Path | None:
    """The newest run or multirun under ``root/outputs`` (Hydra's ``<date>/<time>`` directories)."""
    best: tuple[str, Path] | None = None
    for sub in ("runs", "multirun"):
        for day in _children(Path(root) / "outputs" / sub):
            for d in _children(day):
                if d.is_dir() and not d.name.startswith(".") and kind_of(d) is not None:
                    key = f"{day.name}/{d.name}"
                    if best is None or key > best[0]:
                        best = (key, d)
    return best[1] if best else None


def make_report(path, out_dir=None) -> Path:
    """Write the report of ``path`` (run, multirun or study directory) into ``out_dir`` (default
    ``<path>/report``); returns the path of ``report.html``."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"no such directory: {path} (pass a run, multirun or study directory)", where="PATH")
    if not path.is_dir():
        raise PipelineError(f"{path} is a file, not a run, multirun or study directory", where="PATH")
    kind = kind_of(path)
    if kind is None:
        raise PipelineError(f"{path} is not a run, multirun or study directory (no config.yaml, results.json, "
                            f"run.json, multirun.yaml or summary.json in it)", where="PATH")
    import matplotlib

    matplotlib.use("Agg", force=False)
    if kind == "run":
        from pipeline.report.run import build
    elif kind == "multirun":
        from pipeline.report.multirun import build
    else:
        from pipeline.report.study import build
    page = build(path)
    return page.write(Path(out_dir) if out_dir else path / REPORT_DIR)


def default_root() -> Path:
    return Path(os.environ.get("PIPELINE_ROOT") or Path.cwd())
