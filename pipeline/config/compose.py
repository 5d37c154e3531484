"""Composing configs: the whole run's, and each stage's effective one.

:func:`compose` is what the command line, the tests and the tuner use to build a config
from overrides (Hydra's compose API over ``conf/``); it records the overrides in
``cfg.overrides``. :func:`stage_configs` gives every stage of ``cfg.pipeline`` the config it
runs with. A stage's settings come from, in increasing precedence:

1. the run's config (schema defaults, group choices, experiment presets);
2. the stage entry's ``overrides`` in the pipeline file: a group choice there
   (``algorithm=grpo``) replaces the run's default choice *for that stage*, and its keys
   (``algorithm.kl_coef=0.02``) override the run's presets;
3. the command line (``algorithm=nash_mp``, ``algorithm.kl_coef=0.1``): group choices and
   keys given there apply to every stage, also over a stage's own file settings (the
   command line beats files, as everywhere in Hydra);
4. ``stages.<stage>.<key>=<value>`` on the command line: that one stage, after everything.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.registry import closest

#: the Hydra config directory (conf/ at the repository root)
CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"

#: old key prefixes -> new ones (a clear error instead of a silent ignore)
RENAMED = {"policy": "rl", "sft.on_long_prompt": "sft.data.on_long_prompt",
           "dpo.on_long_prompt": "dpo.data.on_long_prompt"}
#: groups a stage cannot choose for itself
RUN_WIDE_GROUPS = ("pipeline", "paths", "hydra")


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved); anything else unchanged."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


@functools.lru_cache(maxsize=1)
def config_groups() -> frozenset[str]:
    """Names of the config groups under ``conf/`` (``algorithm``, ``task``, ...)."""
    return frozenset(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _key_of(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def check_renamed(overrides: Iterable[str]) -> None:
    """ConfigError for an override that uses a renamed key (``policy.total_steps=...``)."""
    for arg in overrides:
        key = _key_of(str(arg))
        for path in (key, key.split(".", 2)[-1] if key.startswith("stages.") else ""):
            for old, new_prefix in RENAMED.items():
                if path == old or path.startswith(old + "."):
                    new = new_prefix + path[len(old):]
                    raise ConfigError(f"'{path}' was renamed '{new}'", where=str(arg),
                                      fix=f"write {str(arg).replace(path, new, 1)}")


def open_sections(overrides: Iterable[str]) -> list[str]:
    """``stages.<stage>.<key>=v`` -> ``++stages...`` (the section is an open mapping Hydra would
    otherwise make you ``+``-prefix); everything else unchanged."""
    out = []
    for arg in overrides:
        arg = str(arg)
        out.append("++" + arg if arg.startswith("stages.") else arg)
    return out


def _hydra_compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.config.schema import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main (or a caller's initialize block)
        return hydra_compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def compose(overrides: Sequence[str] = (), *, root: str | Path | None = None, output_dir: str | Path | None = None,
            artifact_dir: str | Path | None = None) -> DictConfig:
    """The pipeline config for ``overrides``, as ``python -m pipeline OVERRIDES`` composes it.

    ``root`` (default: the working directory) roots ``outputs/``; ``output_dir`` is the run
    directory (default ``<root>/outputs/runs/manual``). The overrides are recorded in
    ``cfg.overrides`` so that stages with their own settings can be composed on top of them.
    """
    overrides = [str(o) for o in overrides]
    check_renamed(overrides)
    root = Path(root) if root is not None else Path.cwd()
    pins = [f"paths.root_dir={_quote(root)}",
            f"paths.output_dir={_quote(output_dir if output_dir is not None else root / 'outputs/runs/manual')}"]
    if artifact_dir is not None:
        pins.append(f"paths.artifact_dir={_quote(artifact_dir)}")
    try:
        cfg = _hydra_compose(open_sections(overrides) + pins)
    except Exception as err:  # Hydra's composition errors -> one line naming the key, with the closest valid one
        explained = explain_compose_error(err, overrides)
        if explained is None:
            raise
        raise explained from None
    cfg.overrides = overrides
    return cfg


def _closest_hint(name: str, options) -> str:
    near = closest(name, options)
    return f" (did you mean {near!r}?)" if near else ""


def explain_compose_error(err: Exception, overrides: Sequence[str]) -> ConfigError | None:
    """A :class:`ConfigError` for a Hydra composition error (None if it is not one)."""
    import re

    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    if not isinstance(err, HydraException):
        return None
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, MissingConfigException):
        m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
        if m:
            group, option = m.group(1), m.group(2)
            options = [ln.strip() for ln in text.split("Available options in", 1)[-1].splitlines()[1:]
                       if ln.startswith("\t") and "=" not in ln]
            return ConfigError(f"no option {option!r} in group {group!r}{_closest_hint(option, options)}; "
                               f"options: {', '.join(options)}", where=group,
                               fix=f"pick one of the files in conf/{group}/")
        return ConfigError(first, where="config", fix="check the config group and option names (python -m pipeline --help)")
    if isinstance(err, OverrideParseException):
        return ConfigError(f"cannot parse an override: {first}", where="command line",
                           fix="use key=value; quote values with spaces or special characters, e.g. 'key=[a,b]'")
    m = re.match(r"Could not override '([^']+)'", first)
    if m:
        key = m.group(1)
        parts = key.split(".")
        rest = [o for o in overrides if not str(o).lstrip("+~").startswith(key)]
        try:
            node = _hydra_compose(open_sections(rest))
        except Exception:
            node = None
        parent: list[str] = []
        for part in parts[:-1]:
            if node is None or not OmegaConf.is_dict(node) or part not in node:
                break
            node = node[part]
            parent.append(part)
        missing = parts[len(parent)]
        options = list(node.keys()) if node is not None and OmegaConf.is_dict(node) else []
        where = ".".join(parent) or "the config"
        return ConfigError(f"{where} has no key {missing!r}{_closest_hint(missing, options)}", where=key,
                           fix="check the spelling against `python -m pipeline --cfg job`"
                               + (f"; keys there: {', '.join(map(str, options))}" if options and len(options) <= 30 else ""))
    m = re.match(r"Error merging override (\S+?)=", first)
    if m:
        cause = err.__cause__
        detail = str(cause).splitlines()[0] if cause is not None else first
        return ConfigError(detail, where=m.group(1), fix="give a value of the key's type (see `--cfg job`)")
    return ConfigError(first, where="config")


def _quote(value: Any) -> str:
    """A string override value Hydra reads verbatim (paths may hold spaces, '=' or quotes)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


