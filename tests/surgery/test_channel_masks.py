"""Channel masks: masked model == physically pruned model; one call converts masks to removal."""
import copy

import pytest
import torch
from torch import nn

from prunekit.core.errors import PruningError
from prunekit.graph import build_graph
from prunekit.surgery.channel_masks import channel_masks, mask_channels_, masks_to_removal_
from prunekit.surgery.masks import apply_mask, masked_modules
from prunekit.surgery.plan import apply_plan_
from prunekit.surgery.shrink import remove_channels_
from prunekit.surgery.verify import group_is_exact, run_model
from prunekit.testing.checks import random_removal, randomise_norms_
from prunekit.testing.toy_models import TOY_MODELS


def _keep_vectors(graph, removal):
    keep = {}
    for name, idx in removal.items():
        vec = torch.ones(graph.group(name).size, dtype=torch.bool)
        vec[idx] = False
        keep[name] = vec
    return keep


def _exact(graph, model, removal):
    return all(group_is_exact(graph.group(n), model) for n in removal)


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_masked_equals_shrunk_equals_converted(name):
    build, make_input = TOY_MODELS[name]
    torch.manual_seed(3)
    model = randomise_norms_(build().eval())
    x = make_input()
    graph = build_graph(model, x)
    removal = random_removal(graph, 0.5, torch.Generator().manual_seed(3))
    assert removal, f"{name}: nothing to remove"
    shrunk = copy.deepcopy(model)
    remove_channels_(shrunk, graph, removal)
    masked = copy.deepcopy(model)
    mask_channels_(masked, graph, _keep_vectors(graph, removal))
    with torch.no_grad():
        out_masked, out_shrunk = run_model(masked, x), run_model(shrunk, x)
    if _exact(graph, model, removal):
        torch.testing.assert_close(out_masked, out_shrunk, atol=1e-5, rtol=1e-4)
    assert {n: sorted((~v).nonzero().flatten().tolist()) for n, v in channel_masks(masked, graph).items()} == removal
    plan = masks_to_removal_(masked, graph, x)
    assert not masked_modules(masked), "masks must be gone after conversion"
    shapes = {k: v.shape for k, v in shrunk.named_parameters()}
    assert {k: v.shape for k, v in masked.named_parameters()} == shapes
    with torch.no_grad():
        torch.testing.assert_close(run_model(masked, x), out_shrunk, atol=1e-5, rtol=1e-4)
    # the plan replays on a fresh copy of the original
    fresh = apply_plan_(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(run_model(fresh, x), out_shrunk, atol=1e-6, rtol=1e-5)


def test_masks_of_two_groups_on_one_tensor_intersect():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    g = build_graph(m, x)
    k0 = torch.ones(8, dtype=torch.bool)
    k0[[0, 7]] = False
    k2 = torch.ones(6, dtype=torch.bool)
    k2[2] = False
    mask_channels_(m, g, {"0": k0})
    mask_channels_(m, g, {"2": k2})
    assert set(channel_masks(m, g)) == {"0", "2"}
    with torch.no_grad():
        ref = m(x)
    masks_to_removal_(m, g, x)
    assert (m[0].out_channels, m[2].in_channels, m[2].out_channels, m[4].in_channels) == (6, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-5)


def test_a_broadcast_shaped_mask_already_on_the_weight_is_intersected_not_dropped():
    """A per-filter mask (O, 1, 1, 1), as `channel_mask` makes, stays when channels of another group
    are masked on the same weight: the hidden filters must not come back."""
    from prunekit.surgery.masks import channel_mask
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    g = build_graph(m, torch.randn(1, 3, 8, 8))
    apply_mask(m[2], "weight", channel_mask(m[2].weight.shape, [0, 2], dim=0))
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 5]] = False
    mask_channels_(m, g, {"0": keep})
    w = m[2].weight.detach()
    assert [bool((w[i] == 0).all()) for i in range(4)] == [False, True, False, True]
    assert bool((w[:, [1, 5]] == 0).all()) and int((w != 0).sum()) == 2 * 6


def test_existing_unstructured_mask_is_kept_and_baked():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    g = build_graph(m, x)
    w_mask = torch.ones_like(m[2].weight, dtype=torch.bool)
    w_mask[0, 3] = False
    apply_mask(m[2], "weight", w_mask)
    keep = torch.tensor([True, False, True, True])
    mask_channels_(m, g, {"0": keep})
    ref = m(x)
    masks_to_removal_(m, g, x)
    assert m[2].weight.shape == (2, 3, 1, 1) and float(m[2].weight.detach()[0, 2]) == 0.0
    torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(8, dtype=torch.bool), "empty it"),
    (torch.ones(7, dtype=torch.bool), "shape"),
    (torch.ones(8), "bool"),
])
def test_invalid_masks_leave_model_unchanged(bad, message):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    g = build_graph(m, torch.randn(1, 3, 8, 8))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(PruningError, match=message):
        mask_channels_(m, g, {"0": bad})
    assert not masked_modules(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_fixed_channels_cannot_be_masked():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    g = build_graph(m, torch.randn(1, 3, 8, 8))
    keep = torch.ones(4, dtype=torch.bool)
    keep[0] = False
    with pytest.raises(PruningError, match="fixed"):
        mask_channels_(m, g, {"2": keep})  # the output channels reach the model output
