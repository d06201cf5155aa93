"""A tiny name -> factory registry (backbones, losses, engines, index kinds, formats)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

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

    def __contains__(self, name: str) -> bool:
        return name in self._items
