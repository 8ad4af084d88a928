"""Recipe loading and overrides, without running anything."""
from __future__ import annotations

from pathlib import Path

import pytest

from prunekit.cli.overrides import apply_overrides, load_yaml_text, parse_override
from prunekit.cli.recipe import Recipe, load_recipe, split_arguments
from prunekit.core.errors import ConfigError
from prunekit.engine import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_override_values_are_typed_as_yaml():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 0.001)
    assert parse_override("method.ignore=[fc, conv1]") == (["method", "ignore"], ["fc", "conv1"])
    assert parse_override("train=null") == (["train"], None)
    assert parse_override("data.root=/data/x=y") == (["data", "root"], "/data/x=y")
    assert parse_override("name=v1.0") == (["name"], "v1.0")


def test_yaml_reads_exponent_floats_and_keeps_strings():
    assert load_yaml_text("a: 5e-4\nb: 1E3\nc: 1.5\nd: 3\ne: abc\nf: .inf", "t") == {
        "a": 0.0005, "b": 1000.0, "c": 1.5, "d": 3, "e": "abc", "f": float("inf")}


@pytest.mark.parametrize("text, override, fragment", [
    ("1: a", "train={1: a}", "the key 1 is not a name"),
    ("null: 1", "eval={null: 1}", "the key null is not a name"),
    ("train: {1: 2}", "train={lr: {1: 2}}", "the key 1 is not a name"),
    ("train:\n  lr: 0.1\n  lr: 0.2", "train={lr: 0.1, lr: 0.2}", "the key 'lr' is written twice"),
])
def test_recipe_keys_are_names_written_once(text, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_yaml_text(text, "r.yaml")
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides({}, [override])


def test_a_merged_key_may_be_overridden():
    assert load_yaml_text("base: &b {lr: 1}\ntrain:\n  <<: *b\n  lr: 2", "r")["train"] == {"lr": 2}
    nested = "defaults: {root: &r {lr: 0.1, epochs: 3}, base: &b {<<: *r, lr: 0.2}}\ntrain: {<<: *b, epochs: 5}"
    assert load_yaml_text(nested, "r")["train"] == {"lr": 0.2, "epochs": 5}  # a merge of a merge


def test_overrides_create_sections_and_reject_scalars():
    raw = {"train": None, "seed": 1}
    assert apply_overrides(raw, ["train.epochs=2"]) == {"train": {"epochs": 2}, "seed": 1}
    assert raw == {"train": None, "seed": 1}  # the input is not modified
    with pytest.raises(ConfigError, match="seed is 1, not a section"):
        apply_overrides(raw, ["seed.value=2"])


def test_split_arguments(tmp_path):
    assert split_arguments(["r.yaml", "a=1", "b.c=2"]) == ("r.yaml", ["a=1", "b.c=2"])
    assert split_arguments(["a=1"]) == (None, ["a=1"])
    run = tmp_path / "runs" / "lr=0.1-20250101-120000"
    run.mkdir(parents=True)
    assert split_arguments([str(run), "a=1"]) == (str(run), ["a=1"])  # a path, not an override
    assert split_arguments([f"{tmp_path}/b=2", "a=1"]) == (None, [f"{tmp_path}/b=2", "a=1"])  # no such path


def test_embedded_default_recipe_is_complete():
    recipe, run_dir = load_recipe()
    assert run_dir is None
    assert (recipe.model.name, recipe.data.name, recipe.method.name) == ("small_cnn", "digits", "magnitude")
    assert recipe.train is not None and recipe.finetune is not None and recipe.eval.split == "test"


@pytest.mark.parametrize("name, optimization", [("resnet56_cifar10_slr", "slr"), ("resnet56_cifar10_admm", "admm")])
def test_shipped_recipes_load(name, optimization):
    recipe, _ = load_recipe(str(REPO / "recipes" / f"{name}.yaml"))
    assert recipe.name == name
    assert recipe.method.name == "slr" and recipe.method.config.optimization == optimization
    assert recipe.method.label == optimization
    assert recipe.trainer_for_method.lr == 0.01 and recipe.train.lr == 0.1


def test_method_train_falls_back_to_train_then_defaults():
    base = {"model": {"name": "small_cnn"}, "data": {"name": "digits"}}
    assert Recipe.from_dict({**base, "train": {"epochs": 3}}).trainer_for_method.epochs == 3
    assert Recipe.from_dict(base).trainer_for_method == TrainConfig()


def test_resolved_recipe_round_trips():
    recipe, _ = load_recipe(None, ["method.macs_fraction=0.4", "train.epochs=2"])
    again = Recipe.from_dict(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert again.method.config.macs_fraction == 0.4


@pytest.mark.parametrize("text", ["1e3", "1.5e3", "1e-3", ".5e1", "1_0e3"])
def test_strings_that_read_as_floats_are_written_quoted(text):
    # recipe.yaml is read back by `prunekit run <dir>` and `prunekit resume`: a string stays a string
    recipe, _ = load_recipe(None, [f"name='{text}'", f"data.root='{text}'"])
    again = load_yaml_text(recipe.to_yaml(), "recipe.yaml")
    assert (again["name"], again["data"]["root"]) == (text, text)
    assert Recipe.from_dict(again).to_dict() == recipe.to_dict()


def test_method_fields_may_sit_under_config():
    base = {"model": {"name": "small_cnn"}, "data": {"name": "digits"}}
    flat = Recipe.from_dict({**base, "method": {"name": "magnitude", "channel_ratio": 0.3}})
    nested = Recipe.from_dict({**base, "method": {"name": "magnitude", "config": {"channel_ratio": 0.3}}})
    assert nested.method.to_dict() == flat.method.to_dict()
    with pytest.raises(ConfigError, match="channel_ratio given both"):
        Recipe.from_dict({**base, "method": {"name": "magnitude", "channel_ratio": 0.3,
                                             "config": {"channel_ratio": 0.4}}})


@pytest.mark.parametrize("override", ["seed=18446744073709551616", "threads=100000", "train.seed=18446744073709551616",
                                      "bench.threads=100000"])
def test_seeds_and_threads_torch_cannot_take_fail_when_the_recipe_is_read(override):
    with pytest.raises(ConfigError, match="too large .*use at most"):
        load_recipe(None, [override])


@pytest.mark.parametrize("value", ["2023-02-30", "!!int 3.5", "!!float abc", "!!bool maybe", "!!int", "!!timestamp x"])
def test_a_value_yaml_cannot_build_is_one_config_error(value):
    # a date that does not exist, or an explicit tag its value does not fit: not a traceback
    with pytest.raises(ConfigError, match="invalid YAML: a value cannot be read"):
        load_yaml_text(f"name: {value}", "r.yaml")
    with pytest.raises(ConfigError, match="override 'out=.*invalid YAML"):
        load_recipe(None, [f"out={value}"])


@pytest.mark.parametrize("key", ["out", "init"])
def test_a_path_with_a_nul_character_is_a_config_error(key):
    raw = load_yaml_text(f'model: {{name: small_cnn}}\ndata: {{name: digits}}\n{key}: "runs\\0x"\n', "r.yaml")
    with pytest.raises(ConfigError, match=f"r.yaml: {key}='runs\\\\x00x' holds a NUL character"):
        Recipe.from_dict(raw, "r.yaml")


def test_num_classes_given_as_a_model_kwarg_points_to_model_num_classes():
    raw = {"model": {"name": "resnet20", "kwargs": {"num_classes": 100}}, "data": {"name": "digits"}}
    with pytest.raises(ConfigError, match=r"kwargs\.num_classes: set model\.num_classes=100 instead") as err:
        Recipe.from_dict(raw)
    assert "does not take" not in str(err.value)


def test_a_bad_value_from_an_override_is_named_with_the_overrides():
    """It read 'default recipe: method: ...', as if the file held the value."""
    with pytest.raises(ConfigError, match=r"^default recipe with --method slr, method.sparsity_type=nm, "
                                          r"method.sparsity=0.5: method: "):
        load_recipe(None, ["method.sparsity_type=nm", "method.sparsity=0.5"], method="slr")
    with pytest.raises(ConfigError, match=r"^default recipe with train.epochs=-1: train: epochs=-1 is invalid"):
        load_recipe(None, ["train.epochs=-1"])
