"""Staged runner: ``python -m pipeline [overrides]`` or :func:`run_pipeline` from Python.

Runs the stages of ``cfg.pipeline.stages`` in order, each with its effective config
(:func:`pipeline.config.stage_configs`: the run's config plus the stage's own settings).
Each stage is looked up in the artifact store by its fingerprint and reused when present
(unless ``force=true``); otherwise it runs and publishes atomically. The run directory
receives the resolved config (``config.yaml``), ``results.json`` (final metrics per stage;
identical across reruns of the same config) and ``run.json`` (timings, which stages were
reused, versions, seed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR, stage_configs  # noqa: F401  (CONF_DIR: public, used by callers)
from pipeline.config.compose import check_renamed, open_sections
from pipeline.errors import ConfigError, Interrupted, PipelineError, StopRun
from pipeline.registry import closest
from pipeline.tasks import build_task

log = logging.getLogger("pipeline")

#: old stage kinds -> new ones
RENAMED_KINDS = {"policy": "rl"}


def _check_schema(cfg: DictConfig) -> None:
    """Reject keys the schema does not know, even ones added with Hydra's ``+key=`` syntax."""
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config.schema import Config

    schema = OmegaConf.structured(Config)  # dataclass nodes reject unknown keys; Dict fields accept any
    try:
        OmegaConf.merge(schema, OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{type(err).__name__}: {str(err).splitlines()[0]}", where=key,
                          fix="check the key's spelling against `python -m pipeline --cfg job`") from None


def _names(ref) -> list[str]:
    return list(ref) if OmegaConf.is_list(ref) or isinstance(ref, list) else [ref]


def _check_inputs(i: int, spec, stage_cls, kinds: dict[str, str]) -> None:
    """Typed inputs: every role is declared by the stage kind and fed the artifact type it accepts."""
    from pipeline.stages import STAGES

    where = f"pipeline.stages[{i}] ({spec.name})"
    for role, ref in spec.inputs.items():
        if role not in stage_cls.roles:
            near = closest(role, stage_cls.roles)
            raise ConfigError(f"stage kind {spec.kind!r} has no input {role!r}" + (f" (did you mean {near!r}?)" if near
                              else "") + f"; its inputs: {', '.join(stage_cls.roles) or '(none)'}",
                              where=f"{where}.inputs.{role}")
        accepted = stage_cls.roles[role]
        if (OmegaConf.is_list(ref) or isinstance(ref, list)) and not accepted.many:
            raise ConfigError(f"input {role!r} takes one stage, got a list {list(ref)}", where=f"{where}.inputs.{role}")
        for name in _names(ref):
            if name not in kinds:
                raise ConfigError(f"input {role}={name!r} does not name an earlier stage "
                                  f"(earlier: {', '.join(kinds) or 'none'})", where=f"{where}.inputs.{role}",
                                  fix="list upstream stages before the stages that use them")
            produces = STAGES.get(kinds[name]).produces
            if produces not in accepted.accepts:
                raise ConfigError(f"input {role}={name!r}: stage {name!r} (kind {kinds[name]}) publishes a "
                                  f"{produces.replace('_', ' ')}, but {role!r} of a {spec.kind} stage accepts "
                                  f"{' or '.join(sorted(a.replace('_', ' ') for a in accepted.accepts))}",
                                  where=f"{where}.inputs.{role}")
    for role, accepted in stage_cls.roles.items():
        if accepted.required and role not in spec.inputs:
            raise ConfigError(f"stage kind {spec.kind!r} needs an input {role!r}", where=f"{where}.inputs",
                              fix=f"add `{role}: <an earlier stage publishing a "
                                  f"{' or '.join(sorted(accepted.accepts))}>`")


