"""The caller's model after a method: untouched when the call fails at its last step, and the
parameters it had (which an optimizer may hold) still its parameters after a success."""
import warnings

import pytest
import torch

import prunekit
from prunekit.engine import TrainConfig
from test_pai import X, _net  # the same small CNN and input

BATCHES = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))) for _ in range(2)]


class _Boom(Exception):
    pass


def _checking(model) -> bool:
    """Whether this forward is the trace's look at the training-mode forward (training mode
    without autograd), whose failure only means there is no such forward to trace."""
    return model.training and not torch.is_grad_enabled()


def _forwards(config, kwargs):
    """How many forward passes of the whole model the method makes on a successful call."""
    model, count = _net(), [0]
    model.register_forward_hook(lambda mod, *_: None if _checking(mod) else count.__setitem__(0, count[0] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunekit.prune_(model, config, X, **kwargs)
    return count[0]


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [(n, p) for n, p in model.named_parameters()])


METHODS = {
    "snip": (prunekit.SNIPConfig(sparsity=0.5), {"batches": BATCHES}),
    "synflow": (prunekit.SynFlowConfig(sparsity=0.5, iterations=2), {}),
    "snip-channel": (prunekit.SNIPConfig(sparsity=0.5, level="channel"), {"batches": BATCHES}),
    "hydra": (prunekit.HydraConfig(density=0.5, epochs=1),
              {"train_loader": BATCHES, "train_config": TrainConfig(epochs=1, lr=0.01, log_every=0)}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_failure_in_the_last_forward_leaves_the_model_unchanged(method):
    """The method's last forward pass (counting the pruned model's cost) fails: the model is the
    one the caller gave, not a pruned model without a result."""
    config, kwargs = METHODS[method]
    last = _forwards(config, kwargs)
    model, count = _net(), [0]

    def fail_last(mod, *_):
        if _checking(mod):
            return
        count[0] += 1
        if count[0] == last:
            raise _Boom

    model.register_forward_hook(fail_last)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(_Boom):
            prunekit.prune_(model, config, X, **kwargs)
    sd, classes, params = _state(model)
    assert classes == before[1]
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert all(p is q for (_, p), (_, q) in zip(params, before[2]))


KEEPING = {
    "hydra": (prunekit.HydraConfig(density=0.5, epochs=1),
              {"train_loader": BATCHES, "train_config": TrainConfig(epochs=1, lr=0.01, log_every=0)}),
    "magnitude-taylor": (prunekit.MagnitudeConfig(channel_ratio=0.5, criterion="taylor", round_to=None, ignore=["3"]),
                         {"batches": BATCHES}),
    "magnitude-steps": (prunekit.MagnitudeConfig(channel_ratio=0.5, steps=2, round_to=None, ignore=["3"]),
                        {"between_steps": lambda model, step: None}),
}


@pytest.mark.parametrize("method", sorted(KEEPING))
def test_parameters_of_unchanged_shape_stay_the_callers_objects(method):
    """A method that works on a deep copy (it trains, or scores with gradients) hands back the
    caller's parameter objects wherever their shape did not change, holding the result's values:
    an optimizer built on the model before the call still steps the model."""
    config, kwargs = KEEPING[method]
    model = _net()
    held = {n: p for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunekit.prune_(model, config, X, **kwargs)
    now = {n.replace(".parametrizations.weight.original", ".weight"): p for n, p in model.named_parameters()}
    kept = [n for n in held if now[n].shape == held[n].shape]
    assert "3.bias" in kept and "7.bias" in kept
    assert [n for n in kept if now[n] is not held[n]] == []
    out = model(X).sum()
    out.backward()
    before = model[7].bias.detach().clone()
    optimizer.step()
    assert not torch.equal(model[7].bias, before)
