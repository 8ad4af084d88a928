"""Masks as parametrizations: forward, gradients, baking, replacement, composition, builders."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.errors import ConfigError, PruningError
from prunekit.surgery.masks import (
    Mask,
    apply_mask,
    channel_mask,
    get_mask,
    masked_modules,
    nm_mask,
    prune_count,
    remove_masks,
    sparsity_report,
    unstructured_mask,
)


def _random_mask(shape, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


class Doubler(nn.Module):  # a foreign parametrization to compose with
    def forward(self, w):
        return 2 * w


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return nn.Conv2d(3, 5, 3, padding=1)


def test_masked_forward_equals_forward_with_zeroed_weights(conv):
    x = torch.randn(2, 3, 6, 6)
    mask = _random_mask(conv.weight.shape)
    expected = F.conv2d(x, conv.weight.detach() * mask, conv.bias.detach(), padding=1)
    apply_mask(conv, "weight", mask)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    assert torch.equal(get_mask(conv, "weight"), mask)


def test_gradients_of_masked_entries_are_zero(conv):
    x = torch.randn(2, 3, 6, 6)
    mask = _random_mask(conv.weight.shape, seed=1)
    # Oracle: gradient of the same loss w.r.t. a plain weight W*mask, times mask (chain rule).
    w_eff = (conv.weight.detach() * mask).requires_grad_(True)
    F.conv2d(x, w_eff, conv.bias.detach(), padding=1).square().sum().backward()
    apply_mask(conv, "weight", mask)
    conv(x).square().sum().backward()
    grad = conv.parametrizations.weight.original.grad
    assert torch.all(grad[~mask] == 0)
    assert torch.allclose(grad, w_eff.grad * mask, atol=1e-5)


def test_sgd_step_with_fresh_optimizer_keeps_masked_weights_zero(conv):
    mask = _random_mask(conv.weight.shape, seed=2)
    apply_mask(conv, "weight", mask)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        conv(torch.randn(2, 3, 6, 6)).sum().backward()
        opt.step()
    assert torch.all(conv.weight.detach()[~mask] == 0)


def test_remove_masks_bake_gives_plain_parameters_with_zeros(conv):
    param_before = conv.weight
    mask = _random_mask(conv.weight.shape, seed=3)
    expected = conv.weight.detach() * mask
    apply_mask(conv, "weight", mask)
    assert remove_masks(conv, bake=True) == 1
    assert type(conv.weight) is nn.Parameter and conv.weight is param_before  # optimizers stay valid
    assert not parametrize.is_parametrized(conv)
    assert torch.equal(conv.weight.detach(), expected)
    assert "weight" in dict(conv.named_parameters())


def test_remove_masks_without_bake_restores_values(conv):
    original = conv.weight.detach().clone()
    apply_mask(conv, "weight", _random_mask(conv.weight.shape))
    remove_masks(conv, bake=False)
    assert torch.equal(conv.weight.detach(), original)


def test_apply_mask_replaces_our_mask_instead_of_stacking(conv):
    original = conv.weight.detach().clone()
    first, second = _random_mask(conv.weight.shape, seed=4), _random_mask(conv.weight.shape, seed=5)
    apply_mask(conv, "weight", first)
    apply_mask(conv, "weight", second)
    assert len(conv.parametrizations.weight) == 1
    assert torch.equal(conv.weight.detach(), original * second)


def test_mask_composes_after_a_foreign_parametrization(conv):
    original = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", Doubler())
    mask = _random_mask(conv.weight.shape, seed=6)
    apply_mask(conv, "weight", mask)
    assert torch.equal(conv.weight.detach(), 2 * original * mask)
    with pytest.raises(PruningError, match="follows"):
        remove_masks(conv, bake=True)
    assert len(conv.parametrizations.weight) == 2  # untouched by the failed call
    remove_masks(conv, bake=False)
    assert [type(p) for p in conv.parametrizations.weight] == [Doubler]
    assert torch.equal(conv.weight.detach(), 2 * original)


def test_mask_first_then_foreign_parametrization_bakes(conv):
    original = conv.weight.detach().clone()
    mask = _random_mask(conv.weight.shape, seed=7)
    apply_mask(conv, "weight", mask)
    parametrize.register_parametrization(conv, "weight", Doubler())
    remove_masks(conv, bake=True)
    assert [type(p) for p in conv.parametrizations.weight] == [Doubler]
    assert torch.equal(conv.weight.detach(), 2 * original * mask)


def test_broadcast_channel_mask_and_bad_masks_leave_module_untouched(conv):
    keep = channel_mask(conv.weight.shape, [0, 3])
    assert keep.shape == (5, 1, 1, 1)
    apply_mask(conv, "weight", keep)
    w = conv.weight.detach()
    assert torch.all(w[[1, 2, 4]] == 0) and torch.all(w[[0, 3]] != 0)
    fresh = nn.Linear(4, 3)
    with pytest.raises(PruningError, match="broadcast"):
        apply_mask(fresh, "weight", torch.ones(4, 3))
    with pytest.raises(PruningError, match="0 or 1"):
        apply_mask(fresh, "weight", torch.full((3, 4), 0.5))
    with pytest.raises(PruningError, match="no tensor"):
        apply_mask(fresh, "kernel", torch.ones(3, 4))
    assert not parametrize.is_parametrized(fresh)


def test_masked_modules_report_and_deepcopy():
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        net[2].weight[0, 0] = 0.0  # a natural zero the mask keeps
    m0 = torch.ones(6, 8, dtype=torch.bool)
    m0[:, :2] = False  # 12 masked
    m2 = torch.ones(4, 6, dtype=torch.bool)
    m2[1] = False  # 6 masked
    apply_mask(net[0], "weight", m0)
    apply_mask(net[2], "weight", m2)
    assert [(n, p) for n, _, p in masked_modules(net)] == [("0", "weight"), ("2", "weight")]
    report = sparsity_report(net)
    assert report["0.weight"] == {"numel": 48, "masked": 12, "zeros": 12, "sparsity": 12 / 48}
    assert report["2.weight"] == {"numel": 24, "masked": 6, "zeros": 7, "sparsity": 7 / 24}
    twin = copy.deepcopy(net)
    x = torch.randn(3, 8)
    assert torch.equal(twin(x), net(x))
    assert torch.equal(get_mask(twin[0], "weight"), m0)


def test_prune_count_rounds_half_up_and_refuses_to_empty():
    assert [prune_count(10, s) for s in (0.0, 0.25, 0.7, 0.94)] == [0, 3, 7, 9]
    assert prune_count(3, 0.5) == 2 and prune_count(5, 0.5) == 3
    with pytest.raises(PruningError, match="keeps none"):
        prune_count(10, 0.95)
    with pytest.raises(ConfigError):
        prune_count(10, 1.5)


def test_prune_count_error_names_a_bound_that_the_sparsity_must_stay_below():
    """0.95 of 10 weights rounds up to all 10: the message must not offer 0.95 itself; the
    sparsity it names keeps one."""
    for total, bound, named in ((10, 0.95, "0.9499"), (1, 0.5, "0.4999"), (4, 0.875, "0.8749")):
        with pytest.raises(PruningError, match=f"at most {named} \\(it keeps one"):
            prune_count(total, bound)
        assert prune_count(total, float(named)) == total - 1


@pytest.mark.parametrize("shape", [(7,), (5, 13), (4, 3, 3, 3)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_mask_exact_count_keeps_largest(shape, sparsity):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(w, sparsity)
    numel = w.numel()
    k = int(np.floor(sparsity * numel + 0.5))
    assert mask.shape == w.shape and int((~mask).sum()) == k
    # Oracle: numpy's sort of |w|; the kept set is exactly the numel-k largest.
    order = np.argsort(-np.abs(w.numpy()).ravel(), kind="stable")
    expected = np.zeros(numel, bool)
    expected[order[: numel - k]] = True
    assert np.array_equal(mask.numpy().ravel(), expected)


def test_unstructured_mask_ties_keep_lower_indices():
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, 1.0])
    assert unstructured_mask(w, 0.5).tolist() == [True, True, True, False, False, False]
    with pytest.raises(PruningError, match="NaN"):
        unstructured_mask(torch.tensor([1.0, float("nan")]), 0.5)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_every_block_keeps_its_n_largest(n, m):
    w = torch.randn(6, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(w, n, m, dim=1)
    blocks_w = w.movedim(1, -1).reshape(-1, m).abs()  # runs of m input channels
    blocks_m = mask.movedim(1, -1).reshape(-1, m)
    assert torch.all(blocks_m.sum(dim=1) == n)
    kept_min = torch.where(blocks_m, blocks_w, torch.inf).min(dim=1).values
    pruned_max = torch.where(blocks_m, -torch.inf, blocks_w).max(dim=1).values
    assert torch.all(kept_min >= pruned_max)


def test_nm_mask_linear_ties_and_errors():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 3.0, -2.0, 1.0]])
    assert nm_mask(w).tolist() == [[True, True, False, False, False, True, True, False]]
    with pytest.raises(PruningError, match="not divisible by m=4"):
        nm_mask(torch.randn(4, 6))
    with pytest.raises(ConfigError):
        nm_mask(torch.randn(4, 8), n=5, m=4)


def test_channel_mask_shapes_and_errors():
    assert channel_mask((4, 3), [1]).tolist() == [[False], [True], [False], [False]]
    assert channel_mask((4, 3, 3, 3), [0, 2], dim=1).shape == (1, 3, 1, 1)
    with pytest.raises(PruningError, match="empty"):
        channel_mask((4, 3), [])
    with pytest.raises(PruningError, match="lie in"):
        channel_mask((4, 3), [4])
    with pytest.raises(PruningError, match="duplicates"):
        channel_mask((4, 3), [1, 1])


def test_mask_state_dict_round_trip():
    a, b = nn.Linear(5, 4), nn.Linear(5, 4)
    mask = _random_mask((4, 5), seed=8)
    apply_mask(a, "weight", mask)
    apply_mask(b, "weight", torch.ones(4, 5, dtype=torch.bool))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight, a.weight) and isinstance(b.parametrizations.weight[0], Mask)


def test_baking_a_deep_copy_leaves_the_original_masked():
    """A deep copy shares torch's generated parametrized class; baking the copy must not strip
    the original's `weight` property (the CLI times a baked copy of a masked model)."""
    import copy as _copy

    from prunekit.surgery.masks import bake_masks_

    lin = nn.Linear(4, 3)
    apply_mask(lin, "weight", unstructured_mask(lin.weight, 0.5))
    twin = bake_masks_(_copy.deepcopy(lin))
    assert type(twin) is nn.Linear
    assert lin.weight.shape == (3, 4) and int((lin.weight == 0).sum()) == 6
    torch.testing.assert_close(twin.weight, lin.weight.detach())


def test_baking_a_mask_on_a_shared_weight_keeps_every_holders_output():
    """A masked weight that other layers also hold is baked into a copy: the others keep their
    values (baking in place wrote the mask's zeros into the shared tensor)."""
    from prunekit.surgery.masks import bake_masks_

    torch.manual_seed(0)
    emb, head = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model, a, b = nn.ModuleDict({"emb": emb, "head": head}), nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model.update({"a": a, "b": b})
    apply_mask(head, "weight", _random_mask((6, 4), seed=1))
    apply_mask(a, "weight", _random_mask((4, 4), seed=2))
    apply_mask(b, "weight", _random_mask((4, 4), seed=3))
    want = {n: getattr(model[n], "weight").detach().clone() for n in ("emb", "head", "a", "b")}
    bake_masks_(model)
    assert masked_modules(model) == []
    for name, w in want.items():
        assert type(model[name].weight) is nn.Parameter and torch.equal(model[name].weight, w), name