# ----------------------------------------------------------------------------- per-stage configs
def _parse(overrides: Sequence[str], where: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {str(err).splitlines()[0]}", where=where,
                          fix="use the command-line syntax, e.g. algorithm=grpo or algorithm.kl_coef=0.02") from None


def _is_group_choice(o) -> bool:
    return not o.is_delete() and o.key_or_group in config_groups() and "." not in o.key_or_group


def _flatten(settings: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(settings, dict) and settings:
        out = []
        for k, v in settings.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, settings)]


def _targeted(cfg: DictConfig, name: str) -> tuple[list[str], list[tuple[str, Any]]]:
    """(group choices, (key, value) settings) from ``stages.<name>`` on the command line."""
    raw = plain(cfg.stages.get(name)) if cfg.get("stages") else None
    if not raw:
        return [], []
    choices, keys = [], []
    for key, value in _flatten(raw):
        if key in config_groups() and isinstance(value, str):
            choices.append(f"{key}={value}")
        else:
            keys.append((key, value))
    return choices, keys


def _apply_key(stage_cfg: DictConfig, key: str, value: Any, where: str) -> None:
    """Set ``key`` in ``stage_cfg`` (struct-checked: a misspelt key names the closest one)."""
    from omegaconf.errors import OmegaConfBaseException

    node = stage_cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not OmegaConf.is_dict(node) or (part not in node and OmegaConf.is_struct(node)):
            parent = ".".join(parts[:i]) or "the config"
            options = list(node.keys()) if OmegaConf.is_dict(node) else []
            near = closest(part, options)
            raise ConfigError(f"{parent} has no key {part!r}" + (f" (did you mean {near!r}?)" if near else ""),
                              where=where, fix="check the key against `python -m pipeline --cfg job`")
        if i < len(parts) - 1:
            node = node[part]
    try:
        node[parts[-1]] = value
    except OmegaConfBaseException as err:
        raise ConfigError(f"{type(err).__name__}: {str(err).splitlines()[0]}", where=where) from None


