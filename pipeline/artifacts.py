"""Content-addressed stage cache: fingerprint, manifest, atomic publish, lookup.

A stage's artifact lives in ``<artifact_dir>/<kind>-<fingerprint>/`` and holds what
the stage produced (an HF-format model in safetensors, tokenizer, metrics, logs) plus
``manifest.json``. The fingerprint hashes the stage kind, the config it depends on and
its inputs' fingerprints, so identical stages are reused across runs, sweeps and
multiruns, and changing a downstream setting keeps upstream artifacts.

Publishing is atomic: the stage writes into ``.tmp/<name>-<pid>/``; only when it
finished does the manifest get written and the directory renamed into place. A run
killed mid-stage leaves no half artifact; rerunning resumes at that stage.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
#: bump when the meaning of a stage's outputs changes, to invalidate old caches
CACHE_VERSION = 3


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(kind: str, config: dict, inputs: dict[str, Any]) -> str:
    """Hash of the stage kind, its resolved config and its inputs' fingerprints."""
    payload = {"cache_version": CACHE_VERSION, "kind": kind, "config": config, "inputs": inputs}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the stack, recorded in every manifest."""
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "lightning", "tokenizers", "datasets", "peft", "hydra", "omegaconf"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional packages
            pass
    try:
        from importlib.metadata import version

        out["rlhf-pipeline"] = version("rlhf-pipeline")
    except Exception:  # pragma: no cover
        pass
    return out


@dataclass
class Artifact:
    """A published stage output."""

    path: Path
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @classmethod
    def load(cls, path: Path) -> "Artifact | None":
        mpath = Path(path) / MANIFEST
        if not mpath.is_file():
            return None
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("status") != "complete":
            return None
        return cls(Path(path), manifest)


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


class ArtifactStore:
    """The shared directory of published stage artifacts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, kind: str, fp: str) -> Path:
        return self.root / f"{kind}-{fp}"

    def lookup(self, kind: str, fp: str) -> Artifact | None:
        return Artifact.load(self.path_for(kind, fp))

    @contextlib.contextmanager
    def lock(self, kind: str, fp: str) -> Iterator[None]:
        """Inter-process lock so parallel sweep workers never build one stage twice."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{kind}-{fp}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def build(self, kind: str, fp: str, manifest: dict) -> Iterator[tuple[Path, dict]]:
        """Context for producing an artifact.

        Yields ``(work_dir, record)``; the stage writes files into ``work_dir`` and puts
        its final metrics in ``record["metrics"]``. On normal exit the manifest is written
        and the directory renamed into place (atomic on one filesystem). On error the work
        directory is removed and nothing is published. Non-zero ranks (torchrun / ddp
        subprocess launch) work in a scratch dir and wait for rank 0's artifact.
        """
        final = self.path_for(kind, fp)
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        work = tmp_root / f"{final.name}-{os.getpid()}"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        record: dict = {"metrics": {}}
        start = time.time()
        try:
            yield work, record
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if _rank() != 0:
            shutil.rmtree(work, ignore_errors=True)
            self._wait_for(final)
            return
        full = dict(manifest)
        full.update(
            fingerprint=fp,
            kind=kind,
            status="complete",
            metrics=record["metrics"],
            versions=versions(),
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            duration_s=round(time.time() - start, 3),
        )
        for k, v in record.items():
            if k != "metrics":
                full[k] = v
        tmp_manifest = work / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
        os.replace(tmp_manifest, work / MANIFEST)
        if final.exists():  # a stale/incomplete directory or a forced rebuild
            trash = tmp_root / f"{final.name}-old-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(work, final)

    def _wait_for(self, final: Path, timeout_s: float = 3600.0) -> None:
        deadline = time.time() + timeout_s
        while Artifact.load(final) is None:
            if time.time() > deadline:
                raise TimeoutError(f"rank {_rank()} timed out waiting for {final}")
            time.sleep(0.5)

    def clean_tmp(self) -> None:
        """Remove work directories of dead processes (killed runs)."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for d in tmp_root.iterdir():
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True
