"""A tiny name -> factory registry (backbones, losses, engines, index kinds, formats)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from hashret.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; rejects duplicates and names the choices on a miss."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise BadInput(
                f"{self.what} {name!r} | unknown: choose one of {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order, for texts that list the built-ins first."""
        return list(self._items.items())

    def unregister(self, name: str) -> T:
        """Remove an entry and return it (tests and plug-ins that register for a while)."""
        try:
            return self._items.pop(name)
        except KeyError:
            raise ValueError(f"{self.what} {name!r} is not registered") from None

    @contextmanager
    def registered(self, name: str, obj: T) -> Iterator[T]:
        """Register `obj` for the duration of a `with` block, then remove it again."""
        self.register(name)(obj)
        try:
            yield obj
        finally:
            if self._items.get(name) is obj:
                del self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items
