"""Probing only what the rules cannot vouch for: groups whose every op has an exact rule of
prunekit's own skip the trial; a size written in the code, or a user's rule, sends a group to it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.graph import build_graph
from prunekit.graph.rules import RULES, passthrough
from prunekit.surgery import verify
from prunekit.surgery.verify import build_safe_graph, probe_groups
from prunekit.testing.toy_models import TOY_MODELS, ShuffleOfWidthOne


class _Sized(nn.Module):
    """a: reshaped with its channel count written in the code; b: flattened with -1 only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(8 * 4 + 6 * 4, 2)

    def forward(self, x):
        a = self.a(x).reshape(x.shape[0], 8, 4)  # 8 is a constant: unproven
        b = self.b(x).view(x.shape[0], -1)  # only the batch and -1: proven
        return self.head(torch.cat([a.flatten(1), b], 1))


def test_a_size_written_in_the_code_makes_only_that_group_unproven():
    model, x = _Sized().eval(), torch.randn(2, 3, 2, 2)
    graph = build_graph(model, x)
    assert {g.name: g.proven for g in graph.prunable_groups()} == {"a": False, "b": True}


@pytest.mark.parametrize("name", ["residual_projection", "concat", "convnext", "mobilenet", "norms"])
def test_convolutional_toy_models_are_proven_throughout(name):
    make, inputs = TOY_MODELS[name]
    model, x = make().eval(), inputs()
    assert all(g.proven for g in build_graph(model, x).prunable_groups())


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_skipping_proven_groups_finds_the_same_verdict(name):
    torch.manual_seed(0)
    make, inputs = TOY_MODELS[name]
    model, x = make().eval(), inputs()
    graph = build_graph(model, x)
    assert probe_groups(model, x, graph, everything=False) == probe_groups(model, x, graph, everything=True)


def test_a_hard_coded_view_is_still_probed_and_caught():
    torch.manual_seed(0)
    model, x = ShuffleOfWidthOne().eval(), torch.randn(1, 3, 4, 4)
    graph = build_graph(model, x)
    assert not graph.group("a").proven
    assert set(probe_groups(model, x, graph, everything=False)) == {"a"}


def test_a_user_rule_is_not_vouched_for(monkeypatch):
    class Gelu2(nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x) * 2

    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), Gelu2(), nn.Conv2d(4, 2, 1)).eval(), torch.randn(1, 3, 2, 2)
    assert build_graph(model, x).group("0").proven
    monkeypatch.setitem(RULES._items, "gelu", lambda tr, call: passthrough(tr, call))  # a rule of the user's
    assert not build_graph(model, x).group("0").proven


def test_verdicts_are_cached_per_architecture_and_weights(monkeypatch):
    import copy

    verify._PROBED.clear()
    calls = []
    real = verify.probe_groups
    monkeypatch.setattr(verify, "probe_groups", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 3, 4, 4)
    model = ShuffleOfWidthOne().eval()
    for _ in range(3):  # copies of one model: one probe
        build_safe_graph(copy.deepcopy(model), x)
    assert len(calls) == 1
    build_safe_graph(copy.deepcopy(model), torch.randn(1, 3, 6, 6))  # other input shape
    assert len(calls) == 2
    build_safe_graph(ShuffleOfWidthOne().eval(), x)  # other weights
    assert len(calls) == 3


