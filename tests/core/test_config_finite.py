"""Every float a config holds must be finite: NaN passes `<`/`>` range checks, so it is refused first.

Fields that hold module names (`ignore`, ...) take a list of strings: a plain string would be
iterated into one-letter names; None and nested lists used to end in a TypeError traceback.
Every config round-trips through to_dict/from_dict (JSON and YAML) to an equal config, and a
nested config is built from a mapping or refused in one line naming its field."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import typing

import pytest
import yaml

import prunekit
from prunekit.core.config import Config, check_names, check_range
from prunekit.core.errors import ConfigError

# Fields a config needs before it is valid at all (each a known-good value).
BASE = {"MagnitudeConfig": {"channel_ratio": 0.5}, "GatorConfig": {"target": 0.5},
        "SLRConfig": {"sparsity": 0.5}, "DataConfig": {"name": "digits"},
        "TorchPruningConfig": {"macs_fraction": 0.5}, "SearchRecipe": {"data": {"name": "digits"}}}


def _all_configs() -> list[type[Config]]:
    for mod in pkgutil.walk_packages(prunekit.__path__, "prunekit."):
        if not mod.name.endswith(("__main__", "cli.main")):
            importlib.import_module(mod.name)
    seen, todo = [], list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen and cls.__module__.startswith("prunekit."):
            seen.append(cls)
        todo += cls.__subclasses__()
    return sorted(seen, key=lambda c: c.__name__)


def _float_fields(cls: type[Config]) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if "float" in str(hints[f.name])]


CASES = [(cls, name) for cls in _all_configs() for name in _float_fields(cls)]


def test_the_walk_finds_the_configs_with_float_fields():
    names = {cls.__name__ for cls, _ in CASES}
    assert {"TrainConfig", "MagnitudeConfig", "GatorConfig", "SLRConfig", "DataConfig"} <= names


@pytest.mark.parametrize("cls, field", CASES, ids=[f"{c.__name__}.{f}" for c, f in CASES])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_of_every_config_refuses_non_finite(cls, field, value):
    cls(**BASE.get(cls.__name__, {}))  # the base is valid: the error below is the field's
    with pytest.raises(ConfigError, match=rf"{field}=.*not a finite number"):
        cls(**{**BASE.get(cls.__name__, {}), field: value})


def test_nan_inside_a_mapping_or_list_is_refused():
    from prunekit import SLRConfig

    with pytest.raises(ConfigError, match=r"sparsity\.conv1=nan is not a finite number"):
        SLRConfig(sparsity={"conv1": math.nan})


def test_check_range_refuses_nan_and_infinity_even_with_an_infinite_bound():
    for value in (math.nan, math.inf):
        with pytest.raises(ConfigError, match="not a finite number"):
            check_range("lr", value, 0.0, math.inf, lo_open=True)
    check_range("lr", 1e30, 0.0, math.inf, lo_open=True)


def test_replace_validates_again():
    from prunekit import TrainConfig

    with pytest.raises(ConfigError, match="lr=nan"):
        TrainConfig().replace(lr=math.nan)


def _name_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [name for name, hint in hints.items()
            if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint)[:1] == (str,)]


NAME_CASES = [(cls, name) for cls in _all_configs() for name in _name_fields(cls)]


def test_the_walk_finds_the_ignore_fields():
    assert {"MagnitudeConfig", "GatorConfig", "HydraConfig", "SSCConfig"} <= {cls.__name__ for cls, _ in NAME_CASES}


@pytest.mark.parametrize("cls, field", NAME_CASES, ids=[f"{c.__name__}.{f}" for c, f in NAME_CASES])
@pytest.mark.parametrize("value", ["conv1", None, [["conv1"]], [1]], ids=["str", "none", "nested", "int"])
def test_every_name_list_field_refuses_what_is_not_a_list_of_strings(cls, field, value):
    cls(**{**BASE.get(cls.__name__, {}), field: ["conv1"]})  # a list of names is fine
    with pytest.raises(ConfigError, match=rf"{field}=.* must be a list of names"):
        cls(**{**BASE.get(cls.__name__, {}), field: value})


def test_check_names_accepts_lists_and_tuples_of_strings():
    check_names("ignore", [])
    check_names("ignore", ("a", "b.c"))
    with pytest.raises(ConfigError, match=r"e\.g\. \['fc'\]"):
        check_names("ignore", "fc")


def test_messages_quote_large_values_in_short():
    from prunekit.core.config import check_names, check_range

    big = [[["x"] * 1000] * 1000] * 10
    for check in (lambda: check_names("ignore", big), lambda: check_range("lr", big, 0.0, 1.0)):
        with pytest.raises(ConfigError) as info:
            check()
        assert len(str(info.value)) < 300


def _limited_fields(cls: type[Config]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.name in ("seed", "threads", "threads_per_job") or f.name.endswith(("_seed", "_threads"))]


LIMITED = [(cls, name) for cls in _all_configs() for name in _limited_fields(cls)]


def test_the_walk_finds_the_seed_and_thread_fields():
    assert {("TrainConfig", "seed"), ("DataConfig", "seed"), ("LatencyConfig", "threads"),
            ("EvolveConfig", "threads_per_job")} <= {(c.__name__, f) for c, f in LIMITED}


@pytest.mark.parametrize("cls, field", LIMITED, ids=[f"{c.__name__}.{f}" for c, f in LIMITED])
def test_seeds_and_thread_counts_torch_cannot_take_are_refused(cls, field):
    """torch.manual_seed takes 64 bits and set_num_threads(100000) crashes in thread creation."""
    too_many = 2**64 if "seed" in field else 100_000
    with pytest.raises(ConfigError, match=rf"{field}=.*too large .*use at most"):
        cls(**{**BASE.get(cls.__name__, {}), field: too_many})


ROUND_TRIP = [cls for cls in _all_configs() if cls.__name__ != "LayerSpec"]  # LayerSpec has no defaults


@pytest.mark.parametrize("cls", ROUND_TRIP, ids=[c.__name__ for c in ROUND_TRIP])
def test_every_config_round_trips_through_json_and_yaml_to_an_equal_config(cls):
    base = BASE.get(cls.__name__, {})
    names = _name_fields(cls)
    configs = [cls.from_dict(base)]  # a nested section given as a mapping is built from it
    if names:  # a tuple of names is the list it is written as
        configs.append(cls.from_dict({**base, **{name: ("conv1", "fc") for name in names}}))
    for cfg in configs:
        assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cls.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_a_tuple_in_a_list_field_is_kept_as_a_list():
    from prunekit import MagnitudeConfig, SLRConfig

    assert MagnitudeConfig(channel_ratio=0.5, ignore=("fc",)).ignore == ["fc"]
    assert SLRConfig(sparsity=0.5, layers=("conv1", "conv2")).layers == ["conv1", "conv2"]


def test_a_nested_config_is_built_from_a_mapping_or_refused_naming_its_field():
    from prunekit.cost.latency import LatencyConfig
    from prunekit.data.config import DataConfig
    from prunekit.methods.gator.config import GatorConfig
    from prunekit.methods.prdarts.config import PRDartsConfig
    from prunekit.methods.prdarts.run import SearchRecipe

    recipe = SearchRecipe(data={"name": "digits", "val_fraction": 0.5}, search={"channels": 8})
    assert recipe.data == DataConfig(name="digits", val_fraction=0.5) and recipe.search == PRDartsConfig(channels=8)
    assert GatorConfig(target=0.5, latency={"repeats": 7}).latency == LatencyConfig(repeats=7)
    for key, value in (("data", "digits"), ("data", None), ("search", None), ("evaluate", 3)):
        with pytest.raises(ConfigError, match=rf"^{key}={value!r} must be a mapping of \w+ fields"):
            SearchRecipe.from_dict({"data": {"name": "digits"}, key: value})
    with pytest.raises(ConfigError, match=r"^latency='cpu' must be a mapping of LatencyConfig fields"):
        GatorConfig(target=0.5, latency="cpu")
