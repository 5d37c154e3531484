"""Built-in procedurally generated tasks (no downloads)."""
from pipeline.tasks.base import TASKS, ClassGame, Task, build_task  # noqa: F401
from pipeline.tasks import arithmetic, intransitive, lexicon  # noqa: F401  (register)
