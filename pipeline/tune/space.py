"""Search spaces: the ``space:`` section of a sweep file, checked and sampled with Optuna.

Each entry maps an override key (what you would type on the command line) to a parameter::

    space:
      rl.optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      algorithm.cliprange: {type: float, low: 0.1, high: 0.3, step: 0.05}
      algorithm.ppo_epochs: {type: int, low: 1, high: 4}
      algorithm.temperature: [0.7, 1.0]            # a list: categorical
      algorithm:                                   # a config group is a parameter too
        type: categorical
        choices: [ppo, grpo]
        then:                                      # conditional sub-spaces, per choice
          ppo: {algorithm.cliprange: {type: float, low: 0.1, high: 0.3}}
          grpo: {algorithm.num_generations: [2, 4]}

``then`` parameters are sampled only in trials where their parent takes that value (Optuna's
define-by-run spaces; TPE models them). A parameter's Optuna name is its key; a key used in
several branches is named ``<key>|<parent>=<value>`` so that each keeps its own range.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.errors import ConfigError
from pipeline.registry import closest

KINDS = ("float", "int", "categorical")
_PARAM_KEYS = ("type", "low", "high", "step", "log", "choices", "then")


@dataclass
class Param:
    #: the override key (``algorithm.kl_coef``, or a group: ``algorithm``)
    key: str
    #: its name in the Optuna study (the key, qualified when a key appears in several branches)
    name: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False
    choices: Optional[list] = None
    #: choice (as str) -> parameters sampled when this one takes that value
    then: dict[str, list["Param"]] = field(default_factory=dict)
    #: ``(parent name, value)`` when conditional
    condition: Optional[tuple[str, Any]] = None
    #: where it is in the sweep file (``("space", "algorithm", "then", "ppo", "algorithm.kl_coef")``)
    path: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> dict:
        """The parameter as it goes into the study's summary (the reported search space)."""
        d: dict[str, Any] = {"key": self.key, "type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high)
            if self.step is not None:
                d["step"] = self.step
            if self.log:
                d["log"] = True
        if self.condition:
            d["when"] = f"{self.condition[0]}={self.condition[1]}"
        return d


def walk(params: list[Param]):
    """Every parameter of the tree, parents before their branches."""
    for p in params:
        yield p
        for sub in p.then.values():
            yield from walk(sub)


def _num(v, where: str, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{what} must be a number, got {v!r}", where=where)
    return v


def _parse_param(key: str, raw: Any, keys: tuple, condition, loc) -> Param:
    where = loc.where(keys)

    def at(*more) -> str:
        return loc.where(keys + more)

    if isinstance(raw, list):
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"a parameter is a mapping ({{type: float, low: .., high: ..}}) or a list of choices, "
                          f"got {raw!r}", where=where)
    for k in raw:
        if k not in _PARAM_KEYS:
            near = closest(str(k), _PARAM_KEYS)
            raise ConfigError(f"unknown key {k!r}" + (f" (did you mean {near!r}?)" if near else "")
                              + f"; a parameter has {', '.join(_PARAM_KEYS)}", where=at(k))
    kind = raw.get("type", "categorical" if "choices" in raw else None)
    if kind not in KINDS:
        near = closest(str(kind), KINDS) if kind else None
        raise ConfigError(f"type {kind!r}" + (f" (did you mean {near!r}?)" if near else "")
                          + "; choose float, int or categorical", where=at("type"))
    p = Param(key=key, name=key, kind=kind, condition=condition, path=keys)
    if kind == "categorical":
        for k in ("low", "high", "step", "log"):
            if k in raw:
                raise ConfigError(f"a categorical parameter has choices, not {k!r}", where=at(k))
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError("a categorical parameter needs a non-empty list of choices", where=at("choices"))
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"choice {c!r}: choices are numbers, strings, booleans or null",
                                  where=at("choices"), fix="write a list value as a string override, "
                                  "e.g. '[0.9,0.95]', or make two parameters")
        if len({repr(c) for c in choices}) != len(choices):
            raise ConfigError(f"repeated choices in {choices}", where=at("choices"))
        p.choices = list(choices)
        then = raw.get("then") or {}
        if not isinstance(then, dict):
            raise ConfigError("`then` maps a choice to its sub-space", where=at("then"))
        by_str = {str(c): c for c in choices}
        for value, sub in then.items():
            if str(value) not in by_str:
                near = closest(str(value), by_str)
                raise ConfigError(f"`then` has a branch for {value!r}, which is not one of the choices {choices}"
                                  + (f" (did you mean {near!r}?)" if near else ""), where=at("then", value))
            if not isinstance(sub, dict) or not sub:
                raise ConfigError("a branch maps override keys to parameters", where=at("then", value))
            p.then[str(value)] = [_parse_param(k, v, keys + ("then", value, k), (key, by_str[str(value)]), loc)
                                  for k, v in sub.items()]
        return p
    if "then" in raw:
        raise ConfigError("only categorical parameters have conditional sub-spaces (`then`)", where=at("then"))
    if "choices" in raw:
        raise ConfigError(f"a {kind} parameter has low/high, not choices (use type: categorical)",
                          where=at("choices"))
    for k in ("low", "high"):
        if k not in raw:
            raise ConfigError(f"a {kind} parameter needs `{k}`", where=where)
    low, high = _num(raw["low"], at("low"), "low"), _num(raw["high"], at("high"), "high")
    step = raw.get("step")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"log must be true or false, got {log!r}", where=at("log"))
    if step is not None:
        step = _num(step, at("step"), "step")
    if kind == "int":
        for k, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and float(v) != int(v):
                raise ConfigError(f"an int parameter needs integer bounds, got {k}={v!r}", where=at(k),
                                  fix="use type: float for fractional values")
    if low > high:
        raise ConfigError(f"empty range: low={low} > high={high}", where=where, fix="swap low and high")
    if log and low <= 0:
        raise ConfigError(f"a log-scale range must be positive, got low={low}", where=at("low"))
    if step is not None:
        if step <= 0:
            raise ConfigError(f"step must be > 0, got {step}", where=at("step"))
        if log:
            raise ConfigError("a parameter cannot have both a step and a log scale (Optuna samples one or the other)",
                              where=where)
        if step > high - low and high > low:
            raise ConfigError(f"step {step} is larger than the range [{low}, {high}]", where=at("step"))
    p.low, p.high, p.step, p.log = low, high, step, log
    if kind == "int":
        p.low, p.high = int(low), int(high)
        p.step = int(step) if step is not None else None
    return p


