from pipeline.tracking.loggers import (  # noqa: F401
    build_loggers,
    has_wandb_credentials,
    resolve_wandb_mode,
    scrub_secrets,
)
