"""Config.from_dict tells a config written for another schema (ConfigSchemaError) from a wrong one."""
import dataclasses

import pytest

from prunekit.core.config import Config
from prunekit.core.errors import ConfigError, ConfigSchemaError


@dataclasses.dataclass
class Inner(Config):
    width: int = 4


@dataclasses.dataclass
class Needs(Config):
    size: int


@dataclasses.dataclass
class Outer(Config):
    ratio: float = 0.5
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_another_version_and_unknown_keys_are_schema_errors():
    with pytest.raises(ConfigSchemaError, match="version 99"):
        Outer.from_dict({"ratio": 0.5, "version": 99})
    with pytest.raises(ConfigSchemaError, match="unknown key"):
        Outer.from_dict({"ratio": 0.5, "new_field": 1})
    with pytest.raises(ConfigSchemaError, match="unknown key"):  # in a nested section too
        Outer.from_dict({"inner": {"width": 4, "depth": 2}})


def test_a_wrong_value_is_a_config_error_but_not_a_schema_error():
    with pytest.raises(ConfigError, match="missing required key") as err:
        Needs.from_dict({})
    assert not isinstance(err.value, ConfigSchemaError)
    with pytest.raises(ConfigError) as err:
        Outer.from_dict({"inner": 3})
    assert not isinstance(err.value, ConfigSchemaError)
