"""Passing something that is not an nn.Module (a model's name, None, a path) where prunekit takes
a model is one ConfigError saying so, from every entry point, not an AttributeError from inside."""
import pytest
import torch

import prunekit
from prunekit.core.errors import ConfigError

X = torch.randn(1, 3, 8, 8)
CALLS = {
    "prune_": lambda m, tmp: prunekit.prune_(m, prunekit.SNIPConfig(sparsity=0.5), X),
    "prepare_pruning": lambda m, tmp: prunekit.prepare_pruning(m, X),
    "build_graph": lambda m, tmp: prunekit.build_graph(m, X),
    "count_cost": lambda m, tmp: prunekit.count_cost(m, X),
    "load_pruned": lambda m, tmp: prunekit.load_pruned(m, tmp / "f.safetensors"),
    "export_model": lambda m, tmp: prunekit.export_model(m, X, tmp / "m.ts"),
    "evaluate": lambda m, tmp: prunekit.evaluate(m, [(X, torch.zeros(1, dtype=torch.long))]),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("given, needle", [("resnet20", "got str; build it first, e.g. prunekit.models.create_model"),
                                           (None, "got NoneType")])
def test_an_entry_point_given_no_module_says_so(call, given, needle, tmp_path):
    with pytest.raises(ConfigError, match=f"^model must be a torch.nn.Module, {needle}"):
        CALLS[call](given, tmp_path)
    assert list(tmp_path.iterdir()) == []
