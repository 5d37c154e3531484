"""``python -m pipeline.dashboard [STUDY_DIR | STORAGE_URL] [--port 8080]``: optuna-dashboard for a study.

STUDY_DIR is a study directory of the tuner (``outputs/studies/<name>``: its ``storage.journal``,
or the database its ``summary.json`` names); STORAGE_URL a database URL
(``postgresql://user:password@host/db``, ``sqlite:///study.db``) or a journal file. Without an
argument: the most recently updated study under ``outputs/studies``.

Before serving, each study gets its objective names (``study.set_metric_names``: ``eval/gold_reward``
instead of "Objective 0") from the tuner's record of its objectives. The server listens on
localhost only (``--host`` to change that) until Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError


def latest_study(root: Path) -> Path | None:
    studies = Path(root) / "outputs" / "studies"
    best = None
    for d in studies.iterdir() if studies.is_dir() else []:
        marker = next((d / f for f in ("storage.journal", "summary.json") if (d / f).exists()), None)
        if marker is not None and (best is None or marker.stat().st_mtime > best[0]):
            best = (marker.stat().st_mtime, d)
    return best[1] if best else None


def resolve_storage(target: str | None, root: Path) -> str:
    """The storage URL (or journal path) of ``target``: a study directory, a URL or a journal file."""
    import json

    from pipeline.tune.storage import JOURNAL_FILE, is_database, mask_url

    if target is None:
        study_dir = latest_study(root)
        if study_dir is None:
            raise ConfigError(f"no study under {Path(root) / 'outputs' / 'studies'}", where="STUDY_DIR",
                              fix="run one (python -m pipeline.tune sweep=...) or pass a study directory or storage URL")
        target = str(study_dir)
        print(f"latest study: {study_dir}", flush=True)
    if is_database(target):
        return target
    path = Path(target)
    if path.is_file():
        return str(path)
    if not path.is_dir():
        raise ConfigError(f"no such study directory or journal file: {path}", where="STUDY_DIR")
    try:
        stored = json.loads((path / "summary.json").read_text()).get("storage")
    except (OSError, json.JSONDecodeError):
        stored = None
    if stored and is_database(stored):
        if "***" in stored:
            raise ConfigError(f"the study lives in a database whose password is not recorded ({stored})",
                              where="STUDY_DIR", fix="pass the storage URL itself: python -m pipeline.dashboard "
                                                     "'postgresql://user:password@host/db'")
        return stored
    if (path / JOURNAL_FILE).is_file():
        return str(path / JOURNAL_FILE)
    raise ConfigError(f"{path} holds no study storage ({JOURNAL_FILE} or a database in summary.json; "
                      f"{mask_url(stored) if stored else 'no summary.json'})", where="STUDY_DIR")


def name_objectives(storage) -> list[str]:
    """Set each study's metric names from the objectives the tuner recorded (when not set yet)."""
    import optuna

    named = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        objectives = study.user_attrs.get("objectives") or []
        names = [o.get("metric") for o in objectives if isinstance(o, dict)]
        if names and len(names) == len(study.directions) and study.metric_names != names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning
                study.set_metric_names(names)
        named.append(f"{summary.study_name} ({', '.join(study.metric_names or names or ['unnamed objective'])})")
    return named


def serve(storage, host: str, port: int, on_ready=None) -> None:
    """Serve optuna-dashboard (threaded wsgiref, like its own CLI) until interrupted."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from optuna_dashboard import wsgi

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # no access log on the console
            pass

    with make_server(host, port, wsgi(storage), server_class=Server, handler_class=QuietHandler) as httpd:
        if on_ready is not None:
            on_ready(httpd.server_port)
        httpd.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.dashboard",
                                 description="optuna-dashboard for a study of python -m pipeline.tune (objective "
                                             "names set on the study).")
    ap.add_argument("target", nargs="?", metavar="STUDY_DIR | STORAGE_URL",
                    help="study directory (outputs/studies/<name>), database URL or journal file; default: the "
                         "latest study under outputs/studies")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    ap.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    args = ap.parse_args(argv)
    try:
        from pipeline.tune.storage import mask_url, open_storage

        url = resolve_storage(args.target, Path(os.environ.get("PIPELINE_ROOT") or Path.cwd()))
        storage = open_storage(url, Path(url).parent if "://" not in url else Path.cwd())
        studies = name_objectives(storage)
    except PipelineError as err:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/bold red] {err.render()}")
        return 2

    def ready(port: int) -> None:
        print(f"optuna-dashboard for {mask_url(url)}: {'; '.join(studies) or 'no studies yet'}")
        print(f"open http://{args.host}:{port}/dashboard/  (Ctrl-C to stop)", flush=True)

    try:
        serve(storage, args.host, args.port, ready)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