class _SwappedBranch(nn.Module):
    """A residual branch whose channel pairs are swapped in the code (view + flip), closed by a
    BatchNorm whose scale starts at zero (zero_init_residual): at initialisation the branch adds
    nothing, so removing a channel of `a` looks exact there and nowhere else."""

    def __init__(self):
        super().__init__()
        self.a, self.o, self.bn, self.skip = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        y = self.a(x).relu()
        b, c, h, w = y.shape
        return self.bn(self.o(y.view(b, c // 2, 2, h, w).flip(2).reshape(b, c, h, w))) + self.skip(x)


def test_a_verdict_reached_at_initialisation_is_not_reused_for_trained_weights():
    import copy

    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    verify._PROBED.clear()
    torch.manual_seed(0)
    x, cfg = torch.randn(2, 3, 6, 6), MagnitudeConfig(channel_ratio=0.5, round_to=None)
    fresh = _SwappedBranch().eval()
    assert prune_(copy.deepcopy(fresh), cfg, x).plan.groups.get("a")  # vacuous at zero scale: removal allowed
    trained = copy.deepcopy(fresh)
    with torch.no_grad():
        trained.bn.weight.uniform_(0.5, 1.5)
    assert "a" not in prune_(copy.deepcopy(trained), cfg, x).plan.groups  # probed again: refused


def test_a_class_defined_again_under_the_same_name_is_probed_again():
    """A re-run notebook cell: the same name and tensors, another forward (pairs swapped)."""
    import copy

    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    def version(swap: bool) -> type:
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

            def forward(self, x):
                y = self.a(x)
                if swap:
                    b, c, h, w = y.shape
                    y = y.view(b, c // 2, 2, h, w).flip(2).reshape(b, c, h, w)
                return self.o(y)
        return M

    verify._PROBED.clear()
    x, cfg = torch.randn(2, 3, 5, 5), MagnitudeConfig(channel_ratio=0.5, round_to=None)
    torch.manual_seed(0)
    plain = version(False)()
    swapped = version(True)()
    swapped.load_state_dict(plain.state_dict())  # the same weights: only the code differs
    assert type(plain).__qualname__ == type(swapped).__qualname__
    assert prune_(copy.deepcopy(plain), cfg, x).plan.groups.get("a")
    assert "a" not in prune_(copy.deepcopy(swapped), cfg, x).plan.groups


class _IndexedByChannels(nn.Module):
    """An integer buffer of positions indexes a table, and the result is viewed with sizes written
    in the code (torchvision's maxvit_t relative position bias)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 2))
        self.register_buffer("index", torch.randint(0, 7, (3, 3)))
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        bias = self.table[self.index.view(-1)].view(3, 3, -1)
        return self.head(x + bias.mean((0, 1)))


def test_an_integer_buffer_of_positions_is_not_a_group():
    """Its entries are values, not channels: removing one broke torchvision's maxvit_t and swin
    (22 and 12 such groups, each caught only by a trial before)."""
    model, x = _IndexedByChannels().eval(), torch.randn(1, 2)
    graph = build_graph(model, x)
    assert "index" not in {g.name for g in graph.prunable_groups()}
    assert probe_groups(model, x, graph) == {}


class _TwoHeads(nn.Module):
    """The second output sums a squashed branch over its channels (unproven); the first does
    not read that branch at all."""

    def __init__(self):
        super().__init__()
        self.stem, self.head, self.aux = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.head(self.stem(x)), torch.sigmoid(self.aux(x)).sum(1)


def test_the_probe_compares_every_output():
    """sigmoid(0) = 0.5: a zeroed channel still adds to the sum, a removed one does not."""
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    assert not graph.group("aux").proven
    assert set(probe_groups(model, x, graph, everything=False)) == {"aux"}


class _ShuffleInGroupsOf4(nn.Module):
    """A channel shuffle written with the group width (4 channels) in the code, the group count
    inferred: once channels go, the same view makes other groups."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        B, _, H, W = y.shape
        return self.b(y.view(B, -1, 4, H, W).transpose(1, 2).flatten(1, 2))


@pytest.mark.parametrize("side", [4, 5])
def test_a_channel_count_in_a_view_is_probed_when_it_equals_a_spatial_size(side):
    """With 4 x 4 maps the 4 in the view looks like the height: it is still a channel count."""
    torch.manual_seed(0)
    model, x = _ShuffleInGroupsOf4().eval(), torch.randn(3, 3, side, side)
    graph = build_graph(model, x)
    assert not graph.group("a").proven
    assert set(probe_groups(model, x, graph, everything=False)) == {"a"}


class _WidthBranch(nn.Module):
    """Doubles a's output while it has more than 6 channels: the probe's 8 -> 7 passes, 8 -> 4 not."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x).relu()
        if y.shape[1] > 6:
            y = y * 2
        return self.o(y)


def test_a_branch_on_the_channel_count_is_caught_at_the_real_widths():
    """It was pruned 0.66 from zeroing: the one-channel probe took the same branch as the dense model."""
    from prunekit.core.errors import CheckpointError, PruningError
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.surgery.plan import Plan, apply_plan_, prune_channels_

    verify._PROBED.clear()
    torch.manual_seed(0)
    model, x = _WidthBranch().eval(), torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"real widths, group\(s\) a: removal differs from zeroing"):
        prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.a.out_channels == 8
    assert prune_(model, MagnitudeConfig(channel_ratio=0.2, round_to=None), x).plan.groups["a"]  # 8 -> 7 is fine
    fresh = _WidthBranch().eval()
    with pytest.raises(PruningError, match="not what zeroing them gives"):
        prune_channels_(fresh, x, {"a": [0, 1, 2, 3]})
    assert fresh.a.out_channels == 8
    plan = Plan(groups={"a": [4, 5, 6, 7]}, sizes={"a": 8}, input_shapes=[[2, 3, 6, 6]], input_dtypes=["float32"])
    with pytest.raises(CheckpointError, match="not made by pruning this model's code"):
        apply_plan_(fresh, plan)  # a plan written by hand: the replay checks what the probe would
    assert fresh.a.out_channels == 8


class _NormThenSwap(nn.Module):
    """Linear -> LayerNorm or RMSNorm over the channels -> neighbouring channels swapped -> Linear."""

    def __init__(self, norm: str, swap: bool):
        super().__init__()
        self.i, self.o, self.swap = nn.Linear(5, 8), nn.Linear(8, 3), swap
        self.n = nn.LayerNorm(8) if norm == "layer" else nn.RMSNorm(8)
        with torch.no_grad():
            self.n.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.n(self.i(x))
        if self.swap:
            b, t, c = h.shape
            h = h.view(b, t, c // 2, 2).flip(-1).reshape(b, t, c)
        return self.o(h)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_a_group_behind_a_channel_norm_is_checked_against_norming_the_kept_channels(norm):
    """Zeroing is no reference where a norm takes statistics over the channels, so such groups were
    only run: a pair swap behind a LayerNorm was pruned 1.78 from what removal means. The reference
    now normalises over the kept channels, as the pruned norm does."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5)
    swapped = _NormThenSwap(norm, swap=True).eval()
    assert "removal differs from zeroing" in probe_groups(swapped, x, build_graph(swapped, x)).get("i", "")
    plain = _NormThenSwap(norm, swap=False).eval()
    assert probe_groups(plain, x, build_graph(plain, x), everything=True) == {}  # pruned as before


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: normalises NCHW over C through a permute."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


@pytest.mark.parametrize("hw", [6, 8])  # W other than C (an IndexError) and W equal to C (a false refusal)
def test_a_layernorm_subclass_with_its_own_forward_gets_no_last_dim_reference(hw):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _LayerNorm2d(8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, hw, hw)
    assert probe_groups(model, x, build_graph(model, x), everything=True) == {}


def test_the_real_width_check_runs_for_data_criteria_and_channel_level_pai():
    """With calibration batches (taylor) or SynFlow at channel level the check was skipped, and the
    saved file was then refused by load_pruned."""
    from prunekit.core.errors import PruningError
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.methods.pai import SynFlowConfig

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))]

    class Head(_WidthBranch):
        def forward(self, x):
            return super().forward(x).mean((2, 3))

    with pytest.raises(PruningError, match=r"real widths, group\(s\) a:"):
        prune_(Head().eval(), MagnitudeConfig(channel_ratio=0.5, round_to=None, criterion="taylor"), x,
               batches=batches)
    with pytest.raises(PruningError, match=r"real widths, group\(s\) a:"):
        prune_(Head().eval(), SynFlowConfig(sparsity=0.5, level="channel"), x)


class _MaskedLogits(nn.Module):
    """Scores with one class masked out (-1e9 or -inf) beside ordinary ones, and a sum over the
    channels (sigmoid) that zeroing a channel does not reproduce: the group is not prunable."""

    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill
        self.a, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 5)
        self.register_buffer("allowed", torch.tensor([True, True, True, True, False]))

    def forward(self, x):
        y = F.relu(self.a(x))
        feat = y.mean((2, 3)) + torch.sigmoid(y).sum(1).mean((1, 2)).unsqueeze(1)
        return self.fc(feat).masked_fill(~self.allowed, self.fill)


