"""A study: the sweep spec checked against the pipeline, its Optuna study, sampler and pruner.

:class:`Tuner` holds what every worker needs: the trials' base overrides, the parameter tree,
objectives and constraints, the stages the tuning seeds apply to, how to run one pipeline
for a configuration and seed, and the study (created on first use, resumed afterwards).
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.config import compose
from pipeline.config.compose import config_groups
from pipeline.errors import ConfigError
from pipeline.registry import closest
from pipeline.tune import space as sp
from pipeline.tune.spec import SweepSpec, objectives_of, parse_constraint
from pipeline.tune.storage import StudyLock, is_database, mask_url, open_storage

log = logging.getLogger("pipeline.tune")

#: overrides every trial run gets that change no result (not recorded, not in best.yaml)
RUNTIME_OVERRIDES = ("print_summary=false", "trainer.enable_progress_bar=false")


class MissingMetric(ConfigError):
    """An objective / constraint metric no stage reports: a mistake in the sweep, not a bad trial."""


@dataclass
class SeedRun:
    """One pipeline run of a trial (one seed)."""

    seed: int
    output_dir: Path
    results: dict
    info: dict

    @property
    def fingerprints(self) -> dict[str, str]:
        return {n: s["fingerprint"] for n, s in self.results["stages"].items()}

    @property
    def reused(self) -> dict[str, bool]:
        return {n: bool(s["reused"]) for n, s in self.info["stages"].items()}

    def metric(self, name: str, stage: str | None = None) -> float:
        """A final metric (``eval/gold_reward``), or ``time/<stage>`` / ``time/total`` in seconds."""
        stages = self.results["stages"]
        if name.startswith("time/"):
            which = name.split("/", 1)[1]
            if which == "total":
                return float(sum(s["seconds"] for s in self.info["stages"].values()))
            if which in self.info["stages"]:
                return float(self.info["stages"][which]["seconds"])
            raise MissingMetric(f"no stage {which!r} to time; stages: {', '.join(self.info['stages'])}", where=name)
        names = [stage] if stage else list(reversed(list(stages)))
        for n in names:
            if n in stages and name in stages[n]["metrics"]:
                return float(stages[n]["metrics"][name])
        known = sorted({k for s in stages.values() for k in s["metrics"]})
        near = closest(name, known)
        raise MissingMetric(f"no stage{' ' + repr(stage) if stage else ''} reports metric {name!r}"
                            + (f" (did you mean {near!r}?)" if near else ""), where=name,
                            fix="name a final metric from results.json (or time/<stage>, time/total)")


def _options(cls, options: dict, where: str, **defaults) -> Any:
    """``cls(**defaults, **options)``, with unknown or invalid options as a ConfigError."""
    accepted = inspect.signature(cls).parameters
    for k in options:
        if k not in accepted:
            near = closest(k, accepted)
            raise ConfigError(f"{cls.__name__} has no option {k!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + f"; its options: {', '.join(a for a in accepted if a != 'self')}",
                              where=f"{where}.{k}")
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    kwargs.update(options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}: {err}", where=where) from None


def _trial_seed(seed: int | None, number: int) -> int | None:
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "big")


class Tuner:
    """One study's settings, checked against the pipeline before anything runs."""

    def __init__(self, spec: SweepSpec, overrides=(), *, root: str | Path | None = None,
                 tune_overrides=(), config_dirs=()):
        self.spec, self.t = spec, spec.tune
        self.root = Path(root or Path.cwd()).resolve()
        self.cli_overrides = [str(o) for o in overrides]
        self.tune_overrides = [str(o) for o in tune_overrides]
        self.config_dirs = [str(d) for d in config_dirs]
        self.loc = getattr(spec, "locator", None) or sp._Keys()
        self.params = sp.parse_space(spec.space, self.loc)
        self.objectives = objectives_of(spec)
        self.constraints = [parse_constraint(c, f"constraints[{i}]") for i, c in enumerate(spec.constraints)]
        self.multi = len(self.objectives) > 1
        self.study_name = self.t.study_name or spec.name
        # relative paths are relative to the root (where outputs/ is), as for every worker
        self.study_dir = (self.root / (self.t.study_dir or Path("outputs") / "studies" / self.study_name)).resolve()
        if self.t.storage and not is_database(self.t.storage):
            self.t.storage = str((self.root / self.t.storage).resolve())
        #: every trial's overrides before its sampled values: the sweep's base, then the command line
        self.base = [str(o) for o in spec.base] + self.cli_overrides
        self.grid = sp.check_grid(self.params, self.loc) if self.t.sampler.name == "grid" else None
        for p in sp.walk(self.params):
            head = p.key.lstrip("+~").split(".")[0]
            if head in ("seed", "tune", "sweep", "paths", "overrides"):
                raise ConfigError(f"{p.key!r} cannot be searched" + (": seeds are tune.seeds / tune.test_seeds"
                                  if head == "seed" else ""), where=self.loc.where(p.path))
        self._check_enqueue()
        self.pruner_name = self._pruner_name()
        self._check_pipeline()
        self.lock = StudyLock(self.t.storage, self.study_dir, self.study_name)

    # ------------------------------------------------------------------ checks
    def _check_enqueue(self) -> None:
        for i, entry in enumerate(self.spec.enqueue):
            known = {p.key for p in sp.walk(self.params)}
            for key in entry:
                if key not in known:
                    near = closest(key, known)
                    raise ConfigError(f"{key!r} is not a parameter of the space" + (f" (did you mean {near!r}?)"
                                      if near else ""), where=f"enqueue[{i}].{key}")

    def _pruner_name(self) -> str:
        name = self.t.pruner.name
        if self.multi and name != "none":
            return "none"  # Optuna cannot prune multi-objective studies (said on start)
        if name == "wilcoxon" and len(self.t.seeds) < 2:
            raise ConfigError("the wilcoxon pruner compares a trial with the best one seed by seed and needs "
                              f"at least 2 tuning seeds (tune.seeds={self.t.seeds})", where="tune.pruner.name",
                              fix="add tuning seeds (5+ to ever reach p < 0.1), or use another pruner")
        return name

    @property
    def curve_pruning(self) -> bool:
        """Whether trials report their learning curve to a pruner (not wilcoxon, not none)."""
        return self.pruner_name not in ("none", "wilcoxon")

    def _compose(self, overrides, out: str = "check"):
        return compose(list(overrides) + list(RUNTIME_OVERRIDES), root=self.root,
                       output_dir=self.study_dir / "trials" / out)

    def _plan(self, overrides, where: str):
        """(config, plan) for ``overrides``; a failure is a ConfigError saying which ones."""
        from pipeline.run import plan

        try:
            cfg = self._compose(overrides)
            return cfg, plan(cfg)
        except ConfigError as err:
            raise ConfigError(f"{err.message}", where=f"{where}: {err.where}" if err.where else where,
                              fix=err.fix) from None
        except Exception as err:  # Hydra's own errors (unknown group option ...)
            raise ConfigError(str(err).strip().splitlines()[0], where=where) from None

    def _check_pipeline(self) -> None:
        """Compose the base config and one variant per searched parameter: unknown keys, group
        options and stage names fail here, and the stages whose fingerprint a parameter changes
        (plus everything downstream of them) are the stages the tuning seeds apply to."""
        cfg, base_plan = self._plan(self.base, "base overrides + command line")
        self.base_cfg = cfg
        self.stage_names = [s.name for s in base_plan]
        self.base_fingerprints = {s.name: s.fingerprint for s in base_plan}
        # a pipeline without per-stage settings can be varied by editing the composed config
        self._editable = not any(s.spec.get("overrides") for s in base_plan) and not cfg.get("stages")
        self._plans: dict[tuple, tuple] = {tuple(self.base): (cfg, base_plan)}
        changed: set[str] = set()
        for p, path in self._params_with_paths(self.params, []):
            changed |= self._stages_changed_by(p, path)
        if self.t.seed_stages is not None:
            for name in self.t.seed_stages:
                if name not in self.stage_names:
                    near = closest(name, self.stage_names)
                    raise ConfigError(f"no stage {name!r}" + (f" (did you mean {near!r}?)" if near else "")
                                      + f"; stages: {', '.join(self.stage_names)}", where="tune.seed_stages")
            changed = set(self.t.seed_stages)
        self.seed_stages = self._downstream(base_plan, changed)
        for o in self.objectives:
            self._check_stage(o.stage, f"objectives.{o.metric}.stage")
        self._check_stage(self.t.pruner.stage, "tune.pruner.stage")
        self._check_strategies(base_plan)
        del self._plans

    def _cached_plan(self, overrides: list[str], where: str):
        key = tuple(overrides)
        if key not in self._plans:
            self._plans[key] = self._plan(overrides, where)
        return self._plans[key]

    def _params_with_paths(self, params, path):
        for p in params:
            yield p, path
            for value, branch in p.then.items():
                chosen = p.choices[[str(c) for c in p.choices].index(value)]
                yield from self._params_with_paths(branch, path + [(p, chosen)])

    def _stages_changed_by(self, p: sp.Param, path) -> set[str]:
        """Stages whose fingerprint changes when ``p`` changes (planned, so exact)."""
        from pipeline.run import plan

        where = self.loc.where(p.path)
        key = p.key.lstrip("+~")
        is_group = "." not in key and key in config_groups()
        prefix = self.base + [sp.override(q.key, v) for q, v in path]
        cfg, ref_plan = self._cached_plan(prefix, f"space ({', '.join(f'{q.key}={v}' for q, v in path)})")
        ref = {s.name: s.fingerprint for s in ref_plan}
        if is_group:  # every option must compose and suit the stages
            plans = [self._cached_plan(prefix + [sp.override(p.key, v)], f"{where}={v!r}")[1] for v in p.choices]
            return {s.name for pl in plans for s in pl if ref.get(s.name) != s.fingerprint}
        if key.startswith("stages."):
            stage = key.split(".")[1]
            if stage not in self.stage_names:
                near = closest(stage, self.stage_names)
                raise ConfigError(f"no stage {stage!r}" + (f" (did you mean {near!r}?)" if near else ""), where=where)
        elif not p.key.startswith("+") and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            parent = key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            options = [f"{parent}.{k}" if parent else k for k in (node.keys() if OmegaConf.is_dict(node) else [])]
            near = closest(key, options)
            raise ConfigError(f"no config key {key!r}" + (f" (did you mean {near!r}?)" if near else ""),
                              where=where, fix="search keys that exist (python -m pipeline --cfg job)")
        current = OmegaConf.select(cfg, key, default=None) if not key.startswith("stages.") else None
        candidates = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        value = next((v for v in candidates if v != current), None)
        if value is None:
            return set()
        try:
            if self._editable and not key.startswith("stages.") and not p.key.startswith("+"):
                varied = copy.deepcopy(cfg)
                OmegaConf.update(varied, key, value, merge=False)
                got = plan(varied)
            else:
                got = self._plan(prefix + [sp.override(p.key, value)], f"{where}={value!r}")[1]
        except Exception:  # a bad combination (e.g. batch arithmetic): such trials fail with their reason
            return {s.name for s in ref_plan if key.split(".")[0] in getattr(s.cls, "config_keys", ())}
        return {s.name for s in got if ref.get(s.name) != s.fingerprint}

    @staticmethod
    def _downstream(base_plan, names: set[str]) -> list[str]:
        out: list[str] = []
        for st in base_plan:
            refs = [n for ref in st.spec.inputs.values() for n in
                    (list(ref) if OmegaConf.is_list(ref) or isinstance(ref, list) else [ref])]
            if st.name in names or any(r in out for r in refs):
                out.append(st.name)
        return out

    def _check_stage(self, stage: str | None, where: str) -> None:
        if stage is not None and stage not in self.stage_names:
            near = closest(stage, self.stage_names)
            raise ConfigError(f"no stage {stage!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + f"; stages: {', '.join(self.stage_names)}", where=where)

    def _check_strategies(self, base_plan) -> None:
        for st in base_plan:
            if st.name not in self.seed_stages or "trainer" not in st.cfg:
                continue
            tcfg = st.cfg.trainer
            strategy = str(tcfg.strategy)
            if "spawn" in strategy and self.curve_pruning:
                raise ConfigError(
                    f"tune.pruner={self.pruner_name} prunes on intermediate values, which trainer.strategy="
                    f"{strategy} cannot send back from its worker processes (stage {st.name})",
                    where="tune.pruner.name",
                    fix="use tune.pruner=wilcoxon (prunes between tuning seeds, from final metrics) or "
                        "tune.pruner=none with trainer=ddp, or a single-process trainer")
            multi = str(tcfg.devices) not in ("1", "auto") or int(tcfg.num_nodes) > 1
            if strategy not in ("auto", "single_device") and "spawn" not in strategy and multi:
                raise ConfigError(f"trainer.strategy={strategy} relaunches the command once per rank, but the "
                                  f"tuner runs trials inside its worker processes (stage {st.name})",
                                  where="trainer.strategy",
                                  fix="use trainer=ddp (ddp_spawn) for data parallel trials, and tune.n_workers "
                                      "for parallel trials")

    # ------------------------------------------------------------------ runs
    def seed_overrides(self, seed: int) -> list[str]:
        """The tuning / test seed, for the seeded stages only (upstream stages keep theirs)."""
        return [f"stages.{name}.seed={int(seed)}" for name in self.seed_stages]

    def tracking_overrides(self, run_name: str) -> list[str]:
        out = list(RUNTIME_OVERRIDES)
        if "wandb" in list(self.base_cfg.logger.backends):
            out += [f"logger.wandb.group={self.study_name}", f"run_name={sp.hydra_value(run_name)}"]
        return out

    def run_cfg(self, overrides, seed: int, output_dir: Path, run_name: str = ""):
        """The config :meth:`run_config` runs for one configuration and seed."""
        return compose(list(overrides) + self.seed_overrides(seed) + self.tracking_overrides(run_name),
                       root=self.root, output_dir=output_dir)

    def run_config(self, overrides, seed: int, output_dir: Path, *, hook=None, run_name: str = "",
                   rebuild=()) -> SeedRun:
        """Run the pipeline for one configuration and seed (stages shared through the cache, but
        those in ``rebuild``: see :func:`pipeline.run.run_pipeline`)."""
        from pipeline.run import run_pipeline

        cfg = self.run_cfg(overrides, seed, output_dir, run_name)
        results = run_pipeline(cfg, hook=hook, rebuild=rebuild)
        info = json.loads((Path(output_dir) / "run.json").read_text())
        return SeedRun(int(seed), Path(output_dir), results, info)

    # ------------------------------------------------------------------ Optuna
    @property
    def storage_url(self) -> str:
        return self.t.storage or str(self.study_dir / "storage.journal")

    def sampler(self, trial_number: int | None = None):
        import optuna

        s = self.t.sampler
        seed = _trial_seed(s.seed, trial_number if trial_number is not None else -1)
        where = "tune.sampler.options"
        conditional = any(p.then for p in self.params)
        if s.name == "tpe":
            return _options(optuna.samplers.TPESampler, s.options, where, seed=seed, multivariate=True,
                            group=conditional, constant_liar=True)
        if s.name == "random":
            return _options(optuna.samplers.RandomSampler, s.options, where, seed=seed)
        if s.name == "gp":
            return _options(optuna.samplers.GPSampler, s.options, where, seed=seed)
        if s.name == "nsga2":
            return _options(optuna.samplers.NSGAIISampler, s.options, where, seed=seed)
        if s.name == "grid":
            return _options(optuna.samplers.GridSampler, s.options, where, search_space=self.grid, seed=seed)
        if s.name == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise ConfigError("the CMA-ES sampler needs the cmaes package", where="tune.sampler.name",
                                  fix="pip install cmaes") from None
            return _options(optuna.samplers.CmaEsSampler, s.options, where, seed=seed)
        raise AssertionError(s.name)  # spec checked it

    def pruner(self):
        import optuna

        p, where = self.t.pruner, "tune.pruner.options"
        if self.pruner_name == "none":
            return optuna.pruners.NopPruner()
        cls = {"hyperband": optuna.pruners.HyperbandPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "median": optuna.pruners.MedianPruner, "wilcoxon": optuna.pruners.WilcoxonPruner}[self.pruner_name]
        return _options(cls, p.options, where)

    def identity(self) -> dict:
        """What makes trials comparable: a study resumed with a different one is refused."""
        return {"space": [p.describe() for p in sp.walk(self.params)],
                "objectives": [[o.metric, o.direction, o.stage] for o in self.objectives],
                "constraints": [c.text for c in self.constraints], "seeds": list(self.t.seeds),
                "seed_stages": self.seed_stages, "pipeline": self.base_fingerprints}

    def open_study(self, *, create: bool = True):
        """The study in its storage: created with the sweep's settings, or resumed (same identity)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study_dir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.t.storage, self.study_dir)
        if is_database(self.t.storage) and not str(self.t.storage).startswith("sqlite"):
            self.lock.storage = storage
        directions = [o.direction for o in self.objectives]
        with self.lock():
            try:
                study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=self.sampler(),
                                          pruner=self.pruner())
            except KeyError:
                if not create:
                    raise ConfigError(f"no study {self.study_name!r} in {mask_url(self.storage_url)}",
                                      where="tune.study_name", fix="run the sweep first (tune.phase=all)") from None
                study = optuna.create_study(study_name=self.study_name, storage=storage, directions=directions,
                                            sampler=self.sampler(), pruner=self.pruner())
            attrs = study.user_attrs
            ident = self.identity()
            if "identity" not in attrs:
                self._write_study_attrs(study, ident)
                for entry in self.spec.enqueue:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        study.enqueue_trial(sp.names_for(entry, self.params), user_attrs={"enqueued": True})
            elif attrs["identity"] != json.loads(json.dumps(ident)):
                changed = [k for k in ident if json.loads(json.dumps(ident[k])) != attrs["identity"].get(k)]
                raise ConfigError(
                    f"study {self.study_name!r} exists in {mask_url(self.storage_url)} with a different "
                    f"{', '.join(changed)}; its trials would not be comparable", where="tune.study_name",
                    fix="re-run with the same sweep and overrides to resume it, or start a new study with "
                        "tune.study_name=<new name>")
            elif [d.name.lower() for d in study.directions] != directions:  # pragma: no cover - in identity
                raise ConfigError("the study's directions differ from the sweep's objectives", where="objectives")
        return study

    def _write_study_attrs(self, study, ident: dict) -> None:
        from pipeline.artifacts import versions

        attrs = {
            "identity": ident,
            "sweep": self.spec.name, "sweep_file": self.spec.path, "description": self.spec.description,
            "objectives": [{"metric": o.metric, "direction": o.direction, "stage": o.stage} for o in self.objectives],
            "constraints": [c.text for c in self.constraints],
            "space": [p.describe() for p in sp.walk(self.params)],
            "overrides": self.base, "seeds": list(self.t.seeds), "test_seeds": list(self.t.test_seeds),
            "seed_stages": self.seed_stages, "study_dir": str(self.study_dir),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        for k, v in attrs.items():
            study.set_user_attr(k, json.loads(json.dumps(v, default=str)))
