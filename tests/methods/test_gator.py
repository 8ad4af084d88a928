"""Gator: gated == converted, branch removal, controller, latency tables."""
import copy

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.cost.latency import LatencyConfig
from prunekit.cost.macs import count_cost
from prunekit.engine.train import TrainConfig
from prunekit.graph import build_graph
from prunekit.methods import METHODS, prune_
from prunekit.cost.differentiable import build_cost
from prunekit.layers.gates import GateSet
from prunekit.methods.gator import (
    GatorConfig,
    convert_,
    final_masks,
    keep_output_connected,
    mask_within_budget,
    rounded_masks,
)
from prunekit.models import create_model
from prunekit.surgery.branches import ConstantOutput, EmptyOutput
from prunekit.surgery.persist import load_pruned, save_pruned
from prunekit.surgery.plan import apply_plan_
from prunekit.surgery.verify import run_model
from prunekit.testing.toy_models import ConcatNet


def _random_bn_(model, seed=0):
    """BN with non-trivial statistics, so a closed channel's constant (beta - mean...) is not 0."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def _gated_resnet20():
    """ResNet-20 (seed 0) with non-trivial BN statistics in eval mode, a 2x3x32x32 input, its graph and gates."""
    torch.manual_seed(0)
    model = _random_bn_(create_model("resnet20", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_graph(model, x)
    return model, x, graph, GateSet.from_graph(model, graph)


def _masks(gates, seed=0, keep=0.7, closed=(), only=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, size in zip(gates.names, gates.sizes):
        m = torch.rand(size, generator=gen) < keep
        m[0] = True  # never empty a group by chance
        if only is not None and name not in only:
            m[:] = True
        if name in closed:
            m[:] = False
        out.append(m)
    return out


def _gated_output(model, gates, x):
    gates.attach(model)
    try:
        return run_model(model, x)
    finally:
        gates.detach()


# ------------------------------------------------------------------------------------ config


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="cost"):
        GatorConfig(cost="flops", target=0.5)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="target"):
            GatorConfig(target=bad)
    with pytest.raises(ConfigError, match="both"):
        GatorConfig(lam=1.0, target=0.5)
    with pytest.raises(ConfigError, match="neither"):
        GatorConfig()
    with pytest.raises(ConfigError, match="gate_init_prob"):
        GatorConfig(lam=1.0, gate_init_prob=0.4)
    with pytest.raises(ConfigError, match="epochs=0: Gator learns which channels.*method magnitude"):
        GatorConfig(target=0.5, epochs=0)  # the gates would close channels in index order
    # the controller's settings do nothing with a fixed lam: refused, not silently ignored
    with pytest.raises(ConfigError, match=r"^target_metric='macs' has no effect with a fixed lam"):
        GatorConfig(lam=1.0, target_metric="macs")
    with pytest.raises(ConfigError, match=r"lam_init=0\.5, ramp=0\.3 have no effect with a fixed lam"):
        GatorConfig(lam=1.0, lam_init=0.5, ramp=0.3)
    for name, value in (("tolerance", 0.05), ("controller_gain", 2.0)):
        with pytest.raises(ConfigError, match=f"{name}="):
            GatorConfig(lam=1.0, **{name: value})
        assert getattr(GatorConfig(target=0.5, **{name: value}), name) == value
    assert GatorConfig(lam=1.0, tolerance=0.03).lam == 1.0  # the default value is not a setting
    cfg = GatorConfig.from_dict({"target": 0.5, "cost": "latency", "target_metric": "macs",
                                 "latency": {"device": "cpu", "repeats": 3}})
    assert cfg.latency.repeats == 3 and cfg.target_measure == "macs"
    assert GatorConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------ conversion


def _check_conversion(model, x, gates, graph, masks):
    gates.freeze(masks)
    reference = _gated_output(model, gates, x)
    macs, params = build_cost("macs", model, graph, gates), build_cost("params", model, graph, gates)
    conv = convert_(model, gates, graph, x)
    out = run_model(model, x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    if not conv.silent:  # silent channels keep a little cost the estimate does not count
        counted = count_cost(model, x)
        assert macs.total(masks).item() == counted.macs
        assert params.total(masks).item() == pytest.approx(counted.params, abs=1e-6)
    return conv


def test_gated_equals_converted_resnet20_with_a_closed_block():
    model, x, graph, gates = _gated_resnet20()
    assert len(gates.names) == 12  # 3 highway groups (stem + stage streams) + 9 inner groups
    masks = _masks(gates, seed=1, closed=("layer2.1.conv1",))
    conv = _check_conversion(model, x, gates, graph, masks)
    assert [b.group for b in conv.branches] == ["layer2.1.conv1"] and not conv.silent
    assert conv.max_abs_diff <= 1e-5
    build_graph(model, x)  # the converted model still traces


def test_gated_equals_converted_concat_model_and_silent_fallback():
    torch.manual_seed(0)
    model, x = _random_bn_(ConcatNet()).eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    masks = _masks(gates, seed=2, keep=0.6)
    _check_conversion(copy.deepcopy(model), x, gates, graph, masks)
    # group "a" read through concats by c and d: no branch to cut, one silent channel stays
    gates = GateSet.from_graph(model, graph)
    conv = _check_conversion(model, x, gates, graph, _masks(gates, seed=3, keep=0.6, closed=("a.0",)))
    assert conv.silent == ["a.0"] and model.a[0].out_channels == 1


def test_a_cut_branch_that_breaks_the_forward_falls_back_to_a_silent_channel():
    """Group "0" passes the branch test, but its cut leaves 0 channels to a max pooling, which
    cannot take them: the conversion retries with one silent channel (it raised the pooling's
    RuntimeError before)."""
    torch.manual_seed(0)
    model = _random_bn_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(8, 3))).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    conv = _check_conversion(model, x, gates, graph, _masks(gates, closed=("0",), only=()))
    assert not conv.branches and conv.silent == ["0"] and model[0].out_channels == 1


def test_highway_gates_remove_the_same_channels_from_every_member():
    model, x, graph, gates = _gated_resnet20()
    stream = graph.group("layer2.0.conv2")  # stage-2 stream: 3 block outputs, shortcut, 3 readers
    assert {m.module for m in stream.members if m.role == "out"} == {
        "layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"}
    masks = _masks(gates, seed=4, keep=0.5, only=("layer2.0.conv2",))
    before = {m.qualname: getattr(model.get_submodule(m.module), m.name).detach().clone() for m in stream.tensor_members()}
    _check_conversion(model, x, gates, graph, masks)
    closed = (~masks[gates.names.index("layer2.0.conv2")]).nonzero().flatten()
    assert 0 < closed.numel() < 32
    for m in stream.tensor_members():
        keep = (~torch.isin(m.channel, closed)).nonzero().flatten()
        now = getattr(model.get_submodule(m.module), m.name)
        torch.testing.assert_close(now, before[m.qualname].index_select(m.dim, keep), atol=0, rtol=0)


def test_closing_an_inner_group_cuts_the_branch(tmp_path):
    model, x, graph, gates = _gated_resnet20()
    fresh = copy.deepcopy(model)
    macs_before = count_cost(model, x).macs
    conv = _check_conversion(model, x, gates, graph, _masks(gates, closed=("layer1.1.conv1",), only=()))
    block = model.layer1[1]
    assert isinstance(block.conv1, EmptyOutput) and isinstance(block.bn1, nn.Identity)
    assert isinstance(block.conv2, ConstantOutput)
    assert macs_before - count_cost(model, x).macs == 2 * 16 * 16 * 9 * 32 * 32  # both 3x3 convs gone
    assert run_model(model, torch.randn(3, 3, 32, 32)).shape == (3, 10)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()  # trainable after conversion
    model.eval()
    # the plan replays on a freshly built model, with the cut branch
    path = save_pruned(model, conv.plan, tmp_path / "gator.safetensors")
    again = load_pruned(fresh, path)
    torch.testing.assert_close(run_model(again, x), run_model(model, x), atol=0, rtol=0)
    assert isinstance(apply_plan_(copy.deepcopy(fresh), conv.plan).layer1[1].conv2, ConstantOutput)


def test_a_closed_stream_and_a_closed_block_inside_it_cut_together(tmp_path):
    """layer1.0.conv2 writes the closed stage-1 stream (emptied by that cut) and reads the closed
    inner group of block layer1.0 (made constant by that cut): it must be emptied whichever
    branch comes last, or the block adds 16 constant channels to a 0-channel stream."""
    model, x, graph, gates = _gated_resnet20()
    fresh = copy.deepcopy(model)
    conv = _check_conversion(model, x, gates, graph, _masks(gates, seed=1, closed=("conv1", "layer1.0.conv1")))
    assert sorted(b.group for b in conv.branches) == ["conv1", "layer1.0.conv1"] and not conv.silent
    assert isinstance(model.layer1[0].conv2, EmptyOutput)
    again = load_pruned(fresh, save_pruned(model, conv.plan, tmp_path / "gator.safetensors"))
    torch.testing.assert_close(run_model(again, x), run_model(model, x), atol=0, rtol=0)


# ------------------------------------------------------------------------------- controller


def test_mask_budget_final_search_and_rounding():
    logits = [torch.tensor([-3.0, -1.0, 2.0, 4.0]), torch.tensor([-2.0, 1.0])]
    prunable = [torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    share = lambda masks: float(torch.cat(masks).float().mean())  # fraction = share of open channels
    active = [torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    # target 0.6: closing -3 and -2 leaves 4/6 >= 0.6; closing -1 too would leave 0.5 < 0.6
    assert mask_within_budget(logits, active, prunable, share, 0.6) == 2
    assert active[0].tolist() == [False, True, True, True] and active[1].tolist() == [False, True]
    masks, info = final_masks(logits, active, prunable, share, target=0.5)
    assert info["closed_by_threshold"] == 1 and masks[0].tolist() == [False, False, True, True]
    masks, _ = final_masks(logits, active, prunable, share, target=None)  # fixed lambda: logit < 0 closes
    assert masks[0].tolist() == [False, False, True, True] and masks[1].tolist() == [False, True]



def _rounding_state():
    """ResNet-20's gates part-closed by a training (16-wide groups keep 12-13, the others 55%),
    one branch closed entirely: (graph, gates, MACs measure, logits, prunable, masks, cut index)."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    graph = build_graph(model, torch.randn(1, 3, 32, 32))
    gates = GateSet.from_graph(model, graph)
    measure = build_cost("macs", model, graph, gates)
    gen = torch.Generator().manual_seed(2)
    logits = [5.3 + 0.5 * torch.randn(s, generator=gen) for s in gates.sizes]
    prunable = [gates.prunable(i) for i in range(len(gates.sizes))]
    masks = []
    for i, (s, t) in enumerate(zip(gates.sizes, logits)):
        m = torch.ones(s, dtype=torch.bool)
        m[torch.argsort(t)[: (3 + i % 2) if s == 16 else int(s * 0.45)]] = False
        masks.append(m)
    cut = gates.names.index("layer1.1.conv1")
    masks[cut][:] = False  # a whole branch closed by training
    return graph, gates, measure, logits, prunable, masks, cut


