"""Pluggable criteria (callables, prefixed factories, fallbacks said aloud) and prepared-graph reuse."""
import copy
import json

import pytest
import torch
from torch import nn

from prunekit import prepare_pruning
from prunekit.core.errors import ConfigError, PruningError
from prunekit.importance.criteria import CRITERIA, CRITERION_FACTORIES, register_criterion_factory, resolve_criterion
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.models import create_model

X = torch.randn(2, 3, 32, 32)


def _resnet(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet20", num_classes=10).eval()


def by_index(group, ctx):
    return torch.arange(group.size, dtype=torch.float32)


def test_a_lambda_criterion_prunes_a_model():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = prune_(m, MagnitudeConfig(criterion=lambda g, ctx: -torch.arange(g.size, dtype=torch.float32),
                                       channel_ratio=0.5), torch.randn(1, 3, 8, 8))
    assert result.plan.groups["0"] == [0, 1, 2, 3] and m[0].out_channels == 4 and m[2].in_channels == 4
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)


def test_a_callable_config_is_recorded_but_not_replayable():
    cfg = MagnitudeConfig(criterion=by_index, channel_ratio=0.5)
    d = cfg.to_dict()
    assert d["criterion"] == f"<callable {__name__}.by_index>" and d["replayable"] is False
    json.dumps(d)
    with pytest.raises(ConfigError, match="callable criterion.*cannot hold"):
        MagnitudeConfig.from_dict(d)
    assert "replayable" not in MagnitudeConfig(channel_ratio=0.5).to_dict()


@pytest.mark.parametrize("spec, message", [
    ("l7", "criterion='l7' is not allowed"),
    ("nosuch:abc", "no criterion factory is registered for prefix 'nosuch'"),
    (3, "must be a registered name"),
    ({"evolved": "div(P, Q)"}, "read as a mapping.*write evolved:div\\(P, Q\\) without the space"),  # `evolved: div(P, Q)` in YAML
])
def test_a_bad_criterion_fails_in_validate(spec, message):
    with pytest.raises(ConfigError, match=message):
        MagnitudeConfig(criterion=spec, channel_ratio=0.5)


def test_prefixed_criteria_resolve_through_their_factory():
    def factory(text):
        power = float(text)  # raises ValueError on bad text
        return lambda g, ctx: CRITERIA.get("l1")(g, ctx) ** power
    register_criterion_factory("powl1", factory)
    try:
        cfg = MagnitudeConfig(criterion="powl1:2", channel_ratio=0.5)
        assert MagnitudeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).criterion == "powl1:2"
        a, b = _resnet(), _resnet()
        ra = prune_(a, cfg, X, )
        rb = prune_(b, MagnitudeConfig(criterion="l1", channel_ratio=0.5), X)
        assert ra.plan.groups == rb.plan.groups  # a monotone transform of l1 selects the same channels
        with pytest.raises(ConfigError, match="could not be built by the 'powl1' factory.*ValueError"):
            MagnitudeConfig(criterion="powl1:two", channel_ratio=0.5)
        with pytest.raises(ConfigError, match="plain name"):
            register_criterion_factory("a:b", factory)
    finally:
        CRITERION_FACTORIES.unregister("powl1")
    assert resolve_criterion(by_index) is by_index


def test_a_criterion_that_falls_back_says_so():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1))
    with pytest.warns(UserWarning, match="'bn_scale' fell back to 'l2' for group '0'"):
        result = prune_(m, MagnitudeConfig(criterion="bn_scale", channel_ratio=0.5), torch.randn(1, 3, 8, 8))
    assert result.metrics["criterion_fallbacks"] == {"0": "bn_scale -> l2: no normalisation layer in the group"}
    assert "criterion_fallbacks" not in prune_(copy.deepcopy(m), MagnitudeConfig(channel_ratio=0.3),
                                               torch.randn(1, 3, 6, 6)).metrics


@pytest.mark.parametrize("target", [dict(channel_ratio=0.4), dict(macs_fraction=0.5, scope="global"),
                                    dict(params_fraction=0.6)])
def test_prepared_pruning_equals_pruning_from_scratch(target, monkeypatch):
    dense = _resnet()
    prepared = prepare_pruning(dense, X)
    import prunekit.graph.groups as groups_mod
    import prunekit.surgery.verify as verify_mod

    def no_more(*a, **k):
        raise AssertionError("traced or probed again")
    monkeypatch.setattr(groups_mod, "build_graph", no_more)
    monkeypatch.setattr(groups_mod, "Tracer", no_more)  # every trace, however build_graph was imported
    monkeypatch.setattr(verify_mod, "build_graph", no_more)
    monkeypatch.setattr(verify_mod, "probe_groups", no_more)
    results = {}
    for name, crit in [("l1", "l1"), ("index", by_index)]:
        for verify in (True, False):
            model = copy.deepcopy(dense)
            results[(name, verify)] = (prepared.prune_(model, MagnitudeConfig(criterion=crit, **target), verify=verify),
                                       model)
    monkeypatch.undo()
    refs = {}
    for name, crit in [("l1", "l1"), ("index", by_index)]:
        refs[name] = copy.deepcopy(dense)
        refs[name] = (prune_(refs[name], MagnitudeConfig(criterion=crit, **target), X), refs[name])
    for (name, verify), (got, model) in results.items():
        ref, ref_model = refs[name]
        assert got.plan.groups == ref.plan.groups, name
        assert (got.cost_after.params, got.cost_after.macs) == (ref.cost_after.params, ref.cost_after.macs)
        assert got.cost_after.params == sum(p.numel() for p in model.parameters())
        torch.testing.assert_close(model(X), ref_model(X))
    assert results[("l1", True)][0].plan.groups != results[("index", True)][0].plan.groups


