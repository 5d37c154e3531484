"""python -m pipeline.dashboard: optuna-dashboard on localhost for a study directory, with the objective
names set on the study; read through its HTTP API, then stopped."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.report_helpers import NAME, OBJECTIVES, make_study_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_dashboard_serves_the_study_with_its_objective_names(tmp_path):
    import optuna

    from pipeline.tune.storage import open_storage

    study_dir = make_study_dir(tmp_path)
    port = _free_port()
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.dashboard", str(study_dir), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, studies = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.5)
        assert studies is not None, proc.stderr.read() if proc.poll() is not None else "no answer"
        (summary,) = studies["study_summaries"]
        assert summary["study_name"] == NAME and summary["directions"] == ["maximize", "minimize"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert detail["objective_names"] == [o["metric"] for o in OBJECTIVES]
        assert len(detail["trials"]) == 7
        assert sorted(t["number"] for t in detail["best_trials"]) == [0, 1, 3]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert f"open http://127.0.0.1:{port}/dashboard/" in out
    assert proc.returncode == 0, err
    study = optuna.load_study(study_name=NAME, storage=open_storage(None, study_dir))
    assert study.metric_names == [o["metric"] for o in OBJECTIVES]  # set on the study itself


def test_dashboard_without_a_study_is_one_error(tmp_path):
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path))
    for args, text in (([], "no study under"), ([str(tmp_path / "nope")], "no such study directory"),
                       (["--port", "1"], "no study under")):
        proc = subprocess.run([sys.executable, "-m", "pipeline.dashboard", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: STUDY_DIR: ") and text in proc.stderr.splitlines()[0]
    # a study directory whose database password was masked asks for the URL
    study_dir = tmp_path / "outputs" / "studies" / "db"
    study_dir.mkdir(parents=True)
    (study_dir / "summary.json").write_text(json.dumps({"storage": "postgresql://u:***@host/optuna"}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.dashboard", str(study_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "pass the storage URL itself" in proc.stderr