def test_rounded_masks_meet_the_budget_jointly_and_keep_cut_branches_closed():
    """Widths rounded with the target: on a state where rounding each group to its nearest
    multiple would go over the MACs budget (0.526 for 0.434 with the former rounding), the
    result stays within it, every width is a multiple, no closed gate is reopened, and a group
    closed entirely (a cut branch) stays closed."""
    graph, gates, measure, logits, prunable, masks, cut = _rounding_state()
    budget = measure.fraction(masks)
    out, info = rounded_masks(masks, logits, prunable, measure.fraction, budget, 8, graph, list(gates.names))
    assert info["fraction"] <= budget + 1e-12
    widths = [int(m.sum()) for m in out]
    assert widths[cut] == 0 and all(w % 8 == 0 for w in widths)
    assert info["reopened"] == 0 and all(not bool((o & ~m).any()) for m, o in zip(masks, out))  # no gate reopened
    assert widths == [int(m.sum()) // 8 * 8 for m in masks]  # here every group rounds down: 12-13 -> 8, 17 -> 16, 35 -> 32
    for o, t in zip(out, logits):  # a group keeps its best channels: no closed channel beats an open one
        if o.any() and (~o).any():
            assert float(t[o].min()) >= float(t[~o].max())


def test_rounding_after_training_may_reopen_channels_the_network_trained_with():
    """A run that never settled is rounded after training. The channels its final search closed
    trained all along, so rounding may give them back (never one switched off in training): the
    state above, rounded down to 0.224 of the MACs for a budget of 0.357 when nothing could
    reopen, now lands at 0.349, within it, in multiples, the cut branch closed."""
    graph, gates, measure, logits, prunable, masks, cut = _rounding_state()
    trained = [torch.ones(s, dtype=torch.bool) for s in gates.sizes]
    trained[cut][:] = False  # switched off during training: stays closed
    budget = measure.fraction(masks)
    down, _ = rounded_masks(masks, logits, prunable, measure.fraction, budget, 8, graph, list(gates.names))
    out, info = rounded_masks(masks, logits, prunable, measure.fraction, budget, 8, graph, list(gates.names),
                              trained=trained)
    widths = [int(m.sum()) for m in out]
    assert measure.fraction(down) < info["fraction"] <= budget + 1e-12 and info["reopened"] > 0
    assert widths[cut] == 0 and all(w % 8 == 0 for w in widths)
    # a channel switched off in training stays closed even when its logit beats a threshold-closed one's
    for i, (m, t) in enumerate(zip(masks, logits)):
        if m.any() and (~m).any():
            trained[i][torch.nonzero(~m).flatten()[t[~m].argmax()]] = False
    out, info = rounded_masks(masks, logits, prunable, measure.fraction, budget, 8, graph, list(gates.names),
                              trained=trained)
    assert info["reopened"] > 0 and not any(bool((o & ~tr & ~m).any()) for o, tr, m in zip(out, trained, masks))


def test_a_multiple_too_coarse_for_the_target_is_halved_until_the_widths_fit():
    """Multiples of 48 on ResNet-20's 16/32/64-wide groups cannot get under the budget (every
    group keeps at least one multiple): the multiple is halved until they do, and the report
    says which was asked for and which was used."""
    from prunekit.methods.gator.controller import rounded_within
    graph, gates, measure, logits, prunable, _, _ = _rounding_state()
    opens = [torch.ones(s, dtype=torch.bool) for s in gates.sizes]
    coarse, info48 = rounded_masks(opens, logits, prunable, measure.fraction, 0.3, 48, graph, list(gates.names),
                                   reopen=True)
    assert info48["fraction"] > 0.3  # best effort, over the budget
    out, info = rounded_within(opens, logits, prunable, measure.fraction, 0.3, 48, graph, list(gates.names),
                               reopen=True)
    assert info["asked"] == 48 and info["multiple"] < 48 and info["fraction"] <= 0.3
    from prunekit.importance.select import group_multiple  # a group no wider than the multiple steps by less
    assert info["multiple"] in (32, 16, 8, 4, 2)  # powers of two below 48, not 24, 12, 6, 3
    assert all(int(m.sum()) % group_multiple(m.numel(), info["multiple"]) == 0
               for m in out if 0 < int(m.sum()) < m.numel())


def test_controller_reaches_the_target_on_digits():
    from prunekit.data import DataConfig, load_data

    bundle = load_data(DataConfig(name="digits", batch_size=64, seed=0))
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    x = next(iter(bundle.val))[0][:2]
    result = prune_(model, GatorConfig(target=0.5, epochs=3, probe=False), x, train_loader=bundle.train,
                    val_loader=bundle.val, train_config=TrainConfig(epochs=1, lr=0.05, momentum=0.9), device="cpu")
    m = result.metrics
    assert m["target"]["within_tolerance"] and abs(result.cost_after.macs / result.cost_before.macs - 0.5) <= 0.03
    lambdas = [h[3] for h in m["controller"]]
    assert max(lambdas) > lambdas[0]  # the controller had to raise lambda before the logits moved
    assert m["gated_history"][-1]["gator/settled_at"] is not None  # target reached during training
    # the plan at each epoch's end follows the ramp (0.7 of the steps) after settling too: it froze
    # at the settling step's value
    assert m["gated_history"][-1]["gator/planned_fraction"] == pytest.approx(0.5)
    assert m["gated"]["acc"] == m["converted"]["acc"] > 0.5  # exact conversion of a working net
    assert m["conversion"]["max_abs_diff"] <= 1e-5
    assert "gator" in METHODS.list()


def test_an_impossible_target_is_refused_before_training_and_leaves_the_model():
    """The transformer toy's only gated group is its MLP's hidden layer (LayerNorm statistics keep
    the stream): closing all of it still keeps 56% of the MACs. Target 0.5 trained every epoch,
    closed every gate, cut the MLP and handed back that network with within_tolerance False. It is
    a ConfigError naming the smallest fraction reachable, before any training; the model is the
    caller's. A target within the tolerance of that floor still runs."""
    from prunekit.testing.toy_models import TransformerMHA

    torch.manual_seed(0)
    net, x = TransformerMHA(), torch.randn(2, 6, 5)
    data = [(torch.randn(8, 6, 5), torch.randint(0, 3, (8,))) for _ in range(2)]
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match=r"impossible target: .*0\.56.* of the macs.*model was left unchanged"):
        prune_(net, GatorConfig(target=0.5, epochs=1), x, train_loader=data, train_config=TrainConfig(epochs=1),
               device="cpu")
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    r = prune_(net, GatorConfig(target=0.55, epochs=1), x, train_loader=data, train_config=TrainConfig(epochs=1),
               device="cpu")
    assert r.metrics["target"]["within_tolerance"]
    # the same check without training, for callers that train a dense model first (run, compare)
    fresh = TransformerMHA()
    with pytest.raises(ConfigError, match=r"impossible target: .*0\.56"):
        GatorConfig(target=0.5, epochs=1).check_model(fresh, x)
    GatorConfig(target=0.55, epochs=1).check_model(fresh, x)
    GatorConfig(target=0.5, epochs=1).check_model(fresh)  # without inputs: nothing to trace, not checked


