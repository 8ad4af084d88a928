"""Module-name helpers shared by the methods' `ignore` lists."""
from __future__ import annotations

from typing import Iterable


def within(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module `name` is one of `prefixes` or sits inside one (a child: "<prefix>.<...>").

    >>> within("layer1.0.conv1", ["layer1"]), within("layer10.conv", ["layer1"]), within("fc", [])
    (True, False, False)
    """
    return any(name == p or name.startswith(p + ".") for p in prefixes)