class _Keys:
    """Key path -> ``a.b.c`` (the sweep loader's locator adds the file and line)."""

    def where(self, keys: tuple) -> str:
        return ".".join(str(k) for k in keys)


def parse_space(raw: dict, loc=None) -> list[Param]:
    """The parameter tree of a ``space:`` mapping (raises ConfigError on an impossible space);
    ``loc.where(key path)`` names where a problem is (file:line with the sweep's locator)."""
    loc = loc or _Keys()
    where = loc.where(("space",))
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("the search space is empty", where=where,
                          fix="add parameters, e.g. `space: {algorithm.kl_coef: {type: float, low: 0.01, high: 0.5}}`")
    params = [_parse_param(str(k), v, ("space", k), None, loc) for k, v in raw.items()]
    # a key used in several places keeps one distribution per place: qualify its name
    keys = [p.key for p in walk(params)]
    for p in walk(params):
        if keys.count(p.key) > 1:
            if p.condition is None:
                raise ConfigError(f"{p.key!r} is a parameter at the top level and inside a `then` branch",
                                  where=where, fix="keep it in one place (top level or the branches)")
            p.name = f"{p.key}|{p.condition[0]}={p.condition[1]}"
    # the same key may appear in two branches, but never twice along one path (parent and child)
    for p in walk(params):
        for sub in walk([q for branch in p.then.values() for q in branch]):
            if sub.key == p.key:
                raise ConfigError(f"{p.key!r} is set by its own sub-space", where=where)
    return params


def check_grid(params: list[Param], loc=None) -> dict[str, list]:
    """GridSampler's search space: every parameter must be discrete, the space unconditional."""
    loc = loc or _Keys()
    grid: dict[str, list] = {}
    for p in walk(params):
        if p.condition is not None:
            raise ConfigError(f"the grid sampler cannot search conditional spaces ({p.name} depends on "
                              f"{p.condition[0]})", where=loc.where(p.path),
                              fix="use another sampler (tpe, random), or one sweep per branch")
        if p.kind == "categorical":
            grid[p.name] = list(p.choices)
        elif p.step is not None or p.kind == "int":
            step = p.step or 1
            n = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
            grid[p.name] = [p.low + i * step if p.kind == "float" else int(p.low + i * step) for i in range(n)]
            if p.kind == "float":
                grid[p.name] = [round(v, 12) for v in grid[p.name]]
        else:
            raise ConfigError(f"the grid sampler needs a finite set of values, but {p.key} is a continuous "
                              f"{p.kind} range", where=loc.where(p.path),
                              fix="give it a step, or list its values as choices")
    return grid


def grid_size(grid: dict[str, list]) -> int:
    return math.prod(len(v) for v in grid.values())


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """Sample ``params`` in ``trial`` (following the branches taken): override key -> value."""
    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "categorical":
            value = trial.suggest_categorical(p.name, p.choices)
        elif p.kind == "int":
            value = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            value = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
        out[p.key] = value
        branch = p.then.get(str(value))
        if branch:
            out.update(suggest(trial, branch))
    return out


def assignments_of(params_by_name: dict[str, Any], params: list[Param]) -> dict[str, Any]:
    """Override key -> value from a finished trial's Optuna params (names -> values)."""
    out: dict[str, Any] = {}
    for p in params:
        if p.name not in params_by_name:
            continue
        value = params_by_name[p.name]
        out[p.key] = value
        branch = p.then.get(str(value))
        if branch:
            out.update(assignments_of(params_by_name, branch))
    return out


def names_for(assignment: dict[str, Any], params: list[Param]) -> dict[str, Any]:
    """Optuna names -> values for override keys -> values (``enqueue:`` entries), following branches."""
    out: dict[str, Any] = {}
    for p in params:
        if p.key not in assignment:
            continue
        out[p.name] = assignment[p.key]
        branch = p.then.get(str(assignment[p.key]))
        if branch:
            out.update(names_for(assignment, branch))
    return out


# ----------------------------------------------------------------------------- overrides
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@-]+$")


def hydra_value(value: Any) -> str:
    """A Python value as a command-line override value Hydra parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in ("null", "true", "false", "nan", "inf", "-inf"):
        try:
            float(text)
        except ValueError:
            return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override(key: str, value: Any) -> str:
    return f"{key}={hydra_value(value)}"
