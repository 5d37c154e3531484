"""Stage interface and registry.

A stage kind (``sft``, ``reward``, ``evaluate``, ...) is a class registered in
``STAGES``. The runner gives it the full config, its ``StageSpec`` and the upstream
artifacts it names in ``inputs``; the stage writes into a work directory and returns
its final metrics. ``fingerprint_config`` returns the part of the config its output
depends on, so the cache key changes exactly when the result could.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import Artifact
from pipeline.registry import Registry

#: hook(stage_name, step, metrics) - receives intermediate metrics; may raise to stop
#: the run (e.g. optuna.TrialPruned)
MetricsHook = Callable[[str, int, dict], None]

STAGES: Registry[type["Stage"]] = Registry("stage kind")

#: trainer keys that do not change results (excluded from fingerprints)
_TRAINER_COSMETIC = ("enable_progress_bar", "log_every_n_steps")


def plain(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


class Stage:
    kind: ClassVar[str] = "base"
    #: top-level config sections the output depends on (besides ``seed``)
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: ``task`` fields this stage never reads (changing them keeps its cache)
    ignored_task_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: DictConfig, spec, inputs: dict[str, Any], hook: MetricsHook | None = None,
                 run_dir: Path | None = None):
        self.cfg = cfg
        self.spec = spec
        self.name: str = spec.name
        self.inputs = inputs
        self.hook = hook
        self.run_dir = run_dir
        #: extra manifest fields a stage wants to publish
        self.record: dict = {}

    @classmethod
    def validate(cls, cfg: DictConfig, spec) -> None:
        """Check this stage's settings before *any* stage runs (fail fast)."""

    @classmethod
    def fingerprint_config(cls, cfg: DictConfig, spec) -> dict:
        out: dict = {"seed": cfg.seed}
        for key in cls.config_keys:
            out[key] = plain(cfg[key])
        if "trainer" in out:
            for k in _TRAINER_COSMETIC:
                out["trainer"].pop(k, None)
        if "task" in out:
            for k in cls.ignored_task_fields:
                out["task"].pop(k, None)
        return out

    def input(self, role: str) -> Artifact:
        art = self.inputs.get(role)
        if art is None:
            from pipeline.errors import ConfigError

            raise ConfigError(f"stage {self.name!r} ({self.kind}) needs an input {role!r}",
                              where=f"pipeline.stages.{self.name}.inputs", fix=f"add `{role}: <upstream stage name>`")
        return art

    def run(self, work_dir: Path) -> dict:
        raise NotImplementedError
