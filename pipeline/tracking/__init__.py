from pipeline.tracking.loggers import build_loggers, resolve_wandb_mode, scrub_secrets  # noqa: F401
