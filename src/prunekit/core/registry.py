"""A registry is a named table of things (rules, criteria, methods, models, datasets).

Every registry offers register/get/list, and the contract tests are parametrised over `list()`
so that an item is tested the moment it is registered.

>>> r = Registry("criterion")
>>> @r.register("l1")
... def l1(x): return x.abs()
>>> r.get("l1") is l1, r.list()
(True, ['l1'])
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, check_name: Callable[[str], str | None] | None = None):
        """`check_name(name)`: why a name cannot be registered (None when it can)."""
        self.kind = kind
        self._items: dict[str, T] = {}
        self._check_name = check_name

    def register(self, name: str, item: T | None = None) -> Any:
        """Register `item` under `name`; without `item`, return a decorator."""
        why = self._check_name(name) if self._check_name is not None else None
        if why:
            raise ConfigError(f"{self.kind} name {name!r} cannot be registered: {why}")

        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pick another name")
            self._items[name] = obj
            return obj
        return add if item is None else add(item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name (a list or mapping from a recipe)
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def unregister(self, name: str) -> None:
        """Remove `name` (no error when absent)."""
        self._items.pop(name, None)

    def list(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            return name in self._items
        except TypeError:  # an unhashable name is no registered name
            return False