def _validate(cfg: DictConfig) -> dict[str, DictConfig]:
    """Check the whole pipeline before any stage runs; returns every stage's effective config."""
    from pipeline.stages import STAGES

    _check_schema(cfg)
    stages = cfg.pipeline.stages
    if not stages:
        raise ConfigError("the pipeline has no stages", where="pipeline.stages",
                          fix="pick a pipeline preset, e.g. pipeline=default")
    kinds: dict[str, str] = {}
    for i, spec in enumerate(stages):
        where = f"pipeline.stages[{i}]"
        if spec.kind in RENAMED_KINDS:
            raise ConfigError(f"stage kind {spec.kind!r} was renamed {RENAMED_KINDS[spec.kind]!r}",
                              where=f"{where}.kind", fix=f"write kind: {RENAMED_KINDS[spec.kind]}")
        stage_cls = STAGES.get(spec.kind, key=f"{where}.kind")
        if spec.name in kinds:
            raise ConfigError(f"duplicate stage name {spec.name!r}", where=f"{where}.name")
        _check_inputs(i, spec, stage_cls, kinds)
        kinds[spec.name] = spec.kind
    configs = stage_configs(cfg)
    for i, spec in enumerate(stages):
        stage_cls, stage_cfg = STAGES.get(spec.kind), configs[spec.name]
        build_task(stage_cfg.task)  # typed task options (also ones added with +task.options.x=)
        want = stage_cls.algorithm_schema
        if want is not None and OmegaConf.get_type(stage_cfg.get("algorithm")) is not want:
            name = stage_cfg.algorithm.get("name") if OmegaConf.is_dict(stage_cfg.get("algorithm")) else None
            raise ConfigError(f"algorithm={name} does not configure {spec.kind} stages (it is a "
                              f"{OmegaConf.get_type(stage_cfg.get('algorithm')).__name__} preset)",
                              where=f"pipeline.stages[{i}] ({spec.name})",
                              fix=f"choose an algorithm made for {spec.kind} stages, for this stage only with "
                                  f"stages.{spec.name}.algorithm=... or its overrides in the pipeline file")
        stage_cls.validate(stage_cfg, spec)
    for spec in stages:  # data files last: a config mistake is reported without reading any file
        STAGES.get(spec.kind).check_data(configs[spec.name], spec)
    return configs


@dataclass
class PlannedStage:
    """A stage with its effective config and fingerprint, known before anything runs."""

    spec: Any
    cfg: DictConfig
    cls: type
    #: the part of the config its output depends on (recorded in the manifest)
    config: dict
    #: input role -> fingerprint(s) of the upstream artifacts
    input_fps: dict
    fingerprint: str

    @property
    def name(self) -> str:
        return self.spec.name


def plan(cfg: DictConfig) -> list[PlannedStage]:
    """Validate the pipeline and fingerprint every stage (a stage's fingerprint covers its own
    effective settings and its inputs' fingerprints), without running anything."""
    from pipeline.artifacts import fingerprint
    from pipeline.stages import STAGES

    configs = _validate(cfg)
    fps: dict[str, str] = {}
    out = []
    for spec in cfg.pipeline.stages:
        stage_cls = STAGES.get(spec.kind)
        input_fps = {role: [fps[n] for n in ref] if OmegaConf.is_list(ref) or isinstance(ref, list) else fps[ref]
                     for role, ref in spec.inputs.items()}
        config = stage_cls.fingerprint_config(configs[spec.name], spec)
        fps[spec.name] = fingerprint(spec.kind, config, input_fps)
        out.append(PlannedStage(spec, configs[spec.name], stage_cls, config, input_fps, fps[spec.name]))
    return out


def _inputs(spec, done: dict[str, Any]) -> dict:
    return {role: [done[n] for n in ref] if OmegaConf.is_list(ref) or isinstance(ref, list) else done[ref]
            for role, ref in spec.inputs.items()}


#: metric prefixes that measure the machine, not the result: kept in run.json, not results.json
TIMING_PREFIXES = ("perf/",)
#: metrics logged along training that are not results (Lightning's LearningRateMonitor: ``lr-AdamW``...)
CURVE_ONLY = ("lr-",)


