"""Content-addressed stage cache: fingerprint, manifest, atomic publish, verified lookup.

A stage's artifact lives in ``<artifact_dir>/<kind>-<fingerprint>/`` and holds what
the stage produced (an HF-format model in safetensors, tokenizer, metrics, logs) plus
``manifest.json``. The fingerprint hashes the stage kind, the config it depends on and
its inputs' fingerprints, so identical stages are reused across runs, sweeps and
multiruns, and changing a downstream setting keeps upstream artifacts.

Safety, for a cache shared by many processes, containers and hosts:

- **Atomic publish.** A stage builds in ``.tmp/<kind>-<fp>-<host>-<pid>-<nonce>/``; only a
  finished build gets its manifest and is renamed into place. The builder holds an
  exclusive lock on ``<build dir>.lock`` while it works; a run cleaning ``.tmp/`` removes
  only build directories whose lock it can take (their builder is gone), never by pid.
- **Verified reuse.** The manifest records every file's size and SHA-256; a lookup checks
  them (``verify="hash"``, or sizes only with ``verify="size"``) and treats a truncated,
  edited or missing file as no artifact (rebuilt, with a warning naming the file).
- **No bad publishes.** A stage whose final metrics are not finite fails instead of publishing.
- **Resumable builds.** A training stage checkpoints into ``.tmp/<kind>-<fp>.resume/``
  (:mod:`pipeline.resume`), which outlives a killed builder (``clean_tmp`` keeps it) and is
  removed when the artifact is published; a rerun of the same stage continues from it.
- **One builder per stage.** A per-fingerprint lock, whose holder (host, pid, since) is
  reported while another process waits; ``lock_timeout_s`` bounds the wait. Lookups of
  complete artifacts take no lock, so a fully cached run works on a read-only cache.
- Published files are readable by the group/others (the process umask applies).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError, TrainingError

log = logging.getLogger("pipeline")

MANIFEST = "manifest.json"
#: bump when the meaning of a stage's outputs changes, to invalidate old caches
CACHE_VERSION = 3
VERIFY_MODES = ("hash", "size", "none")
#: ``.tmp/<kind>-<fp>.resume/``: a stage's mid-stage checkpoints (see :meth:`ArtifactStore.resume_path`)
RESUME_SUFFIX = ".resume"


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


def runtime_info() -> dict:
    """What can change numbers without changing the config (recorded, not part of the key)."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "host": socket.gethostname(), "pid": os.getpid()}


#: local data files up to this size are fingerprinted by content, larger ones by size + mtime
_DATA_HASH_LIMIT = 256 * 2 ** 20