@pytest.mark.parametrize("fill", [-1e9, float("-inf")])
def test_a_masked_output_entry_does_not_hide_the_others_difference(fill):
    """The gap was measured against the whole tensor's largest |value|: one -1e9 logit made a
    0.94 difference in the others vanish, and -inf made it NaN; the group was pruned."""
    import prunekit

    torch.manual_seed(0)
    model = _MaskedLogits(fill).eval()
    result = prunekit.prune_(model, prunekit.MagnitudeConfig(channel_ratio=0.5), torch.randn(2, 3, 8, 8))
    assert "a" not in result.plan.groups and model.a.out_channels == 16
    assert verify._gap([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, float("nan")])]) == 0.0
    assert verify._gap([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, 2.0])]) == float("inf")
    assert verify._gap([torch.tensor([1e9, 0.5, 0.5])], [torch.tensor([1e9, 0.6, 0.5])]) == pytest.approx(0.1)


def test_a_config_dict_that_turns_a_branch_on_is_part_of_the_probe_cache_key():
    """Two instances of one class with the same weights, differing only in a dict attribute that
    switches a sum over the channels on: the second reused the first's verdict, and the pruning
    then failed its real-width check with a message about channel counts."""
    import prunekit

    class Net(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg, self.a, self.d = cfg, nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 5, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            out = self.d(y)
            return out + torch.sigmoid(y).sum(1, keepdim=True) if self.cfg["energy_term"] else out

    def build(flag):
        torch.manual_seed(0)
        return Net({"energy_term": flag})

    x = torch.randn(2, 3, 8, 8)
    prunekit.prune_(build(False), prunekit.MagnitudeConfig(channel_ratio=0.5), x)
    model = build(True)
    result = prunekit.prune_(model, prunekit.MagnitudeConfig(channel_ratio=0.5), x)
    assert "a" not in result.plan.groups and model.a.out_channels == 16