def run_pipeline(cfg: DictConfig, hook=None, *, rebuild=()) -> dict:
    """Run every stage of ``cfg.pipeline`` and return ``results`` (also saved as JSON).

    ``cfg`` comes from :func:`pipeline.config.compose` (or the command line).
    ``hook(stage_name, step, metrics)`` receives intermediate metrics during training
    stages; an exception it raises (e.g. ``optuna.TrialPruned``) stops the run and
    nothing half-finished is published. SIGTERM / SIGINT stop it the same way
    (:class:`pipeline.errors.Interrupted`). Stages named in ``rebuild`` run even when their
    artifact is cached, continuing from their mid-stage checkpoint if there is one (population-based
    training stops them at a step; ``force`` instead starts over).
    """
    _setup_env()
    stages = plan(cfg)
    run_dir = Path(cfg.paths.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    except OSError as err:
        raise _write_error(err, run_dir) from None
    with _run_log(run_dir), interrupts_as_errors(), torch_threads_kept():
        try:
            return _run_stages(cfg, stages, run_dir, hook, rebuild)
        except StopRun as err:
            log.info("run stopped by its hook: %s", err)
            raise
        except BaseException as err:
            log.error("run failed: %s", err.render() if isinstance(err, (PipelineError, Interrupted))
                      else f"{type(err).__name__}: {err}")
            raise


def _run_stages(cfg: DictConfig, stages: list[PlannedStage], run_dir: Path, hook, rebuild=()) -> dict:
    import lightning as L

    from pipeline.artifacts import ArtifactStore, runtime_info, versions
    from pipeline.resume import ResumeState
    from pipeline.tracking.wandb_runs import stage_run

    store = ArtifactStore(cfg.paths.artifact_dir, verify=cfg.cache.verify, lock_timeout_s=cfg.cache.lock_timeout_s)
    store.clean_tmp()
    results: dict = {"pipeline": cfg.pipeline.name, "seed": cfg.seed, "stages": {}}
    run_info: dict = {"seed": cfg.seed, "versions": versions(), "runtime": runtime_info(),
                      "overrides": list(cfg.get("overrides") or []), "stages": {}}
    done: dict[str, Any] = {}
    new_stages: list[str] = []  # stages built (not reused) by this run
    for st in stages:
        spec, fp = st.spec, st.fingerprint
        t0 = time.time()
        forced = cfg.force or spec.name in cfg.force_stages
        skip_cache = forced or spec.name in rebuild
        art = None if skip_cache else store.lookup(spec.kind, fp)  # no lock: a read-only cache works
        reused = art is not None
        if not reused:
            with store.lock(spec.kind, fp):
                art = None if skip_cache else store.lookup(spec.kind, fp)  # built meanwhile by another process?
                reused = art is not None
                if not reused:
                    log.info("stage %s (%s): running -> %s", spec.name, spec.kind, store.path_for(spec.kind, fp))
                    L.seed_everything(st.cfg.seed, workers=True, verbose=False)
                    resume = ResumeState(store.resume_path(spec.kind, fp), st.cfg.trainer.checkpoint_every_n_steps)
                    if forced:  # a forced rebuild starts over, also from a killed run's checkpoints
                        resume.clear()
                    stage = st.cls(st.cfg, spec, _inputs(spec, done), hook=hook, run_dir=run_dir, resume=resume)
                    manifest = {"stage": spec.name, "inputs": {r: {"fingerprint": f} for r, f in st.input_fps.items()},
                                "config": st.config, "seed": st.cfg.seed,
                                "overrides": [str(o) for o in (spec.get("overrides") or [])]}
                    with store.build(spec.kind, fp, manifest) as (work, record), \
                            stage_run(st.cfg, spec.name, spec.kind, work) as tracked:  # W&B: one run per stage
                        # learning rates are a curve (metrics.csv, reports), not a result of the stage
                        record["metrics"] = {k: v for k, v in stage.run(work).items() if not k.startswith(CURVE_ONLY)}
                        record.update(stage.record)
                        if resume.resumed_from is not None:
                            record["resumed_from_step"] = resume.resumed_from
                        tracked.finish(record["metrics"])
                    new_stages.append(spec.name)
                    art = store.lookup(spec.kind, fp)
                    if art is None:  # non-zero rank under torchrun: rank 0 published it
                        raise RuntimeError(f"artifact for stage {spec.name} missing after build")
        if reused:
            log.info("stage %s (%s): reusing %s", spec.name, spec.kind, art.path)
            built = art.manifest.get("runtime", {}).get("torch_threads")
            if built is not None and built != runtime_info()["torch_threads"]:
                log.info("stage %s: reused an artifact built with %s torch threads (now %s): numbers may differ "
                         "from a fresh build in the last digits; pin trainer.num_threads to make it part of the key",
                         spec.name, built, runtime_info()["torch_threads"])
        done[spec.name] = art
        metrics = {k: v for k, v in art.metrics.items() if not k.startswith(TIMING_PREFIXES)}
        results["stages"][spec.name] = {"kind": spec.kind, "fingerprint": fp, "metrics": metrics}
        run_info["stages"][spec.name] = {"reused": reused, "seconds": round(time.time() - t0, 3),
                                         "artifact": str(art.path), "headline": list(st.cls.headline),
                                         "timings": {k: v for k, v in art.metrics.items() if k.startswith(TIMING_PREFIXES)}}
        if not reused and art.manifest.get("resumed_from_step") is not None:  # continued a killed build
            run_info["stages"][spec.name]["resumed_from_step"] = art.manifest["resumed_from_step"]
        try:
            _link(run_dir / "stages" / spec.name, art.path)
        except OSError as err:
            raise _write_error(err, run_dir) from None
        if hook is not None:
            hook(spec.name, -1, dict(art.metrics))

    _record_tracking(cfg, run_info, [done[n].path for n in new_stages])
    try:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, allow_nan=False))
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True))
    except OSError as err:
        raise _write_error(err, run_dir) from None
    if "tensorboard" in list(cfg.logger.backends):  # the run as one TensorBoard HParams session
        from pipeline.tracking.hparams import HPARAMS_DIR, parse_overrides, run_metrics, write_hparams

        write_hparams(run_dir / HPARAMS_DIR, parse_overrides(run_info["overrides"]),
                      run_metrics(results, {st.name: st.cls.headline for st in stages}))
    if cfg.print_summary:
        from pipeline.evaluation import read_evaluation
        from pipeline.summary import print_summary

        headline = {st.name: st.cls.headline for st in stages}
        evaluations = {name: ev for name, art in done.items() if (ev := read_evaluation(art.path))}
        print_summary(results, run_info, run_dir, headline=headline, evaluations=evaluations)
    return results


