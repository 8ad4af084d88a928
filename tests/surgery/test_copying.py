"""Working copies share tensors but never write into them; results land in the caller's objects."""
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.surgery.copying import adopt_, share_copy
from prunekit.surgery.verify import probe_groups, zero_channels_, zero_contributions_
from prunekit.testing.toy_models import TOY_MODELS


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def test_share_copy_owns_modules_and_containers_but_shares_tensors():
    shared = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.ReLU(), shared)
    work = share_copy(model)
    assert work[0] is not model[0] and work[0].weight is model[0].weight
    assert work[1] is work[3]  # a module used twice is copied once
    work[0].weight = nn.Parameter(torch.zeros(2, 3, 3, 3))
    work[0].out_channels = 2
    del work[2]
    assert model[0].weight.shape == (4, 3, 3, 3) and model[0].out_channels == 4 and len(model) == 4


def test_adopt_keeps_the_callers_objects_and_hooks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    first, untouched = model[0], model[2].bias
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    work = share_copy(model)
    work[0].weight = nn.Parameter(torch.zeros(4, 3, 1, 1))
    work[1] = nn.Identity()  # a replaced module is taken as it is
    adopt_(model, work)
    assert model[0] is first and first.weight.shape == (4, 3, 1, 1)
    assert isinstance(model[1], nn.Identity) and model[2].bias is untouched
    model[0](torch.randn(1, 3, 5, 5))
    assert calls == [1]


def test_zeroing_and_probing_never_write_into_the_models_tensors():
    build, inputs = TOY_MODELS["mobilenet"]
    model, x = build().eval(), inputs()
    graph = build_graph(model, x)
    snap = _snapshot(model)
    work = share_copy(model)
    for g in graph.prunable_groups():
        zero_contributions_(work, g, [0])
    probe_groups(model, x, graph)
    assert _same(model, snap)
    assert not _same(work, snap)


def test_prune_updates_the_callers_modules_in_place():
    build, inputs = TOY_MODELS["residual_projection"]
    model, x = build().eval(), inputs()
    before = dict(model.named_modules())
    prune_(model, MagnitudeConfig(channel_ratio=0.5), x)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[n] is m for n, m in before.items())
    convs = [m for m in before.values() if isinstance(m, nn.Conv2d)]
    assert sum(c.weight.numel() for c in convs) < sum(m.weight.numel() for m in build().modules() if isinstance(m, nn.Conv2d))
    for c in convs:  # references taken before pruning see the new widths, consistent with the tensors
        assert c.weight.shape[:2] == (c.out_channels, c.in_channels // c.groups)
    assert model(x).shape == build()(x).shape


def test_tensors_that_were_not_sliced_stay_the_same_objects():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    bias = model[2].bias
    prune_(model, MagnitudeConfig(channel_ratio=0.5), torch.randn(1, 3, 6, 6))
    assert model[2].weight.shape == (4, 4, 1, 1) and model[2].bias is bias


def test_zeroing_several_groups_at_once_equals_zeroing_them_one_by_one():
    build, inputs = TOY_MODELS["concat"]
    model, x = build().eval(), inputs()
    graph = build_graph(model, x)
    removal = [(g, [0, g.size - 1]) for g in graph.prunable_groups() if int(g.prunable.sum()) > 2]
    assert len(removal) >= 2
    together, one_by_one = share_copy(model), share_copy(model)
    zero_channels_(together, removal)
    for g, chans in removal:
        zero_contributions_(one_by_one, g, chans)
    a, b = together.state_dict(), one_by_one.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not _same(together, _snapshot(model))