def test_the_least_target_an_impossible_one_names_is_taken_and_masks_are_named():
    """The floor minus the tolerance was printed rounded to three places, below the true value, so
    the target it advised was refused again; on a model carrying weight masks (after SLR) neither
    the refusal nor a finished run's notes said that the masked layers keep their channels."""
    import re

    from prunekit.core.errors import PruningError
    from prunekit.methods.slr import SLRConfig

    torch.manual_seed(0)
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    x, tc = torch.zeros(1, 1, 8, 8), TrainConfig(epochs=1, lr=0.05, log_every=0)
    model = create_model("small_cnn", num_classes=10)
    with pytest.raises(ConfigError, match="impossible target") as err:
        GatorConfig(target=0.05, ignore=["fc"]).check_model(model, x)
    least = float(re.search(r"ask for at least ([0-9.]+)", str(err.value)).group(1))
    assert "ignore fewer modules" in str(err.value)
    GatorConfig(target=least, ignore=["fc"]).check_model(model, x)  # the advice is a target it takes
    prune_(model, SLRConfig(sparsity=0.5, epochs=1, layers=["conv3"]), x, train_loader=data, train_config=tc)
    with pytest.raises(ConfigError, match=r"carry weight masks \(conv3\), whose channels are kept: bake them first") as err:
        GatorConfig(target=0.05).check_model(model, x)
    assert "ignore fewer" not in str(err.value)  # nothing ignored: not advised
    r = prune_(model, GatorConfig(target=0.6, epochs=1), x, train_loader=data, train_config=tc)
    assert any(n.startswith("channels kept by weight masks: 1 layer(s)") for n in r.metrics["notes"])
    masked = create_model("small_cnn", num_classes=10)
    prune_(masked, SLRConfig(sparsity=0.5, epochs=1), x, train_loader=data, train_config=tc)
    with pytest.raises(PruningError, match=r"no channel group can be gated.*carry weight masks"):
        prune_(masked, GatorConfig(target=0.5, epochs=1), x, train_loader=data, train_config=tc)
    with pytest.raises(ConfigError, match=r"train_loader \(generator\) has no len\(\)"):
        prune_(create_model("small_cnn", num_classes=10), GatorConfig(target=0.5, epochs=1), x,
               train_loader=(b for b in data), train_config=tc)


