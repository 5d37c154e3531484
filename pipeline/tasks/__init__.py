"""Built-in procedurally generated tasks (no downloads)."""
from pipeline.tasks.base import TASKS, Task, build_task  # noqa: F401
from pipeline.tasks import arithmetic, lexicon  # noqa: F401  (register)
