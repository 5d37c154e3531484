"""Config schema (dataclasses registered with Hydra) and composition (whole run, per stage)."""
from pipeline.config.compose import CONF_DIR, compose, plain, stage_configs  # noqa: F401