@pytest.mark.parametrize("config", [dict(lam=1.0), dict(target=0.2, cost="latency"),
                                    dict(target=0.2, target_metric="latency")], ids=["lam", "latency-cost", "latency-target"])
def test_a_model_with_no_gateable_group_is_refused_by_check_model_whatever_the_target(config):
    """check_model (run before dense training in run and compare) refused it only for a MACs or
    params target; with a fixed lam or a latency cost the dense model trained first."""
    from prunekit.core.errors import PruningError
    model = create_model("small_cnn", 10)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"no channel group can be gated.*ignore=\['conv2'\] leaves these modules whole"):
        GatorConfig(epochs=1, ignore=["conv2"], **config).check_model(model, torch.randn(1, 1, 8, 8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    GatorConfig(epochs=1, **config).check_model(model, torch.randn(1, 1, 8, 8))


# ------------------------------------------------------------------------------------ latency


def test_latency_tables_are_built_and_used_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    cfg = LatencyConfig(device="cpu", warmup=1, repeats=3)
    cost = build_cost("latency", model, graph, gates, cfg, grid=2)
    assert len(cost.latency_tables) == 3 and all(t.device == "cpu" for t in cost.latency_tables)
    (t0, *_), (t1, *_), (t2, *_) = cost.tables
    assert t0.in_counts == [1, 2, 3] and t1.in_counts == [1, 4, 8] and t1.out_counts == [1, 4, 8]  # down to 1/16
    assert cost.full == pytest.approx(t0.lookup(3, 8) + t1.lookup(8, 8) + t2.lookup(8, 2))
    opens = [torch.tensor([True] * 6 + [False] * 2), torch.tensor([True] * 4 + [False] * 4)]
    want = t0.lookup(3, 6) + t1.lookup(6, 4) + t2.lookup(4, 2)
    assert cost.total(opens).item() == pytest.approx(want)
    assert all(bool(torch.isfinite(c).all()) for c in cost.per_channel(gates.open_probs()))
    # end to end: latency objective at a MACs target
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))) for _ in range(6)]
    result = prune_(model, GatorConfig(cost="latency", target=0.6, target_metric="macs", epochs=2, latency=cfg,
                                       latency_grid=2, probe=False), x, train_loader=data,
                    train_config=TrainConfig(epochs=1, lr=0.05), device="cpu")
    assert len(result.metrics["latency_tables"]) == 3
    assert result.metrics["target"]["measure"] == "macs" and result.cost_after.macs < result.cost_before.macs


