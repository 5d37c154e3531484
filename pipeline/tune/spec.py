"""Sweep specs (``sweeps/<name>.yaml``): their typed schema, loading and validation.

A sweep file states what a study searches and how::

    description: PPO on the default pipeline
    base: [pipeline=default, algorithm=ppo]          # overrides for every trial
    space:                                           # override key -> parameter
      algorithm.kl_coef: {type: float, low: 0.01, high: 0.5, log: true}
      algorithm.ppo_epochs: {type: int, low: 1, high: 4}
      algorithm.temperature: [0.7, 1.0]              # a list is a categorical parameter
    objectives: {eval/gold_reward: maximize}         # or several: Pareto front
    constraints: ["eval/kl <= 5"]
    tune: {n_trials: 16, seeds: [0, 1], test_seeds: [100, 101, 102]}

The schema is the dataclasses below (the one place defaults live); :func:`load_spec`
checks a file (and ``tune.<key>=value`` from the command line) against them: an unknown
key is a :class:`ConfigError` naming the file, line and key and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from pipeline.config import CONF_DIR
from pipeline.errors import ConfigError
from pipeline.registry import closest

#: where ``sweep=<name>`` looks for ``<name>.yaml``
SWEEPS_DIR = CONF_DIR.parent / "sweeps"

SAMPLERS = ("tpe", "random", "gp", "cmaes", "nsga2", "grid")
PRUNERS = ("hyperband", "successive_halving", "median", "wilcoxon", "none")
DIRECTIONS = ("maximize", "minimize")
PHASES = ("all", "trials", "report")


@dataclass
class ObjectiveSpec:
    #: a final metric of a stage (``eval/gold_reward``), or ``time/<stage>`` / ``time/total``
    #: (seconds the stage / the whole pipeline took)
    metric: str = ""
    #: maximize | minimize
    direction: str = "maximize"
    #: the stage whose final metrics hold it (null: the last stage that reports it)
    stage: Optional[str] = None
    #: hypervolume reference value (multi-objective; null: the worst value observed)
    reference: Optional[float] = None


@dataclass
class SamplerSpec:
    #: tpe | random | gp | cmaes | nsga2 | grid
    name: str = "tpe"
    #: seed of the sampler (each trial re-seeds from it and its trial number: reproducible
    #: studies, and no repeated samples across workers or after a resume); null = random
    seed: Optional[int] = 0
    #: keyword arguments of the Optuna sampler (e.g. ``n_startup_trials: 5``)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerSpec:
    #: hyperband | successive_halving | median | wilcoxon (between tuning seeds) | none
    name: str = "hyperband"
    #: intermediate metric the pruner watches (null: the objective's metric); a proxy such as
    #: ``rollout/reward_mean`` is reported every ``trainer.log_every_n_steps`` steps
    metric: Optional[str] = None
    #: direction of ``metric`` (null: the objective's)
    direction: Optional[str] = None
    #: the stage whose intermediate values it watches (null: the first tuned stage reporting it)
    stage: Optional[str] = None
    #: keyword arguments of the Optuna pruner (e.g. ``min_resource: 2``)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TuneSettings:
    """The tuner's own settings: the sweep file's ``tune:`` section, then ``tune.<key>=...``
    on the command line."""

    #: null: the sweep's name
    study_name: Optional[str] = None
    #: trials in the study (finished, pruned and failed ones count; a trial whose worker
    #: died is retried and does not count twice); null: no limit (use timeout)
    n_trials: Optional[int] = 20
    #: seconds of wall time this invocation may start trials for (null: no limit)
    timeout: Optional[float] = None
    #: local worker processes sharing the study
    n_workers: int = 1
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    #: a trial's score is the mean over these training seeds
    seeds: List[int] = field(default_factory=lambda: [0])
    #: the best configuration(s) are re-run on these (disjoint from ``seeds``) after the study
    test_seeds: List[int] = field(default_factory=lambda: [100, 101, 102])
    #: stages the seeds apply to (and everything downstream of them); null: the stages whose
    #: settings the space changes. Upstream stages keep the run's seed and are reused.
    seed_stages: Optional[List[str]] = None
    #: configurations re-run on the test seeds: the k best (null: 1; multi-objective: the whole front)
    test_top_k: Optional[int] = None
    #: null: a journal file in the study directory (several local processes share it safely);
    #: ``postgresql://user@host/db`` (or any SQLAlchemy URL) for workers on several machines
    storage: Optional[str] = None
    #: null: ``<root>/outputs/studies/<study_name>``
    study_dir: Optional[str] = None
    #: a running trial's worker records a heartbeat every this many seconds ...
    heartbeat_interval: int = 10
    #: ... and a trial without one for this long is stale: marked failed and retried
    grace_period: int = 60
    #: how often a stale trial is retried
    max_retries: int = 1
    #: a worker whose first this-many trials all failed (and no trial of the study succeeded) stops
    fail_fast: int = 3
    #: all (trials, then outputs and test seeds) | trials (trials only) | report (outputs and test seeds only)
    phase: str = "all"
    #: index of this worker (names its log; ``-m tune.worker=range(N)`` launches N workers)
    worker: int = 0
    #: Rich progress display and one line per finished trial
    progress: bool = True


@dataclass
class PBTSettings:
    """Population-based training (a sweep's ``pbt:`` section; see pipeline/tune/pbt.py). The space's
    parameters are the hyperparameters the population explores; they must be ones the stage can
    change mid-run (``rl.schedule``: pipeline/modules/schedule.py)."""

    #: pbt (perturb or resample the copied values) | pb2 (a GP-UCB bandit picks them: Parker-Holder et al. 2020)
    method: str = "pbt"
    #: members trained side by side
    population: int = 4
    #: rollout steps per segment: members are ranked, and the bottom ones exploit and explore, every this many
    segment_steps: int = 10
    #: the stage trained in segments (null: the only stage with a schedule among those the space changes)
    stage: Optional[str] = None
    #: metric ranking members at segment ends, from the stage's logged metrics (null: the first objective's)
    metric: Optional[str] = None
    #: rank by metric - kl_penalty x kl_metric (maximised; + for a minimised metric): 0 = the metric alone
    kl_penalty: float = 0.0
    kl_metric: str = "eval/kl"
    #: the bottom fraction of the population copies (exploits) a member of the top fraction
    quantile: float = 0.25
    #: PBT explore: a number is multiplied by one of these (then clipped to its range) ...
    perturb_factors: List[float] = field(default_factory=lambda: [0.8, 1.2])
    #: ... or, with this probability, resampled from its range (categorical values: always resampled or kept)
    resample_probability: float = 0.25
    #: PB2: exploration weight of the upper confidence bound (mean + kappa x std)
    ucb_kappa: float = 2.0
    #: PB2: random candidates the bandit scores per choice
    candidates: int = 256
    #: seed of the initial population, the exploit partners and the explore draws
    seed: int = 0


@dataclass
class SweepSpec:
    #: one line on what the sweep is for
    description: str = ""
    #: overrides every trial starts from (``pipeline=default``, ``algorithm=ppo``, ``rl.total_steps=50``)
    base: List[str] = field(default_factory=list)
    #: override key -> parameter (see pipeline/tune/space.py for the syntax)
    space: Dict[str, Any] = field(default_factory=dict)
    #: ``{metric: direction}`` or a list of :class:`ObjectiveSpec` mappings
    objectives: Any = None
    #: ``"<metric> <= <value>"`` / ``">="``: feasible trials satisfy all of them
    constraints: List[str] = field(default_factory=list)
    #: parameter values to try first (``[{algorithm.kl_coef: 0.2}]``), e.g. the current defaults
    enqueue: List[Dict[str, Any]] = field(default_factory=list)
    tune: TuneSettings = field(default_factory=TuneSettings)
    #: population-based training instead of independent trials (null: an Optuna study)
    pbt: Optional[PBTSettings] = None
    #: filled by the loader: the sweep's name and file
    name: str = ""
    path: str = ""


@dataclass
class Constraint:
    metric: str
    op: str  # "<=" or ">="
    bound: float
    text: str

    def value(self, x: float) -> float:
        """Optuna's convention: <= 0 is feasible."""
        return x - self.bound if self.op == "<=" else self.bound - x


_CONSTRAINT = re.compile(r"^\s*(?P<metric>[^\s<>=]+)\s*(?P<op><=|>=|<|>)\s*(?P<bound>[-+0-9.eE]+)\s*$")


def parse_constraint(text: str, where: str) -> Constraint:
    m = _CONSTRAINT.match(str(text))
    if not m:
        raise ConfigError(f"cannot read constraint {text!r}", where=where,
                          fix="write '<metric> <= <number>' or '<metric> >= <number>', e.g. 'eval/kl <= 5'")
    try:
        bound = float(m["bound"])
    except ValueError:
        raise ConfigError(f"constraint {text!r}: {m['bound']!r} is not a number", where=where) from None
    return Constraint(m["metric"], "<=" if m["op"] in ("<=", "<") else ">=", bound, str(text).strip())


# ----------------------------------------------------------------------------- typed checking
class _Locator:
    """file:line of a key path in a YAML file (for error messages)."""

    def __init__(self, path: Path | None, text: str | None):
        self.path, self.root = path, None
        if text is not None:
            import yaml

            try:
                self.root = yaml.compose(text)
            except yaml.YAMLError:
                self.root = None

    def where(self, keys: tuple) -> str:
        key = ".".join(str(k) for k in keys) or "(top level)"
        if self.path is None:
            return key
        line = self._line(keys)
        return f"{self._shown()}:{line}: {key}" if line else f"{self._shown()}: {key}"

    def _shown(self) -> str:
        try:
            return str(self.path.relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)

    def _line(self, keys: tuple) -> int | None:
        import yaml

        node, line = self.root, None
        for k in keys:
            if isinstance(node, yaml.MappingNode):
                for kn, vn in node.value:
                    if str(kn.value) == str(k):
                        node, line = vn, kn.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and k < len(node.value):
                node = node.value[k]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check_value(value: Any, tp, keys: tuple, loc: _Locator) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], keys, loc)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, keys, loc)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", where=loc.where(keys))
        return [_check_value(v, args[0] if args else Any, keys + (i,), loc) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", where=loc.where(keys))
        return {k: _check_value(v, args[1] if args else Any, keys + (k,), loc) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", where=loc.where(keys))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", where=loc.where(keys))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", where=loc.where(keys))
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", where=loc.where(keys))
        return value
    raise TypeError(f"unsupported schema type {_type_name(tp)}")  # pragma: no cover


def build(cls, data: Any, keys: tuple = (), loc: _Locator | None = None):
    """``cls`` (a dataclass) from a plain mapping, checking every key and type against the schema."""
    loc = loc or _Locator(None, None)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of {cls.__name__} settings, got {data!r}", where=loc.where(keys))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "path") or cls is not SweepSpec]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = closest(str(key), names)
            raise ConfigError(f"unknown key {key!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + f"; valid keys: {', '.join(names)}", where=loc.where(keys + (key,)))
        kwargs[key] = _check_value(value, hints[key], keys + (key,), loc)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- loading
def sweep_names() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def find_sweep(name: str, root: Path | None = None) -> Path:
    """``sweep=ppo`` -> ``sweeps/ppo.yaml``; a path to a YAML file is taken as it is."""
    name = str(name)
    candidates = [Path(name)]
    if root is not None:
        candidates.append(Path(root) / name)
    for c in candidates:
        if c.suffix in (".yaml", ".yml") and c.is_file():
            return c.resolve()
    path = SWEEPS_DIR / f"{name}.yaml"
    if path.is_file():
        return path
    names = sweep_names()
    near = closest(name, names)
    raise ConfigError(f"no sweep {name!r}" + (f" (did you mean {near!r}?)" if near else "")
                      + f"; sweeps in {SWEEPS_DIR}: {', '.join(names) or 'none'}", where="sweep",
                      fix="pass sweep=<name of a sweeps/*.yaml file> or sweep=<path/to/file.yaml>")


def _set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, str) and part in ("sampler", "pruner"):  # `sampler: tpe` shorthand
            nxt = node[part] = {"name": nxt}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:-1])} is not a mapping", where=where)
        node = nxt
    node[parts[-1]] = value


