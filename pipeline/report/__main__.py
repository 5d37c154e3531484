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
    ap.add_argument("--check", action="store_true",
                    help="open the page in headless Chromium: fail (exit 1) on a console error, a network request "
                         "or a blank figure")
    ap.add_argument("--screenshot", metavar="PNG", help="with --check: save a screenshot of the top of the page")
    ap.add_argument("--height", type=int, default=1400, help="screenshot height in pixels (default 1400)")
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
    if args.check or args.screenshot:
        return _check(html, args.screenshot, args.height)
    return 0


def _check(html: Path, screenshot: str | None, height: int) -> int:
    """The page in headless Chromium (see :mod:`pipeline.report.browser`)."""
    from pipeline.report.browser import check_page, find_chromium

    if find_chromium() is None:
        print("error: --check needs Chromium (apt-get install chromium, or set CHROMIUM=<executable>)", file=sys.stderr)
        return 2
    page = check_page(html, screenshot=Path(screenshot) if screenshot else None, height=height)
    for problem in page.problems():
        print(f"page problem: {problem}", file=sys.stderr)
    print(f"checked in Chromium: {len(page.images)} figures rendered, {len(page.problems())} problem(s)"
          + (f"; screenshot: {screenshot}" if screenshot else ""))
    return 0 if page.ok else 1


if __name__ == "__main__":
    sys.exit(main())
