"""Stage kinds (registered on import)."""
from pipeline.stages.base import STAGES, Stage  # noqa: F401
from pipeline.stages import evaluate, policy, reward, sft  # noqa: F401  (register)
