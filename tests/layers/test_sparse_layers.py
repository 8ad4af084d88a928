"""Sparse score-masked layers: straight-through gradient, exact per-layer density, scaled score
init, hardening into persistent masks, and HYDRA pruning through `prune_` with nonzeros counted."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.errors import ConfigError, PruningError
from prunekit.engine.train import TrainConfig
from prunekit.layers.sparse import (SparseConv2d, SparseLinear, count_nonzeros, harden_, keep_count,
                                    scaled_scores, sparsify_, topk_mask)
from prunekit.methods import prune_
from prunekit.methods.hydra import HydraConfig
from prunekit.surgery.masks import get_mask
from prunekit.surgery.persist import load_pruned, save_pruned


def test_topk_mask_matches_numpy_with_ties_by_index():
    mag = torch.tensor([0.5, 2.0, 0.5, 0.5, 0.1, 2.0])
    # numpy oracle: stable sort of -mag keeps the lower index first among equal values
    order = np.argsort(-mag.numpy(), kind="stable")
    for k in range(1, 7):
        expect = np.zeros(6)
        expect[order[:k]] = 1
        assert topk_mask(mag, k).tolist() == expect.tolist()


@pytest.mark.parametrize("density", [0.013, 0.1, 0.5, 0.77, 1.0])
def test_per_layer_density_is_exact(density):
    torch.manual_seed(0)
    conv = SparseConv2d(6, 10, 3, density=density)
    lin = SparseLinear(33, 7, density=density)
    for layer in (conv, lin):
        n = layer.weight.numel()
        expect = max(1, math.floor(density * n + 0.5))
        assert int(layer.mask().sum()) == expect == layer.num_kept
        assert int((layer.effective_weight() != 0).sum()) == expect  # weights are nonzero a.s.


def test_straight_through_gradient():
    torch.manual_seed(0)
    layer = SparseLinear(5, 3, bias=False, density=0.4)
    layer.weight.requires_grad_(True)
    x = torch.randn(4, 5)
    up = torch.randn(4, 3)
    (layer(x) * up).sum().backward()
    mask = topk_mask(layer.scores.abs(), layer.num_kept)
    g_eff = up.t() @ x  # dL/dW_eff for y = x W_eff^T, shape (3, 5)
    # STE: dL/dm = dL/dW_eff * W passes through the top-k to |s|, then d|s|/ds = sign(s)
    torch.testing.assert_close(layer.scores.grad, g_eff * layer.weight.detach() * layer.scores.detach().sign())
    torch.testing.assert_close(layer.weight.grad, g_eff * mask)


def test_frozen_weights_get_no_gradient_and_conv_equals_masked_conv():
    torch.manual_seed(0)
    conv = SparseConv2d(3, 4, 3, padding=1, density=0.3, freeze_weights=True)
    x = torch.randn(2, 3, 6, 6)
    out = conv(x)
    ref = nn.functional.conv2d(x, conv.weight * topk_mask(conv.scores.abs(), conv.num_kept), conv.bias, padding=1)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert conv.weight.grad is None and conv.bias.grad is None and conv.scores.grad is not None


def test_scaled_score_init():
    torch.manual_seed(0)
    conv = SparseConv2d(4, 8, 3, density=0.5)
    conv.reset_scores("scaled")
    w = conv.weight.detach()
    expect = math.sqrt(6.0 / (4 * 9)) * w / w.abs().max()
    torch.testing.assert_close(conv.scores.detach(), expect)
    # scaled scores rank like |w|: the first mask is the magnitude mask
    assert torch.equal(conv.mask(), topk_mask(w.abs(), conv.num_kept))
    assert torch.equal(scaled_scores(w), expect)


def test_keep_count_rejects_bad_density():
    with pytest.raises(ConfigError, match="density"):
        keep_count(10, 0.0)
    with pytest.raises(ConfigError, match="density"):
        SparseLinear(2, 2, density=1.5)


def test_sparsify_and_harden_keep_function_and_count_nonzeros():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    x = torch.randn(2, 2, 6, 6)
    w0 = net[0].weight
    assert sparsify_(net, 0.25) == ["0", "3"]
    assert net[0].weight is w0 and isinstance(net[3], SparseLinear)
    sparse_out = net(x)
    kept = keep_count(6 * 2 * 9, 0.25) + keep_count(6 * 16 * 3, 0.25)
    assert count_nonzeros(net) == {"nonzero": kept, "total": 108 + 288}
    harden_(net)
    assert type(net[0]).__name__ == "ParametrizedConv2d" and get_mask(net[0], "weight") is not None
    torch.testing.assert_close(net(x), sparse_out)
    assert count_nonzeros(net)["nonzero"] == kept


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]


def test_hydra_prune_trains_scores_only_and_reloads(tmp_path):
    model = _model()
    w_before = model[0].weight.detach().clone()
    x = torch.randn(2, 1, 8, 8)
    r = prune_(model, HydraConfig(density=0.1, epochs=2, lr=0.5), x, train_loader=_data(),
               train_config=TrainConfig(epochs=1, lr=0.1, weight_decay=0.0))
    expect = keep_count(72, 0.1) + keep_count(2880, 0.1)
    assert r.metrics["nonzero"] == count_nonzeros(model)["nonzero"] == expect
    # weights stored under the mask are the trained network's, untouched by score training
    assert torch.equal(model[0].parametrizations.weight.original.detach(), w_before)
    # learned masks differ from the magnitude mask they started from
    assert not torch.equal(get_mask(model[4], "weight"), topk_mask(model[4].parametrizations.weight.original.abs(),
                                                                   keep_count(2880, 0.1)).bool())
    path = save_pruned(model, r.plan, tmp_path / "h.safetensors")
    again = load_pruned(_model(), path).eval()
    model.eval()
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert count_nonzeros(again)["nonzero"] == expect


def test_hydra_masks_the_callers_own_layers_and_keeps_their_hooks():
    model = _model()
    conv, fc = model[0], model[4]
    calls = []
    conv.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    fc.register_forward_hook(lambda mod, args, out: calls.append("fwd"))
    x = torch.randn(2, 1, 8, 8)
    prune_(model, HydraConfig(density=0.1, epochs=1), x, train_loader=_data(), train_config=TrainConfig(epochs=1))
    assert model[0] is conv and model[4] is fc  # references the caller holds see the masks
    assert get_mask(conv, "weight") is not None and get_mask(fc, "weight") is not None
    calls.clear()
    model.eval()(x)
    assert calls == ["pre", "fwd"]


def test_hydra_bad_ignore_names_layer():
    with pytest.raises(ConfigError, match="no.such"):
        prune_(_model(), HydraConfig(density=0.5, epochs=0, ignore=["no.such"]), torch.randn(1, 1, 8, 8))


def test_unknown_score_init_is_refused_and_the_model_stays_plain():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="score_init='magnitude'"):
        sparsify_(net, 0.5, score_init="magnitude")
    assert [type(m) for m in net] == [nn.Linear, nn.Linear]
    with pytest.raises(ConfigError, match="score_init"):
        SparseLinear(4, 4, density=0.5).reset_scores("Scaled")



class _TiedHead(nn.Module):
    """An output layer tied to its embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class _TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("make, example, named", [
    (_TiedHead, torch.randint(0, 10, (2, 3)), "emb.weight"),
    (_TiedPair, torch.randn(2, 6), "a.weight"),
])
def test_hydra_refuses_a_weight_tied_to_another_module_and_leaves_the_model_as_it_was(make, example, named):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=rf"{named}.*tied weights.*ignore="):
        prune_(model, HydraConfig(density=0.5, epochs=0), example)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hydra_masks_a_layer_held_under_two_names_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = self.a  # the same layer, reached under a second name
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = Twice()
    prune_(model, HydraConfig(density=0.5, epochs=0), torch.randn(2, 6))
    assert model.a is model.b
    assert int((model.b.weight == 0).sum()) == 18


def test_hydra_refuses_layers_that_already_carry_masks():
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    model = _model()
    apply_mask(model[0], "weight", unstructured_mask(model[0].weight, 0.5))
    with pytest.raises(ConfigError, match=r"'0'.*already.*bake_masks_.*ignore=\['0'\]"):
        prune_(model, HydraConfig(density=0.3, epochs=0), torch.randn(1, 1, 8, 8))
    assert get_mask(model[4], "weight") is None and int((~get_mask(model[0], "weight")).sum()) == 36
    r = prune_(model, HydraConfig(density=0.3, epochs=0, ignore=["0"]), torch.randn(1, 1, 8, 8))
    assert int((~get_mask(model[0], "weight")).sum()) == 36  # the ignored layer keeps its own mask
    assert r.metrics["nonzero"] == 36 + keep_count(2880, 0.3)
