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

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR, stage_configs  # noqa: F401  (CONF_DIR: public, used by callers)
from pipeline.config.compose import check_renamed, open_sections
from pipeline.errors import ConfigError, PipelineError
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


def run_pipeline(cfg: DictConfig, hook=None) -> dict:
    """Run every stage of ``cfg.pipeline`` and return ``results`` (also saved as JSON).

    ``cfg`` comes from :func:`pipeline.config.compose` (or the command line).
    ``hook(stage_name, step, metrics)`` receives intermediate metrics during training
    stages; an exception it raises (e.g. ``optuna.TrialPruned``) stops the run and
    nothing half-finished is published.
    """
    import lightning as L

    from pipeline.artifacts import ArtifactStore, versions

    _setup_env()
    stages = plan(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    store = ArtifactStore(cfg.paths.artifact_dir)
    store.clean_tmp()

    results: dict = {"pipeline": cfg.pipeline.name, "seed": cfg.seed, "stages": {}}
    run_info: dict = {"seed": cfg.seed, "versions": versions(), "overrides": list(cfg.get("overrides") or []),
                      "stages": {}}
    done: dict[str, Any] = {}
    for st in stages:
        spec, fp = st.spec, st.fingerprint
        t0 = time.time()
        with store.lock(spec.kind, fp):
            forced = cfg.force or spec.name in cfg.force_stages
            art = None if forced else store.lookup(spec.kind, fp)
            reused = art is not None
            if reused:
                log.info("stage %s (%s): reusing %s", spec.name, spec.kind, art.path)
            else:
                log.info("stage %s (%s): running -> %s", spec.name, spec.kind, store.path_for(spec.kind, fp))
                L.seed_everything(st.cfg.seed, workers=True, verbose=False)
                stage = st.cls(st.cfg, spec, _inputs(spec, done), hook=hook, run_dir=run_dir)
                manifest = {"stage": spec.name, "inputs": {r: {"fingerprint": f} for r, f in st.input_fps.items()},
                            "config": st.config, "seed": st.cfg.seed,
                            "overrides": [str(o) for o in (spec.get("overrides") or [])]}
                with store.build(spec.kind, fp, manifest) as (work, record):
                    record["metrics"] = stage.run(work)
                    record.update(stage.record)
                art = store.lookup(spec.kind, fp)
                if art is None:  # non-zero rank under torchrun: rank 0 published it
                    raise RuntimeError(f"artifact for stage {spec.name} missing after build")
        done[spec.name] = art
        _link(run_dir / "stages" / spec.name, art.path)
        results["stages"][spec.name] = {"kind": spec.kind, "fingerprint": fp, "metrics": art.metrics}
        run_info["stages"][spec.name] = {"reused": reused, "seconds": round(time.time() - t0, 3),
                                         "artifact": str(art.path)}
        if hook is not None:
            hook(spec.name, -1, dict(art.metrics))

    (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=2, sort_keys=True))
    if cfg.print_summary:
        from pipeline.evaluation import read_evaluation
        from pipeline.summary import print_summary

        headline = {st.name: st.cls.headline for st in stages}
        evaluations = {name: ev for name, art in done.items() if (ev := read_evaluation(art.path))}
        print_summary(results, run_info, run_dir, headline=headline, evaluations=evaluations)
    return results


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


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from pipeline.config.schema import register_configs

    args = sys.argv[1:]
    try:
        check_renamed(a for a in args if not a.startswith("-"))
    except PipelineError as err:
        report_error(err)
        sys.exit(2)
    sys.argv[1:] = open_sections(args)
    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> Any:
        cfg.overrides = list(HydraConfig.get().overrides.task)
        try:
            results = run_pipeline(cfg)
        except PipelineError as err:
            report_error(err)
            sys.exit(2)
        return results

    _main()


if __name__ == "__main__":
    main()