def test_prepared_pruning_refuses_another_architecture_and_leaves_it_alone():
    prepared = prepare_pruning(_resnet(), X)
    other = create_model("resnet32", num_classes=10).eval()
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PruningError, match="not a fresh copy of the prepared one.*unexpected"):
        prepared.prune_(other, MagnitudeConfig(channel_ratio=0.5))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    already = _resnet()
    prepared.prune_(already, MagnitudeConfig(channel_ratio=0.5))
    with pytest.raises(PruningError, match="other shapes"):  # a pruned copy is not a fresh one
        prepared.prune_(already, MagnitudeConfig(channel_ratio=0.5))
    with pytest.raises(ConfigError, match="ignore"):
        prepared.prune_(_resnet(), MagnitudeConfig(channel_ratio=0.5, ignore=["fc"]))
    # a copy in another dtype is refused up front (it failed in the final forward, blaming the model)
    with pytest.raises(PruningError, match=r"other shapes or dtypes: conv1.weight \[16, 3, 3, 3\] float64 "
                                           r"\(prepared \[16, 3, 3, 3\] float32\)"):
        prepared.prune_(_resnet().double(), MagnitudeConfig(channel_ratio=0.5))
    # the same ignore list in another order is the same list
    both = prepare_pruning(_resnet(), X, ignore=["fc", "conv1"])
    both.prune_(_resnet(), MagnitudeConfig(channel_ratio=0.5, ignore=["conv1", "fc"]))


def test_prepared_pruning_with_data_dependent_and_element_criteria():
    dense = _resnet()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    prepared = prepare_pruning(dense, X)
    for crit in ("taylor", "snip", "synflow"):
        model = copy.deepcopy(dense)
        result = prepared.prune_(model, MagnitudeConfig(criterion=crit, channel_ratio=0.3), batches=batches)
        assert result.cost_after.params == sum(p.numel() for p in model.parameters()) < result.cost_before.params


def test_a_prepared_plan_records_the_fingerprints_prune_records(tmp_path):
    from prunekit.core.errors import CheckpointError
    from prunekit.surgery.persist import save_pruned

    dense = _resnet()
    prepared = prepare_pruning(dense, X)
    model, ref = copy.deepcopy(dense), copy.deepcopy(dense)
    got = prepared.prune_(model, MagnitudeConfig(channel_ratio=0.5))
    want = prune_(ref, MagnitudeConfig(channel_ratio=0.5), X)
    assert got.plan.to_dict() == want.plan.to_dict()
    # saving another model under the plan is refused: the file could never be loaded
    with pytest.raises(CheckpointError, match="not the pruned model the plan produces"):
        save_pruned(copy.deepcopy(dense), got.plan, tmp_path / "wrong.pt")
    assert not (tmp_path / "wrong.pt").exists()


def test_prepared_pruning_refuses_a_copy_holding_nan_as_prune_does():
    dense = _resnet()
    prepared = prepare_pruning(dense, X)
    for criterion in ("random", "l2"):  # fc.bias is in no scored group: no criterion sees it
        model = copy.deepcopy(dense)
        model.fc.bias.data[0] = float("nan")
        with pytest.raises(ConfigError, match="parameter fc.bias holds NaN"):
            prune_(copy.deepcopy(model), MagnitudeConfig(criterion=criterion, channel_ratio=0.5), X)
        with pytest.raises(ConfigError, match="parameter fc.bias holds NaN"):
            prepared.prune_(model, MagnitudeConfig(criterion=criterion, channel_ratio=0.5))
        assert model.conv1.out_channels == 16


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


class _Residual(_Chain):  # the same parameters; c1 and c2 now add, so their channels go together
    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c3(torch.relu(self.c2(h)) + h)


def test_prepared_pruning_refuses_a_copy_whose_modules_are_of_other_classes():
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(0)
    chain, residual = _Chain(), _Residual()
    residual.load_state_dict(chain.state_dict())
    prepared = prepare_pruning(chain, x)
    with pytest.raises(PruningError, match=r"other modules: \(the model\) _Residual \(prepared _Chain\)"):
        prepared.prune_(residual, MagnitudeConfig(channel_ratio=0.5, round_to=None))
    assert residual.c1.out_channels == 8
    bn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    gn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    with pytest.raises(PruningError, match=r"other modules: 1 GroupNorm \(prepared BatchNorm2d\)"):
        prepare_pruning(bn, x).prune_(gn, MagnitudeConfig(channel_ratio=0.4, round_to=None))