def test_gator_with_round_to_ends_on_multiples_within_the_target():
    """A run too short to settle is rounded after training; only channels the final search closed
    (which trained all along) may reopen, so the result stays within the target."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(512, 2))
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))] * 4
    r = prune_(net, GatorConfig(target=0.5, epochs=2, round_to=8), data[0][0], train_loader=data,
               train_config=TrainConfig(epochs=1, lr=0.05), device="cpu")
    assert net[0].out_channels % 8 == 0 and net[2].out_channels % 8 == 0
    final, rounding = r.metrics["final"], r.metrics["rounding"]
    assert "settle_rounding" not in r.metrics and rounding["multiple"] == 8
    assert rounding["reopened"] <= final["closed_by_threshold"]
    assert final["fraction"] == rounding["fraction"] <= rounding["budget"] and r.metrics["target"]["within_tolerance"]
    assert r.metrics["conversion"]["max_abs_diff"] <= 1e-5


def test_gator_rounds_on_settling_and_trains_the_rounded_network():
    """On the digits CNN the run settles, widths are rounded to multiples of 8 then, and the rest
    of gated training trains that network: the gated accuracy stays where the unrounded run's is
    (96-97%; rounding after training instead gave 79-88%)."""
    from prunekit.data import DataConfig, load_data

    bundle = load_data(DataConfig(name="digits", batch_size=64, seed=0))
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    x = next(iter(bundle.val))[0][:2]
    r = prune_(model, GatorConfig(target=0.5, epochs=3, probe=False, round_to=8), x, train_loader=bundle.train,
               val_loader=bundle.val, train_config=TrainConfig(epochs=1, lr=0.05, momentum=0.9), device="cpu")
    settled, rounding = r.metrics["settle_rounding"], r.metrics["rounding"]
    assert settled["multiple"] == 8 and settled["fraction"] <= 0.5
    assert rounding["closed"] == 0 and rounding["reopened"] == 0  # already multiples at the end
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert r.metrics["gated"]["acc"] > 0.93


def test_a_closed_last_stream_is_cut_and_the_converted_model_is_counted():
    """Every channel of the stage-3 stream closed: its branch is cut, the pooled features have
    0 channels and the classifier is constant. count_cost (which the pipeline calls right after
    conversion) traced that 0-channel tensor and failed with an IndexError."""
    model, x, graph, gates = _gated_resnet20()
    conv = _check_conversion(model, x, gates, graph, _masks(gates, closed=("layer3.0.conv2",), only=()))
    assert [b.group for b in conv.branches] == ["layer3.0.conv2"] and isinstance(model.fc, ConstantOutput)


def test_the_settle_rounding_report_survives_a_resume():
    """A run resumed after it settled reports metrics["settle_rounding"] as the uninterrupted run
    does: the hook's checkpoint state carries the rounding report (it was lost on resume)."""
    from prunekit.methods.gator.hook import GatorHook

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(512, 2))
        graph = build_graph(net, torch.randn(2, 1, 8, 8))
        gates = GateSet.from_graph(net, graph)
        return GatorHook(gates, build_cost("macs", net, graph, gates), None, GatorConfig(target=0.5, round_to=8),
                         total_steps=10, graph=graph)

    hook = make()
    hook.gates.active(0)[:13] = False  # the switched-off channels reached the target
    hook.settle(4)
    assert hook.rounding is not None and hook.rounding["multiple"] == 8
    resumed = make()
    resumed.load_state_dict(hook.state_dict())
    assert resumed.settled_at == 4 and resumed.rounding == hook.rounding