def _record_tracking(cfg: DictConfig, run_info: dict, built_artifacts: list[Path]) -> None:
    """Offline W&B runs of the stages this run built: recorded in run.json with the command that
    uploads them, and logged."""
    from pipeline.tracking.wandb_runs import offline_runs, sync_command

    runs = offline_runs(built_artifacts)
    if runs:
        run_info["wandb"] = {"offline_runs": [str(r) for r in runs], "sync": sync_command(runs)}
        log.info("W&B runs saved offline (%d); upload them later with: %s", len(runs), sync_command(runs))


def _write_error(err: OSError, path: Path) -> PipelineError:
    why = os.strerror(err.errno) if err.errno else str(err)
    return PipelineError(f"cannot write the run directory {path}: {why}", where="paths.output_dir",
                         fix="run from (or set PIPELINE_ROOT to) a writable directory with free space")


@contextlib.contextmanager
def _run_log(run_dir: Path):
    """The run's own log file (``run.log``): stage progress, warnings, and the error that ended it."""
    handler = None
    try:
        handler = logging.FileHandler(run_dir / "run.log")
    except OSError:
        pass
    if handler is not None:
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        handler.setLevel(logging.INFO)
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


#: set by the command line, which reports an interruption itself and exits 143 / 130
_REPORTS_INTERRUPTS = False


@contextlib.contextmanager
def torch_threads_kept():
    """``trainer.num_threads`` applies to this run only: a caller running pipelines in-process
    (tests, notebooks, the tuner) gets its own thread count back afterwards."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def interrupts_as_errors():
    """SIGTERM and SIGINT raise :class:`Interrupted` (main thread only), so a stopped run
    unwinds like a failed one: nothing half-published, the interruption logged. (Lightning
    would otherwise catch them and exit 0 on SIGTERM / 1 on Ctrl-C.) The command line then
    exits 143 / 130 with a message; called from Python, the signal is delivered again to the
    caller's own handler once the run has cleaned up (by default: the process ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if received and not _REPORTS_INTERRUPTS:
            signal.raise_signal(received[0])


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(target.resolve(), target_is_directory=True)
    except OSError:  # pragma: no cover - filesystems without symlinks
        (link.with_suffix(".path")).write_text(str(target.resolve()))


def report_error(err: PipelineError) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/bold red] {err.render()}")


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                  "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_output_root(args: list[str]) -> None:
    """Hydra creates the run directory before any of our code runs: check that it can."""
    if any(a.startswith(("hydra.run.dir", "hydra.sweep.dir")) for a in args):
        return
    root = Path(os.environ.get("PIPELINE_ROOT") or os.getcwd())
    target = root / "outputs"
    probe = target
    while not probe.exists():
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = f"{probe} is a file, not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = f"{probe} is not writable"
    if problem:
        raise PipelineError(f"cannot create the run directory under {target}: {problem}", where="paths.root_dir",
                            fix="run from a writable directory, or set PIPELINE_ROOT to one")


#: command-line flags after which the arguments are not a plain run (no pre-check)
_NO_PRECHECK = ("-m", "--multirun", "--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion",
                "-sc", "--resolve", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--run", "-r")


def main() -> None:
    """``python -m pipeline [overrides]``. Every user error (config, data, interruption) ends
    with one message on stderr and exit code 2 (130 / 143 when stopped by SIGINT / SIGTERM)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from pipeline.config import compose
    from pipeline.config.schema import register_configs

    args = sys.argv[1:]
    try:
        check_renamed(a for a in args if not a.startswith("-"))
        _check_output_root(args)
        if not any(a in _NO_PRECHECK or a.split("=", 1)[0] in _NO_PRECHECK for a in args):
            compose(args)  # Hydra's own composition errors would exit 1 with its message: check first
    except PipelineError as err:
        report_error(err)
        sys.exit(2)
    sys.argv[1:] = open_sections(args)
    register_configs()

    global _REPORTS_INTERRUPTS
    _REPORTS_INTERRUPTS = True

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        cfg.overrides = list(HydraConfig.get().overrides.task)
        try:
            results = run_pipeline(cfg)
        except Interrupted as err:
            report_error(err)
            sys.exit(err.exit_code)
        except PipelineError as err:
            report_error(err)
            sys.exit(2)
        return results

    _main()


if __name__ == "__main__":
    main()
