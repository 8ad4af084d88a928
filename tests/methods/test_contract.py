"""What every registered method promises, checked on each of them.

One typed config that survives a JSON round trip and names unknown keys; `prune_` on a small
model returning a PruneResult whose costs are the model's real costs; a plan that, saved with the
weights and loaded into a freshly built model, gives the pruned model's outputs exactly; and a
model left untouched when the config does not fit it. A method registered without an entry in
EXAMPLES fails here, so new methods join the contract.
"""
import copy
import json

import pytest
import torch

from prunekit.core.errors import ConfigError, PrunekitError
from prunekit.cost.macs import count_cost
from prunekit.engine.train import TrainConfig
from prunekit.methods import METHODS, get_config_class, prune_
from prunekit.methods.gator import GatorConfig
from prunekit.methods.hydra import HydraConfig
from prunekit.layers.sparse import count_nonzeros
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.result import PruneResult
from prunekit.methods.slr import SLRConfig
from prunekit.methods.pai import GraSPConfig, RandomInitConfig, SNIPConfig, SynFlowConfig
from prunekit.methods.ssc import SSCConfig
from prunekit.models import create_model
from prunekit.surgery.persist import load_pruned, save_pruned
from prunekit.surgery.verify import run_model


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


TRAIN = {"train_loader": _data(), "train_config": TrainConfig(epochs=1, lr=0.05)}
EXAMPLES = {  # method -> (a config that prunes channels, the keyword arguments it needs)
    "magnitude": (MagnitudeConfig(channel_ratio=0.5), {}),
    "gator": (GatorConfig(target=0.6, epochs=2, probe=False), {**TRAIN, "device": "cpu"}),
    "slr": (SLRConfig(sparsity_type="filter", sparsity=0.5, epochs=1), TRAIN),
    "hydra": (HydraConfig(density=0.3, epochs=1), TRAIN),
    "ssc": (SSCConfig(groups=2, spatial_period=4), {}),
    "snip": (SNIPConfig(sparsity=0.5, level="channel"), {"batches": _data(2)}),
    "grasp": (GraSPConfig(sparsity=0.5, level="channel", scope="layer"), {"batches": _data(2)}),
    "synflow": (SynFlowConfig(sparsity=0.5, level="channel"), {}),
    "random_init": (RandomInitConfig(sparsity=0.5, level="channel"), {}),
}
WEIGHT_SPARSE = {"hydra"}  # methods that mask weights instead of removing channels
BAD = {  # method -> a config whose layer list names nothing in the model
    "magnitude": MagnitudeConfig(channel_ratio=0.5, ignore=["no.such.layer"]),
    "gator": GatorConfig(target=0.6, epochs=1, ignore=["no.such.layer"]),
    "slr": SLRConfig(sparsity=0.5, epochs=1, layers=["no.such.layer"]),
    "hydra": HydraConfig(density=0.5, epochs=1, ignore=["no.such.layer"]),
    "ssc": SSCConfig(ignore=["no.such.layer"]),
    "snip": SNIPConfig(ignore=["no.such.layer"]),
    "grasp": GraSPConfig(ignore=["no.such.layer"]),
    "synflow": SynFlowConfig(ignore=["no.such.layer"]),
    "random_init": RandomInitConfig(ignore=["no.such.layer"]),
}


def _model():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10).eval()


X = torch.randn(2, 1, 8, 8)


def test_every_method_has_an_example():
    assert set(METHODS.list()) == set(EXAMPLES) == set(BAD)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_config_round_trips_and_names_unknown_keys(name):
    config, _ = EXAMPLES[name]
    cls = get_config_class(name)
    assert type(config) is cls
    data = json.loads(json.dumps(config.to_dict()))
    assert cls.from_dict(data) == config
    with pytest.raises(ConfigError, match="bogus"):
        cls.from_dict({**data, "bogus": 1})


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_prune_result_costs_and_reload(name, tmp_path):
    config, kwargs = EXAMPLES[name]
    model = _model()
    before = count_cost(model, X)
    result = prune_(model, config, X, **kwargs)
    model.eval()
    assert isinstance(result, PruneResult)
    after = count_cost(model, X)
    assert (result.cost_before.params, result.cost_before.macs) == (before.params, before.macs)
    assert (result.cost_after.params, result.cost_after.macs) == (after.params, after.macs)
    if name in WEIGHT_SPARSE:  # same dense shapes, fewer nonzero weights
        nz = count_nonzeros(model)
        assert nz["nonzero"] < nz["total"] and (after.macs, after.params) == (before.macs, before.params)
    else:
        assert after.macs < before.macs and after.params < before.params
    assert run_model(model, X).shape == (2, 10)
    path = save_pruned(model, result.plan, tmp_path / f"{name}.safetensors")
    fresh = _model()
    again = load_pruned(fresh, path).eval()
    torch.testing.assert_close(run_model(again, X), run_model(model, X), atol=0, rtol=0)
    assert count_cost(fresh, X).params == before.params  # the freshly built model itself is untouched


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_leaves_the_model_unchanged(name):
    model = _model()
    state = copy.deepcopy(model.state_dict())
    kwargs = EXAMPLES[name][1]
    with pytest.raises(PrunekitError, match="no.such.layer"):
        prune_(model, BAD[name], X, **kwargs)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_module_comes_back_in_the_mode_it_was_given(name):
    """Methods that train (or convert layers) hand the model back in the caller's modes: an eval
    model stays in eval, a training model keeps the BatchNorm its user froze in eval."""
    config, kwargs = EXAMPLES[name]
    for frozen_bn in (False, True):
        model = _model()
        if frozen_bn:
            model.train()
            model.bn1.eval()
        want = {n: m.training for n, m in model.named_modules()}
        prune_(model, config, X, **kwargs)
        assert {n: m.training for n, m in model.named_modules() if n in want} == want