def test_a_cut_consumer_keeps_its_bias_as_a_parameter_and_the_estimate_equals_the_count():
    """Closing the stage-2 stream of the projection toy cuts it: the classifier becomes a
    ConstantOutput returning its bias. The bias was kept as a buffer, so count_cost dropped its
    5 parameters while the params estimate (which the target is measured in) counted them; it is
    a parameter again, fine-tuned like the Linear's bias, and estimate and count agree."""
    from prunekit.testing.toy_models import ResidualNet

    torch.manual_seed(0)
    model, x = _random_bn_(ResidualNet()).eval(), torch.randn(2, 3, 8, 8)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    conv = _check_conversion(model, x, gates, graph, _masks(gates, closed=("proj.0",), only=()))
    assert [b.group for b in conv.branches] == ["proj.0"] and isinstance(model.fc, ConstantOutput)
    assert [n for n, _ in model.fc.named_parameters()] == ["value"]


def test_attention_whose_value_branch_is_cut_still_counts_its_query_key_product():
    """Closing every channel of v cuts the branch v -> o; q.k^T is still computed (the softmax
    weights times a 0-channel v). count_cost of the converted model dropped that product (the
    attention rule gave up on the empty v), 576 MACs below the estimate; both count it now."""
    from prunekit.testing.toy_models import LinearAttention

    torch.manual_seed(0)
    model, x = LinearAttention().eval(), torch.randint(0, 20, (2, 5))
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    conv = _check_conversion(model, x, gates, graph, _masks(gates, closed=("v",), only=()))
    assert [b.group for b in conv.branches] == ["v"] and isinstance(model.o, ConstantOutput)


