"""Stage interface and registry.

A stage kind (``sft``, ``reward``, ``rl``, ``evaluate``, ...) is a class registered in
``STAGES``. It declares, next to its code:

- ``produces``: what its artifact holds (``policy``, ``reward_model``, ``evaluation``...);
- ``roles``: the inputs it takes, each accepting some artifact types
  (``{"policy": Role({"policy"}), "reward": Role({"reward_model"}, required=False)}``),
  checked by the runner before anything runs;
- ``config_keys``: the config sections its output depends on (its fingerprint);
- ``headline``: the metrics the summary table shows for it.

The runner gives it its effective config (the run's config plus the stage's own
settings), its ``StageSpec`` and the upstream artifacts it names in ``inputs``; the
stage writes into a work directory and returns its final metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig

from pipeline.artifacts import Artifact, data_digest
from pipeline.config import plain
from pipeline.registry import Registry
from pipeline.training import MetricsHook

STAGES: Registry[type["Stage"]] = Registry("stage kind")

#: trainer keys that do not change results (excluded from fingerprints)
_TRAINER_COSMETIC = ("enable_progress_bar", "log_every_n_steps", "checkpoint_every_n_steps")


@dataclass(frozen=True)
class Role:
    """An input role of a stage kind: which artifact types it accepts."""

    accepts: frozenset[str]
    #: the stage cannot run without it (conditional needs are checked in ``validate``)
    required: bool = True
    #: takes a list of stages (``policies: [sft, ppo]``)
    many: bool = False

    def __init__(self, accepts, required: bool = True, many: bool = False):
        object.__setattr__(self, "accepts", frozenset(accepts))
        object.__setattr__(self, "required", required)
        object.__setattr__(self, "many", many)


class Stage:
    kind: ClassVar[str] = "base"
    #: artifact type this stage publishes
    produces: ClassVar[str] = "none"
    #: input role -> accepted artifact types
    roles: ClassVar[dict[str, Role]] = {}
    #: config sections the output depends on (besides ``seed``)
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: ``task`` fields this stage never reads (changing them keeps its cache)
    ignored_task_fields: ClassVar[tuple[str, ...]] = ()
    #: metrics shown in the summary table (prefix matches with a trailing ``/``)
    headline: ClassVar[tuple[str, ...]] = ()
    #: the ``algorithm=`` schema this kind reads (None: it reads no ``algorithm`` section);
    #: the runner rejects an algorithm preset made for another stage kind
    algorithm_schema: ClassVar[type | None] = None
    #: the config key of the stage's hyperparameter schedule (``rl.schedule``; None: it has none)
    #: and the keys a schedule may change: population-based training tunes only those
    schedule_key: ClassVar[str | None] = None
    schedulable: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: DictConfig, spec, inputs: dict[str, Any], hook: MetricsHook | None = None,
                 run_dir: Path | None = None, resume=None):
        self.cfg = cfg
        self.spec = spec
        self.name: str = spec.name
        self.inputs = inputs
        self.hook = hook
        self.run_dir = run_dir
        #: the stage's mid-stage checkpoints (:class:`pipeline.resume.ResumeState`; None: none),
        #: passed to ``build_trainer(resume=...)``
        self.resume = resume
        #: extra manifest fields a stage wants to publish
        self.record: dict = {}

    @classmethod
    def total_steps(cls, cfg: DictConfig) -> int | None:
        """The steps a schedule counts (rollout steps, iterations), for a stage with a ``schedule_key``."""
        return None

    @classmethod
    def validate(cls, cfg: DictConfig, spec) -> None:
        """Check this stage's settings before *any* stage runs (fail fast)."""

    @classmethod
    def check_data(cls, cfg: DictConfig, spec) -> None:
        """Open and check the user data files this stage will read (format, columns, lengths
        where the tokenizer is known), before *any* stage trains."""

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
        digests = {f"{key}.data": data_digest(out[key]["data"]["path"]) for key in cls.config_keys
                   if isinstance(out.get(key), dict) and isinstance(out[key].get("data"), dict)
                   and out[key]["data"].get("path")}
        if any(digests.values()):  # a local file's content, not only its name
            out["data_files"] = {k: v for k, v in digests.items() if v}
        return out

    def input(self, role: str) -> Artifact:
        art = self.inputs.get(role)
        if art is None:
            from pipeline.errors import ConfigError

            raise ConfigError(f"stage {self.name!r} ({self.kind}) needs an input {role!r}",
                              where=f"pipeline.stages.{self.name}.inputs", fix=f"add `{role}: <upstream stage name>`")
        return art

    def user_prompts(self, section: str, policy, tokenizer, max_new_tokens: int,
                     work_dir: Path) -> tuple[list[dict], list[dict], int | None]:
        """A user's prompt file (``<section>.data``) for a sampling stage: ``(train rows, held-out
        rows, prompt-token limit)``. Chat prompts are rendered like SFT renders them; prompts are
        checked against the model's context (``on_long_prompt``); ``data.eval_fraction`` of them
        are held out and published with the artifact, so evaluation follows the user's data."""
        from pipeline.data import fit_prompt_rows, load_prompt_rows, split_holdout
        from pipeline.evaluation import heldout_source, write_heldout
        from pipeline.models.loading import context_length

        dcfg = self.cfg[section].data
        rows = load_prompt_rows(dcfg, key=f"{section}.data", tokenizer=tokenizer)
        rows, limit = fit_prompt_rows(rows, tokenizer, context_length(policy), max_new_tokens, f"{section}.data",
                                      dcfg.on_long_prompt)
        train, held = split_holdout(rows, dcfg.eval_fraction, self.cfg.seed)
        write_heldout(work_dir, prompts=held, source=heldout_source(dcfg.path, dcfg.eval_fraction, len(held)))
        return train, held, limit

    def run(self, work_dir: Path) -> dict:
        raise NotImplementedError