def stage_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The effective config of every stage of ``cfg.pipeline`` (see the module docstring).

    A stage without settings of its own shares ``cfg``. Stages with group choices are
    composed again from ``cfg.overrides``, which must reproduce ``cfg`` (configs built by
    :func:`compose` or the command line do).
    """
    names = [s.name for s in cfg.pipeline.stages]
    for target in (cfg.get("stages") or {}):
        if target not in names:
            near = closest(target, names)
            raise ConfigError(f"no stage named {target!r} in pipeline {cfg.pipeline.name!r}"
                              + (f" (did you mean {near!r}?)" if near else "") + f"; its stages: {', '.join(names)}",
                              where=f"stages.{target}", fix="target a stage by its name in pipeline.stages")
    out: dict[str, DictConfig] = {}
    checked = False
    for i, spec in enumerate(cfg.pipeline.stages):
        where = f"pipeline.stages[{i}] ({spec.name}).overrides"
        file_ovr = [str(o) for o in (spec.get("overrides") or [])]
        check_renamed(file_ovr)
        choices, keys = _targeted(cfg, spec.name)
        if not file_ovr and not choices and not keys:
            out[spec.name] = cfg
            continue
        parsed = _parse(file_ovr, where)
        for o in parsed:
            if o.key_or_group in RUN_WIDE_GROUPS or o.key_or_group.split(".")[0] in ("paths", "stages", "overrides"):
                raise ConfigError(f"{o.input_line!r} is a run-wide setting; a stage cannot set it for itself",
                                  where=where, fix="set it for the whole run (command line or experiment preset)")
        cli_groups = {o.key_or_group for o in _run_overrides(cfg) if _is_group_choice(o)}
        # a group chosen on the command line beats the pipeline file's choice for the stage
        stage_choices = [o.input_line for o in parsed if _is_group_choice(o) and o.key_or_group not in cli_groups]
        stage_choices += choices
        stage_keys = [o.input_line for o in parsed if not _is_group_choice(o)]
        if stage_choices or stage_keys:
            if not checked:
                _check_reproducible(cfg)
                checked = True
            stage_cfg = _compose_stage(cfg, stage_choices, stage_keys, where)
        else:
            stage_cfg = copy.deepcopy(cfg)
        for key, value in keys:
            _apply_key(stage_cfg, key, value, where=f"stages.{spec.name}.{key}")
        out[spec.name] = stage_cfg
    return out


def _run_overrides(cfg: DictConfig) -> list:
    return [o for o in _parse([str(x) for x in (cfg.get("overrides") or [])], "overrides")
            if not o.key_or_group.startswith(("hydra", "paths."))]


def _compose_stage(cfg: DictConfig, choices: list[str], keys: list[str], where: str) -> DictConfig:
    from hydra.errors import HydraException

    chosen = {c.split("=", 1)[0] for c in choices}
    run = _run_overrides(cfg)
    base = [o.input_line for o in run if not (_is_group_choice(o) and o.key_or_group in chosen)]
    # command-line keys beat the pipeline file: applied again after the stage's own keys
    again = [o.input_line for o in run if not _is_group_choice(o) and not o.is_add() and not o.is_delete()
             and not o.is_force_add() and not o.key_or_group.startswith("stages.")]
    try:
        stage_cfg = _hydra_compose(open_sections(base) + choices + keys + again)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0], where=where,
                          fix="check the stage's overrides against `python -m pipeline --cfg job`") from None
    stage_cfg.paths = cfg.paths.copy()
    stage_cfg.overrides = [str(x) for x in (cfg.get("overrides") or [])] + choices + keys
    return stage_cfg


def _comparable(cfg: DictConfig) -> dict:
    d = OmegaConf.to_container(cfg, resolve=False)
    for k in ("paths", "overrides"):
        d.pop(k, None)
    return d


def _check_reproducible(cfg: DictConfig) -> None:
    again = _hydra_compose(open_sections([o.input_line for o in _run_overrides(cfg)]))
    if _comparable(again) != _comparable(cfg):
        raise ConfigError("this config has stages with their own settings, but it was changed after composing "
                          "(or composed without recording its overrides), so those stages cannot be composed "
                          "on top of it", where="overrides",
                          fix="build the config with pipeline.config.compose([...all overrides...]) "
                              "instead of editing it afterwards")