def data_digest(path: str) -> str | None:
    """What a stage's output depends on of a local data file or directory: its content (SHA-256;
    size and modification time for files over 256 MiB), so editing a file is a new fingerprint.
    None for a Hub dataset name (identified by its name, config and split)."""
    root = Path(path).expanduser()
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(p.relative_to(root).as_posix().encode() if p != root else b".")
        h.update(_sha256(p).encode() if st.st_size <= _DATA_HASH_LIMIT else f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` but the manifest."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


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
        """The artifact at ``path`` if its manifest says complete (files not verified: see
        :meth:`problem`)."""
        mpath = Path(path) / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("status") != "complete":
            return None
        return cls(Path(path), manifest)

    def problem(self, verify: str = "hash") -> str | None:
        """Why the files on disk do not match the manifest (None when they do)."""
        files = self.manifest.get("files")
        if files is None or verify == "none":
            return None  # a manifest from before checksums: trusted as before
        for rel, meta in files.items():
            p = self.path / rel
            try:
                size = p.stat().st_size
            except OSError:
                return f"{p} is missing"
            if size != meta["size"]:
                return f"{p} has {size} bytes, the manifest recorded {meta['size']} (truncated or replaced)"
            if verify == "hash" and _sha256(p) != meta["sha256"]:
                return f"{p} does not match its recorded SHA-256 (modified or corrupted)"
        return None


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def _fs_error(err: OSError, path: Path) -> PipelineError:
    why = os.strerror(err.errno) if err.errno else str(err)
    return PipelineError(f"cannot write to {path}: {why}", where="paths.artifact_dir",
                         fix="point paths.artifact_dir (or PIPELINE_ROOT) at a writable directory with free space")


class ArtifactStore:
    """The shared directory of published stage artifacts."""

    def __init__(self, root: str | Path, *, verify: str = "hash", lock_timeout_s: float | None = None):
        self.root = Path(root)
        self.verify = verify
        self.lock_timeout_s = lock_timeout_s

    def path_for(self, kind: str, fp: str) -> Path:
        return self.root / f"{kind}-{fp}"

    def resume_path(self, kind: str, fp: str) -> Path:
        """Where a stage keeps its mid-stage checkpoints (:mod:`pipeline.resume`) until it publishes:
        keyed by the fingerprint, so a rerun of the killed stage finds them; left alone by
        :meth:`clean_tmp`; removed when the artifact is published."""
        return self.root / ".tmp" / f"{kind}-{fp}{RESUME_SUFFIX}"

    def lookup(self, kind: str, fp: str) -> Artifact | None:
        """The verified artifact, or None (absent, incomplete, or its files do not match)."""
        art = Artifact.load(self.path_for(kind, fp))
        if art is None:
            return None
        problem = art.problem(self.verify)
        if problem:
            log.warning("cached %s-%s is damaged and will be rebuilt: %s", kind, fp, problem)
            return None
        return art

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def lock(self, kind: str, fp: str) -> Iterator[None]:
        """Inter-process lock so parallel workers never build one stage twice.

        While waiting, says who holds it (host, pid, since); gives up after
        ``lock_timeout_s`` (None: wait as long as it takes) with an error naming the holder."""
        lock_dir = self.root / ".locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fh = open(lock_dir / f"{kind}-{fp}.lock", "a+")
        except OSError as err:
            raise _fs_error(err, lock_dir) from None
        with fh:
            start, noted = time.time(), None
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _read_holder(fh)
                    now = time.time()
                    if self.lock_timeout_s is not None and now - start > self.lock_timeout_s:
                        raise PipelineError(f"stage {kind}-{fp} is being built by {holder}; gave up waiting after "
                                            f"{self.lock_timeout_s:g} s", where="cache.lock_timeout_s",
                                            fix="wait for that process, stop it if it is stuck, or raise "
                                                "cache.lock_timeout_s") from None
                    if noted is None or now - noted >= 30:
                        log.warning("waiting for stage %s-%s: being built by %s", kind, fp, holder)
                        noted = now
                    time.sleep(0.5)
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": _dt.datetime.now().isoformat(timespec="seconds")}))
            fh.flush()
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ----------------------------------------------------------------- builds
    @contextlib.contextmanager
    def build(self, kind: str, fp: str, manifest: dict) -> Iterator[tuple[Path, dict]]:
        """Context for producing an artifact.

        Yields ``(work_dir, record)``; the stage writes files into ``work_dir`` and puts
        its final metrics in ``record["metrics"]``. On normal exit the metrics are checked
        (finite), the file table and manifest are written and the directory is renamed into
        place (atomic on one filesystem). On error the work directory is removed and nothing
        is published. Non-zero ranks (torchrun / ddp subprocess launch) work in a scratch
        dir and wait for rank 0's artifact.
        """
        final = self.path_for(kind, fp)
        tmp_root = self.root / ".tmp"
        name = f"{final.name}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        work = tmp_root / name
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
            guard = open(tmp_root / f"{name}.lock", "w")
            fcntl.flock(guard, fcntl.LOCK_EX)
            work.mkdir(parents=True)
        except OSError as err:
            raise _fs_error(err, tmp_root) from None
        record: dict = {"metrics": {}}
        start = time.time()
        try:
            try:
                yield work, record
                bad = [k for k, v in record["metrics"].items() if not _finite(v)]
                if bad:
                    raise TrainingError(f"stage {kind} finished with non-finite metrics {bad}; not published",
                                        where=manifest.get("stage", kind),
                                        fix="lower the learning rate, check the inputs, or rerun with force_stages")
                if _rank() == 0:
                    self._publish(work, final, manifest, record, fp, kind, start)
                    shutil.rmtree(self.resume_path(kind, fp), ignore_errors=True)
            except OSError as err:
                raise _fs_error(err, self.root) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(tmp_root / f"{name}.lock")
            guard.close()
        if _rank() != 0:
            self._wait_for(final)

    def _publish(self, work: Path, final: Path, manifest: dict, record: dict, fp: str, kind: str,
                 start: float) -> None:
        full = dict(manifest)
        full.update(
            fingerprint=fp,
            kind=kind,
            status="complete",
            metrics=record["metrics"],
            versions=versions(),
            runtime=runtime_info(),
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            duration_s=round(time.time() - start, 3),
        )
        for k, v in record.items():
            if k != "metrics":
                full[k] = v
        _share(work)
        full["files"] = file_table(work)
        tmp_manifest = work / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(full, indent=2, sort_keys=True, default=str, allow_nan=False))
        os.replace(tmp_manifest, work / MANIFEST)
        _share(work / MANIFEST)
        if final.exists():  # a damaged/incomplete directory or a forced rebuild
            trash = final.parent / ".tmp" / f"{final.name}-old-{uuid.uuid4().hex[:6]}"
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
        """Remove build directories whose builder is gone: those whose lock can be taken.

        A live build (this host or another sharing the directory, any container) holds its
        lock and is left alone; a read-only cache is left as it is."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for d in tmp_root.iterdir():
            if not d.is_dir() or d.name.endswith(RESUME_SUFFIX):  # a killed stage's checkpoints: kept
                continue
            lock = tmp_root / f"{d.name}.lock"
            try:
                fh = open(lock, "a")
            except OSError:
                continue  # read-only cache: nothing to clean
            with fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its builder is alive
                shutil.rmtree(d, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.unlink(lock)


def _host_tag() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:24] or "host"


def _read_holder(fh) -> str:
    try:
        fh.seek(0)
        info = json.loads(fh.read() or "{}")
        return f"host {info['host']} pid {info['pid']} (since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _share(path: Path) -> None:
    """Make published files readable like any other file (some writers create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        mode = (0o777 if p.is_dir() else 0o666) & ~mask
        with contextlib.suppress(OSError):
            os.chmod(p, mode | (p.stat().st_mode & 0o700))
