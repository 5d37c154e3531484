"""Name -> object registries (advantage estimators, losses, stages, tasks...).

Config picks implementations by name; an unknown name is a :class:`ConfigError`
that lists the registered choices.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, *, key: str | None = None) -> T:
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items)) or "(none registered)"
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {choices}", where=key
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
