"""Registries: names listed in order, lookups of anything else one ConfigError listing the names."""
from __future__ import annotations

import re

import pytest

from prunekit.core.errors import ConfigError
from prunekit.core.registry import Registry


def _registry() -> Registry:
    r = Registry("dataset")
    r.register("digits", 1)
    r.register("cifar10", 2)
    return r


def test_register_get_and_list():
    r = _registry()
    assert r.list() == ["cifar10", "digits"] and r.get("digits") == 1 and "digits" in r
    with pytest.raises(ConfigError, match=r"^dataset 'digits' is already registered; pick another name$"):
        r.register("digits", 3)


@pytest.mark.parametrize("name", ["nope", None, 3, ["digits"], {"name": "digits"}],
                         ids=["unknown", "none", "int", "list", "dict"])
def test_a_lookup_of_anything_but_a_registered_name_is_one_config_error(name):
    r = _registry()
    assert name not in r
    with pytest.raises(ConfigError, match="^" + re.escape(f"unknown dataset {name!r}; available: cifar10, digits") + "$"):
        r.get(name)


def test_a_dataset_name_that_is_a_list_is_one_config_error():
    from prunekit.data.config import DataConfig

    with pytest.raises(ConfigError, match=r"unknown dataset \['digits'\]; available: .*digits"):
        DataConfig(name=["digits"])
