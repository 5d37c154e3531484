"""``python -m pipeline.report [PATH] [--out DIR]``: the report of a run, multirun or study directory."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import PipelineError
    from pipeline.report import default_root, latest, make_report

    ap = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="Write report.html (self-contained: figures embedded, opens offline) and the figures as PNG "
                    "files for a run, a multirun or a study directory.")
    ap.add_argument("path", nargs="?", help="run directory (outputs/runs/<date>/<time>), multirun directory "
                    "(outputs/multirun/<date>/<time>) or study directory (outputs/studies/<name>); default: the "
                    "latest run or multirun under outputs/")
    ap.add_argument("--out", help="where to write report.html and the figures (default: PATH/report)")
    args = ap.parse_args(argv)
    try:
        if args.path is None:
            root = default_root()
            path = latest(root)
            if path is None:
                raise PipelineError(f"no runs under {root / 'outputs'}", where="PATH",
                                    fix="run a pipeline first (python -m pipeline) or pass a directory")
            print(f"latest run: {path}")
        else:
            path = Path(args.path)
        t0 = time.time()
        html = make_report(path, args.out)
    except PipelineError as err:
        from rich.console import Console  # like pipeline.run.report_error, without importing the runner

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/bold red] {err.render()}")
        return 2
    figures = sorted(p.name for p in html.parent.glob("*.png"))
    print(f"report: {html}  ({len(figures)} figures as PNG next to it, {time.time() - t0:.1f}s)")
    print(f"open it: file://{html.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
