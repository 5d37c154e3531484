"""Name -> object registries (advantage estimators, losses, stages, tasks...).

Config picks implementations by name; an unknown name is a :class:`ConfigError`
that lists the registered choices (and suggests the closest one). What an entry
needs or accepts is declared where it is registered, as keyword metadata::

    @ADVANTAGE_ESTIMATORS.register("gae", needs={"values"})
    def gae(...): ...

    ADVANTAGE_ESTIMATORS.meta("gae")["needs"]   # -> frozenset({"values"})
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


def closest(name: str, choices) -> str | None:
    """The registered/valid name closest to a misspelt ``name`` (None if nothing is close)."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return match[0] if match else None


def _freeze(value: Any) -> Any:
    if isinstance(value, (set, list, tuple)) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return value


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; ``meta`` declares what it needs/accepts
        (string collections are stored as frozensets)."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._meta[name] = {k: _freeze(v) for k, v in meta.items()}
            return obj

        return deco

    def get(self, name: str, *, key: str | None = None) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            choices = ", ".join(sorted(self._items)) or "(none registered)"
            near = closest(name, self._items)
            hint = f" (did you mean {near!r}?)" if near else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; choose one of: {choices}", where=key) from None

    def meta(self, name: str, *, key: str | None = None) -> dict[str, Any]:
        """The metadata ``name`` was registered with (unknown names raise like :meth:`get`)."""
        self.get(name, key=key)
        return self._meta[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
