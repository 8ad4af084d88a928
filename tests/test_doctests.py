"""Every runnable example in prunekit's docstrings still runs (examples marked +SKIP need data
or a long run; a module whose examples are all skipped attempts none)."""
import doctest
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted(".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                 for f in (SRC / "prunekit").rglob("*.py") if ">>>" in f.read_text())


def test_the_modules_with_examples_are_found():
    assert len(MODULES) > 100 and "prunekit.importance.criteria" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
