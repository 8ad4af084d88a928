"""The shipped compare recipes load on top of the protocol, with budgets and targets that agree."""
from __future__ import annotations

from pathlib import Path

import pytest

from prunekit.cli.overrides import apply_overrides, load_yaml_file
from prunekit.compare import CompareRecipe
from prunekit.compare.recipe import TOP_KEYS
from prunekit.protocol import PROTOCOL

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("compare_*.yaml"))


def test_there_are_protocol_recipes():
    assert {p.stem for p in RECIPES} >= {"compare_gator_resnet20", "compare_slr_resnet20"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_on_the_protocol(path):
    r = CompareRecipe.from_dict(load_yaml_file(path), str(path))
    assert r.model_name == PROTOCOL.model and r.seeds == list(PROTOCOL.seeds)
    assert r.finetune.epochs == PROTOCOL.budget_epochs and r.data.batch_size == PROTOCOL.batch_size
    assert r.dense_weights == PROTOCOL.dense_path and r.dense_train.epochs == PROTOCOL.dense_epochs
    assert r.dense_train.schedule == "onecycle" and r.dense_train.label_smoothing == PROTOCOL.label_smoothing
    assert "dense" in r.arms and r.arms["dense"].method is None
    for arm in r.arms.values():
        assert 0 <= arm.budget_left(r.finetune.epochs) <= PROTOCOL.budget_epochs
        fraction = getattr(arm.config, "macs_fraction", None) or getattr(arm.config, "target", None)
        if getattr(arm.config, "latency_fraction", None) is not None:
            continue  # aimed at a latency instead, compared at equal latency (see the recipe)
        if r.target is not None and arm.method is not None:
            assert fraction == r.target.fraction  # every other structured arm asks for the same MACs


def test_overrides_merge_over_the_protocol():
    path = next(p for p in RECIPES if p.stem == "compare_gator_resnet20")
    raw = apply_overrides(load_yaml_file(path), ["data.limit_train=64", "arms.gator_macs.method.epochs=1",
                                                 "seeds=[1]"], TOP_KEYS)
    r = CompareRecipe.from_dict(raw)
    assert r.data.limit_train == 64 and r.data.root == PROTOCOL.data_root  # merged, not replaced
    assert r.arms["gator_macs"].trained_epochs == 1 and r.arms["gator_macs"].budget_left(15) == 14
    assert r.seeds == [1]
