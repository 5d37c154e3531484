"""Stage kinds: every module in this package registers its kind in ``STAGES`` on import.

Adding a stage kind: write ``pipeline/stages/<kind>.py`` (a ``Stage`` subclass registered
with ``@STAGES.register``), its config section in ``pipeline/config/schema.py``, and use it
in a ``conf/pipeline/*.yaml`` entry. Nothing else lists stage kinds.
"""
import importlib
import pkgutil

from pipeline.stages.base import STAGES, Role, Stage  # noqa: F401

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")
