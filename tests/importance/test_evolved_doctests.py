"""The runnable examples in the evolved-function modules' docstrings still run."""
import doctest
import importlib

import pytest

MODULES = ["prunekit.importance.evolved.stats", "prunekit.importance.evolved.closed_forms",
           "prunekit.importance.evolved.shipped", "prunekit.importance.evolved.space",
           "prunekit.importance.evolved.text", "prunekit.importance.evolved.tree_eval",
           "prunekit.evolve.config", "prunekit.evolve.fitness", "prunekit.evolve.jobs"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
