"""Study storage, the study lock, heartbeats, stale trials and the trial budget.

Storage (``tune.storage``):

- default: an Optuna journal file in the study directory (``storage.journal``), which several
  local processes (or processes on one shared filesystem) append to safely;
- ``postgresql://user@host/db`` (any SQLAlchemy URL: ``sqlite:///x.db``, ``mysql://...``):
  an Optuna RDB storage, so workers on several machines share one study.

Workers claim trials under a **study lock** (a file lock next to a file storage, a PostgreSQL
advisory lock or a MySQL named lock for a database), so that the budget is exact with any
number of workers: a worker only starts a trial while fewer than ``tune.n_trials`` trials
count. Retried trials do not count twice.

**Heartbeats.** The worker running a trial records ``heartbeat`` (a timestamp) in the trial's
user attributes every ``tune.heartbeat_interval`` seconds, and ``worker`` (host, pid, id). A
RUNNING trial is *stale* when its worker's process is gone (same host) or its heartbeat is older
than ``tune.grace_period``; the next worker to claim a trial marks it failed (``fail_reason``)
and enqueues a retry with the same parameters (``retry_of``), up to ``tune.max_retries`` times.
One mechanism for every storage: Optuna's own RDB heartbeat is tied to ``Study.optimize``
(this tuner uses ask/tell) and fails a trial before the reason can be recorded.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline.tune")

JOURNAL_FILE = "storage.journal"
#: trial user attributes this module writes
HEARTBEAT, WORKER, FAIL_REASON, RETRY_OF, RETRY_HISTORY, RETRIED = (
    "heartbeat", "worker", "fail_reason", "retry_of", "retry_history", "retried")

#: this process as a worker: host, pid and a random id (a reused pid is not mistaken for it)
WORKER_ID = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}


def mask_url(url: str) -> str:
    """A storage URL with its password hidden (for messages and files)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", str(url))


def is_database(url: str | None) -> bool:
    return bool(url) and "://" in str(url)


def open_storage(url: str | None, study_dir: Path):
    """An Optuna storage for ``tune.storage`` (None: the journal file in the study directory)."""
    import optuna

    if not is_database(url):
        path = Path(url) if url else Path(study_dir) / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return _open_rdb(str(url))
    except ImportError as err:
        raise ConfigError(f"no database driver for {mask_url(url)}: {str(err).splitlines()[0]}", where="tune.storage",
                          fix="pip install 'psycopg[binary]' (PostgreSQL) or the driver your URL names") from None
    except Exception as err:  # connection refused, bad credentials, unknown database ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot open the study storage {mask_url(url)}: {mask_url(first)}", where="tune.storage",
                          fix="check that the database server runs and the URL (user, host, port, database)") from None


def _open_rdb(url: str, attempts: int = 5):
    """Optuna's RDB storage. Workers started together on a fresh database race to create its
    tables (one loses with a unique-constraint violation on the catalog): that worker retries
    after a short random pause, by which time the tables exist."""
    import random
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (IntegrityError, ProgrammingError) as err:  # "duplicate key" / "already exists" while creating
            if attempt == attempts - 1 or not any(s in str(err) for s in ("duplicate key", "already exists")):
                raise
            time.sleep(0.2 + random.random())


class StudyLock:
    """Serialises claiming trials, recovering stale ones and writing a new study's settings.

    A file lock (``fcntl.flock``) for file storages, an advisory lock (PostgreSQL) or a named
    lock (MySQL) for databases: workers on several machines serialise through the database.
    """

    def __init__(self, url: str | None, study_dir: Path, study_name: str, storage=None):
        self.url, self.storage, self.study_name = url, storage, study_name
        if is_database(url) and not str(url).startswith("sqlite"):
            self.path = None
        else:
            # next to the file every worker opens (the journal, or the SQLite database)
            base = Path(str(url).split("///", 1)[-1]).parent if url else Path(study_dir)
            self.path = base / f".{study_name}.lock"
        self.key = int.from_bytes(hashlib.sha256(f"pipeline.tune:{study_name}".encode()).digest()[:8], "big",
                                  signed=True)
        self._local = threading.RLock()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._local:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(fh, fcntl.LOCK_UN)
                return
            with self._database_lock():
                yield

    @contextlib.contextmanager
    def _database_lock(self) -> Iterator[None]:
        from sqlalchemy import text

        engine = self.storage.engine
        dialect = engine.dialect.name
        if dialect == "postgresql":
            acquire, release = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
            params = {"k": self.key}
        elif dialect in ("mysql", "mariadb"):
            acquire, release = "SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"
            params = {"k": f"pipeline.tune.{self.study_name}"[:64]}
        else:  # pragma: no cover - other databases: Optuna's own transactions only
            log.warning("no study lock for %s databases: the trial budget may be exceeded by a few trials", dialect)
            yield
            return
        with engine.connect() as conn:
            conn.execute(text(acquire), params)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text(release), params)
                conn.commit()


class Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds in a background thread."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT, time.time())
            except Exception:  # finished meanwhile (or declared stale by another worker): stop beating
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _pid_alive(pid: int, worker_id: str | None) -> bool:
    if pid == os.getpid():
        return worker_id == WORKER_ID["id"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def stale_reason(trial, grace_period: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial is stale (its worker is gone), or None while it looks alive."""
    now = time.time() if now is None else now
    w = trial.user_attrs.get(WORKER) or {}
    if w.get("host") == WORKER_ID["host"] and w.get("pid") and not _pid_alive(int(w["pid"]), w.get("id")):
        return f"worker {w['host']}:{w['pid']} stopped while running it"
    beat = trial.user_attrs.get(HEARTBEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - float(beat) > grace_period:
        who = f" (worker {w.get('host')}:{w.get('pid')})" if w else ""
        return f"no heartbeat for {now - float(beat):.0f}s{who}"
    return None


def counts_toward_budget(trial) -> bool:
    """Every trial counts, except a stale one that was retried (its retry counts instead)."""
    from optuna.trial import TrialState

    return not (trial.state == TrialState.FAIL and trial.user_attrs.get(RETRIED))


def fail_and_retry(study, trial, reason: str, max_retries: int) -> bool:
    """Mark a RUNNING trial failed with ``reason`` and enqueue a retry with its parameters
    (unless it was retried ``max_retries`` times already). False if it had finished meanwhile."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage
    history = list(trial.user_attrs.get(RETRY_HISTORY, [])) + [trial.number]
    retry = len(history) <= max_retries
    try:
        storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason + (
            "; retried" if retry else f"; not retried (tune.max_retries={max_retries})"))
        storage.set_trial_user_attr(trial._trial_id, RETRIED, retry)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    if retry:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: history[0], RETRY_HISTORY: history})
    log.warning("trial %d: %s%s", trial.number, reason, "; retrying it" if retry else "")
    return True


def recover_stale(study, grace_period: float, max_retries: int) -> list[tuple[int, str]]:
    """Fail the study's stale RUNNING trials (recording why) and enqueue their retries.
    Call under the study lock. Returns (trial number, reason) for each."""
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(t, grace_period)
        if reason is not None and fail_and_retry(study, t, reason, max_retries):
            out.append((t.number, reason))
    return out


def budget_left(study, n_trials: int | None) -> int | None:
    """Trials that may still be started (None: no trial budget)."""
    if n_trials is None:
        return None
    return n_trials - sum(1 for t in study.get_trials(deepcopy=False) if counts_toward_budget(t))


def claim(study, lock: StudyLock, *, n_trials: int | None, grace_period: float, max_retries: int,
          worker_index: int, allow_new: bool = True):
    """Under the study lock: recover stale trials, then start a trial (a waiting retry or
    enqueued one first) if the budget allows. Returns the trial or None."""
    from optuna.trial import TrialState

    with lock():
        recover_stale(study, grace_period, max_retries)
        if not allow_new:  # past tune.timeout
            return None
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        left = budget_left(study, n_trials)
        if not waiting and left is not None and left <= 0:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask()
        trial.set_user_attr(WORKER, {**WORKER_ID, "index": worker_index})
        trial.set_user_attr(HEARTBEAT, time.time())
        return trial