def _normalize(data: dict) -> dict:
    """Shorthands: ``sampler: random`` / ``pruner: none`` -> ``{name: ...}``."""
    tune = data.get("tune")
    if isinstance(tune, dict):
        for key in ("sampler", "pruner"):
            if isinstance(tune.get(key), str):
                tune[key] = {"name": tune[key]}
    return data


def parse_tune_overrides(overrides: list[str]) -> list[tuple[str, Any, str]]:
    """``["n_trials=4", "sampler=random"]`` (the part after ``tune.``) -> (key, value, text)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    out = []
    for text in overrides:
        text = str(text)
        try:
            (o,) = OverridesParser.create().parse_overrides([text])
        except OverrideParseException as err:
            raise ConfigError(f"cannot parse: {str(err).splitlines()[0]}", where=f"tune.{text}") from None
        value = o.value()
        out.append((o.key_or_group, value, f"tune.{text}"))
    return out


def load_spec(sweep: str, tune_overrides: list[str] = (), root: Path | None = None) -> SweepSpec:
    """The sweep ``sweep`` (a name in ``sweeps/`` or a YAML path) with ``tune.<key>=value``
    overrides (given without the ``tune.`` prefix) applied, checked against the schema."""
    import yaml

    path = find_sweep(sweep, root)
    text = path.read_text()
    loc = _Locator(path, text)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML: {getattr(err, 'problem', None) or err}", where=where) from None
    if not isinstance(data, dict):
        raise ConfigError("a sweep file is a mapping (base, space, objectives, tune ...)", where=str(path))
    data = _normalize(data)
    spec = build(SweepSpec, data, (), loc)  # the file alone: errors point at its lines
    if tune_overrides:
        if not isinstance(data.get("tune"), dict):
            data["tune"] = {}
        parsed = parse_tune_overrides(list(tune_overrides))
        keys = {k for k, _, _ in parsed}
        for key, value, text_ in parsed:
            if key in ("sampler", "pruner") and isinstance(value, str):  # tune.sampler=random
                key = f"{key}.name"
            section = key.split(".")[0]
            if key == f"{section}.name" and not any(k.startswith(f"{section}.options") for k in keys):
                old = data["tune"].get(section)
                if isinstance(old, dict) and old.get("name", value) != value:
                    old.pop("options", None)  # the file's options were for the other sampler / pruner
            _set_dotted(data["tune"], key, value, where=text_)
            try:
                build(TuneSettings, data["tune"], ("tune",), _Locator(None, None))
            except ConfigError as err:
                raise ConfigError(err.message, where=f"command line {text_}", fix=err.fix) from None
        spec = build(SweepSpec, data, (), loc)
    spec.name, spec.path = path.stem, str(path)
    spec.locator = loc  # file:line for later checks (search space against the pipeline)
    check_settings(spec, loc)
    return spec


def objectives_of(spec: SweepSpec, loc: _Locator | None = None) -> list[ObjectiveSpec]:
    loc = loc or _Locator(None, None)
    raw = spec.objectives
    if raw is None:
        raise ConfigError("a sweep needs at least one objective", where=loc.where(("objectives",)),
                          fix="add e.g. `objectives: {eval/gold_reward: maximize}`")
    if isinstance(raw, dict):
        items = []
        for metric, direction in raw.items():
            if isinstance(direction, dict):
                items.append(build(ObjectiveSpec, {"metric": metric, **direction}, ("objectives", metric), loc))
            else:
                items.append(build(ObjectiveSpec, {"metric": metric, "direction": direction}, ("objectives", metric),
                                   loc))
    elif isinstance(raw, list):
        items = [build(ObjectiveSpec, {"metric": o} if isinstance(o, str) else o, ("objectives", i), loc)
                 for i, o in enumerate(raw)]
    else:
        raise ConfigError(f"expected {{metric: direction}} or a list, got {raw!r}", where=loc.where(("objectives",)))
    if not items:
        raise ConfigError("a sweep needs at least one objective", where=loc.where(("objectives",)))
    seen = set()
    for i, o in enumerate(items):
        if not o.metric:
            raise ConfigError("objective without a metric", where=loc.where(("objectives", i)))
        if o.direction not in DIRECTIONS:
            near = closest(o.direction, DIRECTIONS)
            raise ConfigError(f"direction {o.direction!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + "; choose maximize or minimize", where=loc.where(("objectives", o.metric)))
        if o.metric in seen:
            raise ConfigError(f"objective {o.metric!r} given twice", where=loc.where(("objectives",)))
        seen.add(o.metric)
    return items


def check_settings(spec: SweepSpec, loc: _Locator | None = None) -> None:
    """Checks that need no pipeline: names, budgets, seeds (search-space checks: space.py)."""
    loc = loc or _Locator(None, None)
    t = spec.tune

    def err(msg, *keys, fix=None):
        raise ConfigError(msg, where=loc.where(("tune",) + keys), fix=fix)

    if t.sampler.name not in SAMPLERS:
        near = closest(t.sampler.name, SAMPLERS)
        err(f"unknown sampler {t.sampler.name!r}" + (f" (did you mean {near!r}?)" if near else "")
            + f"; choose from {', '.join(SAMPLERS)}", "sampler", "name")
    if t.pruner.name not in PRUNERS:
        near = closest(t.pruner.name, PRUNERS)
        err(f"unknown pruner {t.pruner.name!r}" + (f" (did you mean {near!r}?)" if near else "")
            + f"; choose from {', '.join(PRUNERS)}", "pruner", "name")
    if t.pruner.direction is not None and t.pruner.direction not in DIRECTIONS:
        err(f"direction {t.pruner.direction!r}: choose maximize or minimize", "pruner", "direction")
    if t.phase not in PHASES:
        err(f"unknown phase {t.phase!r}; choose from {', '.join(PHASES)}", "phase")
    if t.n_trials is not None and t.n_trials < 1:
        err(f"must be >= 1, got {t.n_trials}", "n_trials")
    if t.n_trials is None and t.timeout is None:
        err("the study needs a budget: n_trials, timeout or both", "n_trials")
    if t.timeout is not None and t.timeout <= 0:
        err(f"must be > 0 seconds, got {t.timeout}", "timeout")
    for key in ("n_workers", "heartbeat_interval", "grace_period", "fail_fast"):
        if getattr(t, key) < 1:
            err(f"must be >= 1, got {getattr(t, key)}", key)
    if t.max_retries < 0:
        err(f"must be >= 0, got {t.max_retries}", "max_retries")
    if t.grace_period <= t.heartbeat_interval:
        err(f"grace_period ({t.grace_period}s) must exceed heartbeat_interval ({t.heartbeat_interval}s)",
            "grace_period")
    if not t.seeds:
        err("at least one tuning seed is needed", "seeds")
    if len(set(t.seeds)) != len(t.seeds):
        err(f"repeated tuning seeds {t.seeds}", "seeds")
    if len(set(t.test_seeds)) != len(t.test_seeds):
        err(f"repeated test seeds {t.test_seeds}", "test_seeds")
    shared = sorted(set(t.seeds) & set(t.test_seeds))
    if shared:
        err(f"test seeds must be disjoint from the tuning seeds; both have {shared}", "test_seeds",
            fix="pick test seeds the study never tunes on (e.g. 100, 101, 102)")
    if t.test_top_k is not None and t.test_top_k < 1:
        err(f"must be >= 1, got {t.test_top_k}", "test_top_k")
    name = t.study_name or spec.name
    if name and not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        err(f"study name {name!r}: use letters, digits and _ . + - only (it names a directory)", "study_name")
    for i, c in enumerate(spec.constraints):
        parse_constraint(c, loc.where(("constraints", i)))
    objectives_of(spec, loc)
    from pipeline.tune.space import check_grid, parse_space

    params = parse_space(spec.space, loc)
    if t.sampler.name == "grid":
        check_grid(params, loc)
    if spec.pbt is not None:
        check_pbt(spec.pbt, t, loc)
    for i, ov in enumerate(spec.base):
        if str(ov).split("=", 1)[0].lstrip("+~") in ("sweep",) or str(ov).startswith("tune."):
            raise ConfigError(f"{ov!r} is a tuner setting, not a pipeline override", where=loc.where(("base", i)),
                              fix="put tuner settings in the `tune:` section")


PBT_METHODS = ("pbt", "pb2")


def check_pbt(p: PBTSettings, t: TuneSettings, loc: _Locator) -> None:
    """The ``pbt:`` settings alone (against the pipeline: pipeline/tune/pbt.py)."""
    def err(msg, *keys, fix=None):
        raise ConfigError(msg, where=loc.where(("pbt",) + keys), fix=fix)

    if p.method not in PBT_METHODS:
        near = closest(p.method, PBT_METHODS)
        err(f"unknown method {p.method!r}" + (f" (did you mean {near!r}?)" if near else "") + "; choose pbt or pb2",
            "method")
    if p.population < 2:
        err(f"a population needs at least 2 members, got {p.population}", "population")
    if p.segment_steps < 1:
        err(f"must be >= 1, got {p.segment_steps}", "segment_steps")
    if not 0 < p.quantile <= 0.5:
        err(f"must be in (0, 0.5], got {p.quantile}", "quantile", fix="0.25: the bottom quarter copies the top quarter")
    if not p.perturb_factors or any(f <= 0 for f in p.perturb_factors):
        err(f"positive factors needed, got {p.perturb_factors}", "perturb_factors")
    if not 0 <= p.resample_probability <= 1:
        err(f"must be in [0, 1], got {p.resample_probability}", "resample_probability")
    if p.candidates < 1 or p.ucb_kappa < 0:
        err("candidates must be >= 1 and ucb_kappa >= 0", "candidates")
    if len(t.seeds) != 1:
        raise ConfigError(f"a population trains on one seed, got tune.seeds={t.seeds}", where=loc.where(("tune", "seeds")),
                          fix="run one study per seed (tune.seeds=[1] tune.study_name=<name>_s1)")
    if t.storage and "://" in str(t.storage):
        raise ConfigError("population-based training keeps its population in the study directory, not in a database",
                          where=loc.where(("tune", "storage")),
                          fix="drop tune.storage (workers on several machines share the study directory instead)")