class _Swappable(nn.Module):
    """A flag set after construction turns on a channel-pair swap between a and o."""

    def __init__(self):
        super().__init__()
        self.a, self.o, self.swap = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), False

    def forward(self, x):
        y = self.a(x)
        if self.swap:
            b, c, h, w = y.shape
            y = y.view(b, c // 2, 2, h, w).flip(2).reshape(b, c, h, w)
        return self.o(y)


def test_prepared_pruning_refuses_a_copy_whose_module_settings_differ():
    """The flag passed the parameter and class check, and the swap was pruned 0.70 from zeroing."""
    import copy

    x = torch.randn(1, 3, 5, 5)
    plain = _Swappable()
    swapped = copy.deepcopy(plain)
    swapped.swap = True
    with pytest.raises(PruningError, match=r"other modules: \(the model\) settings \{'swap': True\} \(prepared settings \{'swap': False\}\)"):
        prepare_pruning(plain, x).prune_(swapped, MagnitudeConfig(channel_ratio=0.5, round_to=None))
    assert swapped.a.out_channels == 8


@pytest.mark.parametrize("scores, what", [
    (lambda g: torch.ones(g.size - 1), r"scores of shape \(15,\)"),
    (lambda g: torch.rand(g.size, 1), r"scores of shape \(16, 1\)"),
    (lambda g: torch.tensor(1.0), r"scores of shape \(\)"),
    (lambda g: torch.ones(g.size, dtype=torch.complex64), "complex64 scores"),
    (lambda g: torch.ones(g.size).to_sparse(), "a torch.sparse_coo tensor"),
])
@pytest.mark.parametrize("target", [dict(channel_ratio=0.5), dict(macs_fraction=0.5, scope="global"),
                                    dict(latency_fraction=0.7, latency=dict(repeats=2, warmup=1))])
def test_criterion_scores_of_another_shape_or_kind_are_one_config_error_for_every_target(scores, what, target):
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                      nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    prepared = prepare_pruning(m, x)
    cfg = MagnitudeConfig(criterion=lambda g, ctx: scores(g), **target)
    for run in (lambda model: prune_(model, cfg, x), lambda model: prepared.prune_(model, cfg)):
        model = copy.deepcopy(m)
        with pytest.raises(ConfigError, match=f"returned {what} for group '0'; a criterion returns a real tensor "
                                              r"of shape \(16,\)") as err:
            run(model)
        assert ("per_channel" in str(err.value)) == ("16, 1" in what)
        assert model[0].out_channels == 16


def test_a_criterion_that_raises_is_one_config_error_naming_it_and_the_group():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)

    def broken(group, ctx):
        return 1 / 0

    prepared = prepare_pruning(m, x)
    cfg = MagnitudeConfig(criterion=broken, channel_ratio=0.5)
    for run in (lambda model: prune_(model, cfg, x), lambda model: prepared.prune_(model, cfg)):
        model = copy.deepcopy(m)
        with pytest.raises(ConfigError, match=r"criterion <callable .*broken> raised ZeroDivisionError on group '0': "
                                              r"division by zero; nothing was removed") as err:
            run(model)
        assert isinstance(err.value.__cause__, ZeroDivisionError)  # the traceback stays reachable (--debug)
        assert model[0].out_channels == 16


def test_a_registered_criterion_that_raises_is_one_config_error_too():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    CRITERIA.register("broken_for_test", lambda g, ctx: 1 / 0)
    try:
        with pytest.raises(ConfigError, match="criterion broken_for_test raised ZeroDivisionError on group '0'"):
            prune_(m, MagnitudeConfig(criterion="broken_for_test", channel_ratio=0.5), x)
        assert m[0].out_channels == 16
    finally:
        CRITERIA.unregister("broken_for_test")


def test_a_criterion_giving_meta_tensors_is_one_config_error():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    cfg = MagnitudeConfig(criterion=lambda g, ctx: torch.empty(g.size, device="meta"), channel_ratio=0.5)
    with pytest.raises(ConfigError, match="meta device"):
        prune_(m, cfg, torch.randn(1, 3, 8, 8))
    assert m[0].out_channels == 16


def test_an_error_inside_a_prunekit_criterion_keeps_its_traceback(monkeypatch):
    """Only criteria from outside prunekit are reworded as the user's ConfigError: an error in a
    built-in one is prunekit's bug and is raised as it is, as is a memory shortage anywhere."""
    import prunekit.importance.criteria as criteria_mod

    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)

    def broken(*args, **kwargs):
        raise IndexError("a bug")

    monkeypatch.setattr(criteria_mod, "reduce_members", broken)
    with pytest.raises(IndexError, match="a bug"):
        prune_(m, MagnitudeConfig(criterion="l1", channel_ratio=0.5), x)

    def no_memory(group, ctx):
        raise MemoryError()

    with pytest.raises(MemoryError):
        prune_(m, MagnitudeConfig(criterion=no_memory, channel_ratio=0.5), x)
    assert m[0].out_channels == 16
