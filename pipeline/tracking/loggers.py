"""Lightning loggers from config: CSV always, plus W&B / TensorBoard on request.

W&B never prompts: unless the user set ``logger.wandb.mode`` or ``WANDB_MODE``, it runs
online only when credentials exist (``WANDB_API_KEY`` or a netrc entry from
``wandb login``) and offline otherwise. Configs are scrubbed of secret-looking keys
before they are logged anywhere.
"""
from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger

from pipeline.errors import ConfigError

#: config keys whose values are secrets: exactly these names, or ending in ``_<one of them>``
#: (``wandb_api_key``, ``hf_token``, ``db_password``); not ``max_new_tokens`` or ``model.tokenizer``
_SECRET = re.compile(r"^(.*[_-])?(api[_-]?key|token|access[_-]?token|auth[_-]?token|secret|secret[_-]?key|"
                     r"password|passwd|credentials?)$", re.I)
KNOWN_BACKENDS = ("csv", "wandb", "tensorboard")


#: ``scheme://user:password@host``: the password part of a URL (e.g. a database for the tuner)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)([^@\s]+)(@)", re.I)


def scrub_secrets(obj: Any) -> Any:
    """Copy of a plain dict/list config with secret values replaced: values of secret keys
    (see ``_SECRET``) and passwords inside URLs."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, str):
        return _URL_PASSWORD.sub(r"\1***\3", obj)
    return obj


def has_wandb_credentials() -> bool:
    """``WANDB_API_KEY`` or a netrc entry for the W&B server (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.path.expanduser("~/.netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_wandb_mode(configured: str | None) -> str:
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


def build_loggers(logger_cfg, *, save_dir: Path, stage: str, run_name: str, group: str,
                  config: dict | None = None) -> list[Logger]:
    backends = list(logger_cfg.backends)
    for b in backends:
        if b not in KNOWN_BACKENDS:
            raise ConfigError(f"unknown logger backend {b!r}; choose from {', '.join(KNOWN_BACKENDS)}",
                              where="logger.backends")
    loggers: list[Logger] = [CSVLogger(save_dir=str(save_dir), name="logs", version="")]
    if "tensorboard" in backends:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(save_dir), name="tensorboard", version=""))
    if "wandb" in backends:
        from lightning.pytorch.loggers import WandbLogger

        from pipeline.tracking.wandb_runs import active_run, check_mode

        wcfg = logger_cfg.wandb
        mode = resolve_wandb_mode(wcfg.mode)
        check_mode(mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        # under the runner the stage's run exists already (pipeline.tracking.wandb_runs.stage_run): log into it
        loggers.append(
            WandbLogger(
                project=wcfg.project, entity=wcfg.entity, name=f"{run_name}/{stage}", group=group,
                job_type=stage, tags=list(wcfg.tags), mode=mode, save_dir=str(save_dir),
                config=scrub_secrets(config or {}), experiment=active_run(),
            )
        )
    return loggers