def test_a_cut_stem_before_a_chunk_cat_and_channel_shuffle_is_counted():
    """The closed stem of the ShuffleNet-like toy is cut: chunk, cat and the shuffle's view then
    carry 0 channels. count_cost (called by the pipeline right after conversion) failed to trace
    them (a max over an empty axis); it now counts the converted model, equal to the estimate."""
    from prunekit.testing.toy_models import ShuffleNetish

    torch.manual_seed(0)
    model, x = _random_bn_(ShuffleNetish()).eval(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    conv = _check_conversion(model, x, gates, graph, _masks(gates, closed=("stem.0",), only=()))
    assert [b.group for b in conv.branches] == ["stem.0"] and isinstance(model.stem[0], EmptyOutput)


def test_closing_every_prunable_channel_of_a_zero_padded_stream_keeps_one_silent_channel():
    """The stage-1 stream of a zero-padded residual net also holds the 8 padded channels of the
    shortcut, which cannot be pruned. With the 8 prunable ones all closed, removing them would
    leave the stem conv with no filter, and the conversion raised PruningError; it keeps one
    silent channel instead, and the converted model equals the gated one."""
    from prunekit.testing.toy_models import ResidualNet

    torch.manual_seed(0)
    model, x = _random_bn_(ResidualNet(zero_pad=True)).eval(), torch.randn(2, 3, 8, 8)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    stream = gates.names.index("stem.0")
    assert not bool(gates.prunable(stream).all())
    masks = _masks(gates, seed=1, only=())
    masks[stream] = ~gates.prunable(stream)
    conv = _check_conversion(model, x, gates, graph, masks)
    assert conv.silent == ["stem.0"] and model.stem[0].out_channels == 1


# ------------------------------------------------------------------- output kept connected


def _chain():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _varies(model, x_shape):
    gen = torch.Generator().manual_seed(5)
    a, b = (run_model(model, torch.randn(x_shape, generator=gen)) for _ in range(2))
    return bool((a - b).abs().max() > 1e-4)


@pytest.mark.parametrize("setting", [{"target": 0.01, "epochs": 2}, {"lam": 1e6, "epochs": 1}])
def test_a_chain_whose_every_gate_closes_keeps_its_strongest_channel(setting, tmp_path):
    """A plain chain with a tiny target (or a huge lambda) closed every gate of a group all data
    flows through: the conversion cut that branch and the pruned model's output no longer
    depended on its input (0 params, 0 MACs), without a word. Such a group now keeps its
    strongest channel, in the gated model too (the conversion stays exact), and the notes say so."""
    torch.manual_seed(0)
    net, data = _chain(), [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(4)]
    fresh, before = copy.deepcopy(net), count_cost(net, data[0][0])
    r = prune_(net, GatorConfig(**setting), data[0][0], train_loader=data,
               train_config=TrainConfig(epochs=1, lr=0.05), device="cpu")
    assert not r.metrics["conversion"]["branches"] and r.metrics["conversion"]["max_abs_diff"] <= 1e-5
    assert isinstance(net[3], nn.Conv2d) and net[3].out_channels >= 1 and isinstance(net[8], nn.Linear)
    assert _varies(net, (2, 3, 8, 8))
    kept = r.metrics["kept_open"]
    assert "3" in kept and all(any(f"group {g}:" in n and "kept its strongest channel" in n
                                   for n in r.metrics["notes"]) for g in kept)
    assert r.metrics["target"]["achieved"] == count_cost(net, data[0][0]).macs / before.macs
    again = load_pruned(fresh, save_pruned(net, r.plan, tmp_path / "gator.safetensors"))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(run_model(again, x), run_model(net, x), atol=0, rtol=0)


def test_only_closures_that_disconnect_the_output_keep_their_strongest_channel():
    """ResNet-20: a closed inner group (the shortcut carries the input) stays closed and is cut;
    the closed stem stream, which every path runs through, keeps its highest-logit channel. On
    the concat toy each branch alone leaves the other one, but both closed disconnect the output:
    the branch with the higher logit reopens. The gated and converted models still agree."""
    model, x, graph, gates = _gated_resnet20()
    with torch.no_grad():
        gates.logits[gates.names.index("conv1")][5] = 9.0
    masks = _masks(gates, seed=1, closed=("conv1", "layer1.0.conv1"))
    kept_masks, kept = keep_output_connected(model, gates, masks, x)
    assert list(kept) == ["conv1"] and "no longer depend on the input" in kept["conv1"]
    stem = kept_masks[gates.names.index("conv1")]
    assert stem.nonzero().flatten().tolist() == [5] and gates.frozen is None
    assert not kept_masks[gates.names.index("layer1.0.conv1")].any()
    conv = _check_conversion(model, x, gates, graph, kept_masks)
    assert [b.group for b in conv.branches] == ["layer1.0.conv1"]
    assert bool((run_model(model, x) - run_model(model, torch.randn_like(x))).abs().max() > 1e-4)

    torch.manual_seed(0)
    model, x = _random_bn_(ConcatNet()).eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    with torch.no_grad():
        gates.logits[gates.names.index("b.0")][3] = 9.0
    masks = _masks(gates, seed=3, closed=("a.0",), only=())
    out, kept = keep_output_connected(model, gates, masks, x)  # b still carries the input
    assert kept == {} and all(torch.equal(a, b) for a, b in zip(out, masks))
    masks = _masks(gates, seed=3, closed=("a.0", "b.0"), only=())
    kept_masks, kept = keep_output_connected(model, gates, masks, x)
    assert list(kept) == ["b.0"] and "together with the other closed groups (a.0)" in kept["b.0"]
    assert kept_masks[gates.names.index("b.0")].nonzero().flatten().tolist() == [3]
    _check_conversion(model, x, gates, graph, kept_masks)


def test_a_result_outside_the_tolerance_is_noted_with_the_multiple_used():
    """The run's notes say the target was missed, in points, naming the multiple the widths were
    rounded to after halving (the one asked for, 48, cannot fit 0.3 of the MACs here; the next is 32, the power of two below it)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * 16, 2))
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))] * 4
    r = prune_(net, GatorConfig(target=0.3, epochs=2, round_to=48, tolerance=0.01), data[0][0], train_loader=data,
               train_config=TrainConfig(epochs=1, lr=0.05), device="cpu")
    assert r.metrics["rounding"]["asked"] == 48 and r.metrics["rounding"]["multiple"] == 32
    assert not r.metrics["target"]["within_tolerance"]
    (note,) = r.metrics["notes"]
    assert "not the target 30% ± 1 points; widths are multiples of 32" in note


def test_a_group_kept_open_with_no_other_fully_closed_group_says_so():
    """At a target of 0.001 on resnet20 the last group reopened had no other fully closed group to
    name, and its note read 'together with the other closed groups () ...'."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    r = prune_(model, GatorConfig(target=0.001, epochs=3), torch.zeros(1, 3, 32, 32), train_loader=data,
               train_config=TrainConfig(lr=0.05))
    kept = r.metrics["kept_open"]
    assert "()" not in " ".join(kept.values())
    assert "every gate closed, and with the channels closed in the other groups the output would no longer depend " \
           "on the input" in kept.values()
