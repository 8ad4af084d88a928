"""The reference magnitude pruner: criteria, targets, schedules, channel rounding."""
import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError, PruningError
from prunekit.graph import build_graph
from prunekit.importance.activations import activation_stats
from prunekit.importance.criteria import CRITERIA, ScoreContext
from prunekit import prepare_pruning
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig, score_groups
from prunekit.cost.macs import count_cost
from prunekit.models import create_model

X = torch.randn(2, 3, 32, 32)


def _batches(n=2, classes=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


def _resnet(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet20", num_classes=10).eval()


@pytest.mark.parametrize("criterion", sorted(CRITERIA.list()))
def test_every_criterion_prunes_and_keeps_outputs_shaped(criterion):
    model = _resnet()
    result = prune_(model, MagnitudeConfig(criterion=criterion, channel_ratio=0.3, probe=False), X,
                    batches=_batches())
    assert model(X).shape == (2, 10)
    assert 0.3 < result.params_fraction < 0.9


@pytest.mark.parametrize("criterion", ["taylor", "activation"])
def test_data_dependent_criteria_ask_for_data(criterion):
    with pytest.raises(ConfigError, match="needs data"):
        prune_(_resnet(), MagnitudeConfig(criterion=criterion, channel_ratio=0.3, probe=False), X)


def test_l1_removes_the_smallest_filters():
    m = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 1, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([3.0, 0.1, 2.0, 0.2]).view(4, 1, 1, 1))
        m[2].weight.fill_(1.0)
    result = prune_(m, MagnitudeConfig(criterion="l1", channel_ratio=0.5), torch.randn(1, 1, 2, 2))
    assert result.plan.groups["0"] == [0, 2]


def test_activation_criterion_drops_dead_channels():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        m[0].weight[1].zero_()
        m[0].bias[1] = 0.0
    batches = [(torch.randn(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))]
    g = build_graph(m, batches[0][0]).group("0")
    scores = CRITERIA.get("activation")(g, ScoreContext(m, batches=batches))
    assert int(scores.argmin()) == 1 and float(scores[1]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_class_activation_statistics(dtype):
    m = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(8, 2)).to(dtype)
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    x = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)]).to(dtype)
    stats = activation_stats(m, build_graph(m, x).group("0"), [(x, torch.tensor([0, 1]))], num_classes=2)
    torch.testing.assert_close(stats["class_mean"], torch.tensor([[1.0, -1.0], [3.0, -3.0]], dtype=dtype))
    torch.testing.assert_close(stats["mean_abs"], torch.tensor([2.0, 2.0], dtype=dtype))


@pytest.mark.parametrize("which", ["macs_fraction", "params_fraction"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("round_to", [None, 8])
def test_cost_targets_are_met(which, steps, round_to):
    model = _resnet()
    result = prune_(model, MagnitudeConfig(**{which: 0.5}, steps=steps, probe=False, round_to=round_to), X)
    ratio = result.macs_fraction if which == "macs_fraction" else result.params_fraction
    # rounded: below the target by at most one multiple of one group (importance/rounding.py); on
    # ResNet-20 the largest is 8 channels of the 32-wide residual stream (~0.07 of the MACs)
    assert (0.44 if round_to is None else 0.42) <= ratio <= 0.5, ratio
    if round_to:  # every width a multiple of the one used (8, or halved to land within round_slack)
        used = result.metrics["rounding"]["multiple"]
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert used in (2, 4, 8) and all(w % used == 0 for w in widths), (used, widths)


@pytest.mark.parametrize("steps", [1, 3])
def test_iterative_channel_ratio_matches_one_step(steps):
    """Each step takes the share still due from every group's first width, so three steps end
    where one does, with or without rounding (rounding cannot hold a group back for good)."""
    for round_to in (None, 8):
        one, many = _resnet(), _resnet()
        prune_(one, MagnitudeConfig(channel_ratio=0.5, probe=False, round_to=round_to), X)
        prune_(many, MagnitudeConfig(channel_ratio=0.5, steps=steps, probe=False, round_to=round_to), X)
        assert [m.out_channels for m in one.modules() if isinstance(m, nn.Conv2d)] == \
            [m.out_channels for m in many.modules() if isinstance(m, nn.Conv2d)]


def test_round_to_keeps_multiples():
    model = _resnet()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.4, round_to=8, round_slack=None, probe=False), X)
    for name, keep in result.plan.groups.items():
        assert len(keep) % 8 == 0, (name, len(keep))
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths


def test_global_scope_respects_max_ratio():
    model = _resnet()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5, scope="global", max_ratio=0.6, probe=False), X)
    for name, keep in result.plan.groups.items():
        assert len(keep) >= result.plan.sizes[name] * 0.4 - 1e-9


def test_iterative_schedule_calls_back_between_steps():
    seen = []
    model = _resnet()
    from prunekit.methods.magnitude import magnitude_prune_
    magnitude_prune_(model, MagnitudeConfig(channel_ratio=0.5, steps=3, probe=False), X,
                     between_steps=lambda m, step: seen.append((step, sum(p.numel() for p in m.parameters()))))
    assert [s for s, _ in seen] == [1, 2, 3]
    assert seen[0][1] > seen[1][1] > seen[2][1]


def _grouped_chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 4, 1))


def test_iterative_pruning_leaves_whole_a_grouped_conv_pruned_to_one_group(tmp_path):
    """Step 2 keeps one of the grouped conv's two groups: it becomes a plain conv, whose input and
    output channels trace as groups the dense model does not have. Later steps leave them whole,
    so that the plan still names the dense model's channels and the model reloads."""
    from prunekit.surgery.persist import load_pruned, save_pruned

    x = torch.randn(2, 3, 8, 8)
    model = _grouped_chain()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.8, steps=3, round_to=None, probe=False), x)
    assert model[2].groups == 1 and len(result.plan.groups["0"]) == 1 and len(result.plan.groups["4"]) < 24
    again = load_pruned(_grouped_chain(), save_pruned(model, result.plan, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


class _Concat(nn.Module):
    """A narrow conv concatenated with a wide one: its channels score lowest, but one must stay."""

    def __init__(self):
        super().__init__()
        self.narrow, self.wide, self.head = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.narrow.weight.mul_(1e-3)

    def forward(self, x):
        return self.head(torch.cat([self.narrow(x), self.wide(x)], 1))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_no_producer_of_a_concat_is_emptied(scope):
    model, x = _Concat(), torch.randn(1, 3, 4, 4)
    prune_(model, MagnitudeConfig(channel_ratio=0.5, scope=scope, max_ratio=0.9, probe=False, round_to=None), x)
    assert model.narrow.out_channels == 1 and model.head.in_channels == 4
    assert model(x).shape == (1, 4, 4, 4)


def test_unprobed_pruning_that_breaks_the_forward_leaves_the_model_unchanged():
    from prunekit.core.errors import PruningError

    from prunekit.testing.toy_models import ShuffleOfWidthOne

    model, x = ShuffleOfWidthOne(), torch.randn(1, 3, 4, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="no longer runs.*probe=True"):
        prune_(model, MagnitudeConfig(channel_ratio=0.5, probe=False), x)
    assert model.a.out_channels == 2 and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    prune_(model, MagnitudeConfig(channel_ratio=0.5), x)  # probing keeps the hard-coded group whole
    assert model.a.out_channels == 2 and model(x).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("criterion", ["l2", "fpgm", "bn_scale"])
def test_nan_weights_are_refused_and_leave_the_model_unchanged(criterion):
    # A diverged training leaves NaN weights; a ranking of NaN scores would remove arbitrary channels.
    from prunekit.core.errors import PruningError

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    with torch.no_grad():
        model.conv2.weight[3, 0, 0, 0] = float("nan")
        model.bn2.weight[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg, x = MagnitudeConfig(criterion=criterion, channel_ratio=0.5), torch.zeros(1, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"parameter conv2.weight holds NaN or inf"):  # prune_ checks every weight
        prune_(model, cfg, x)
    with pytest.raises(ConfigError, match=r"parameter conv2.weight holds NaN or inf"):  # so does a prepared graph
        prepare_pruning(create_model("small_cnn", num_classes=10), x).prune_(model, cfg)
    graph = prepare_pruning(create_model("small_cnn", num_classes=10), x).graph
    with pytest.raises(PruningError, match=r"NaN or inf scores to \d+ of the \d+ channels of group"):
        score_groups(model, graph, cfg, None)  # the scores are checked too
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) or (torch.isnan(v).any() and torch.equal(after[k].isnan(), v.isnan()))
               for k, v in before.items())


def test_an_unreachable_target_on_a_masked_model_says_to_bake_the_masks():
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    for conv in (model.conv2, model.conv3):
        apply_mask(conv, "weight", unstructured_mask(conv.weight, 0.7))
    with pytest.raises(ConfigError, match=r"impossible target.*2 layer\(s\) carry weight masks \(conv2, conv3\).*bake"):
        prune_(model, MagnitudeConfig(macs_fraction=0.5), torch.zeros(1, 1, 8, 8))


def test_default_rounding_halves_its_multiple_rather_than_miss_the_target():
    """small_cnn (16-64 channels): multiples of 16 can only reach 0.438 of the MACs for a 0.5
    target; the default halves the multiple until the landing is within round_slack of the model."""
    x = torch.randn(1, 1, 8, 8)
    torch.manual_seed(0)
    strict = create_model("small_cnn", num_classes=10)
    r16 = prune_(strict, MagnitudeConfig(macs_fraction=0.5, round_slack=None, probe=False), x)
    assert r16.macs_fraction < 0.48 and r16.metrics["rounding"]["multiple"] == 16
    assert all(m.out_channels % 16 == 0 for m in strict.modules() if isinstance(m, nn.Conv2d))
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    r = prune_(model, MagnitudeConfig(macs_fraction=0.5, probe=False), x)
    assert 0.5 - 0.02 - 0.01 <= r.macs_fraction <= 0.5  # 2 is the smallest multiple tried
    assert r.metrics["rounding"]["multiple"] < 16 and "round_slack" in " ".join(r.metrics["notes"])


def test_rounding_gives_back_the_slack_of_its_last_pick():
    model = _resnet()
    r = prune_(model, MagnitudeConfig(macs_fraction=0.5, probe=False, round_to=8), X)
    assert 0.49 <= r.macs_fraction <= 0.5 and r.metrics["rounding"]["multiple"] == 8
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels != 10)
    default = prune_(_resnet(), MagnitudeConfig(macs_fraction=0.5, probe=False), X)  # 16, within round_slack
    assert 0.48 <= default.macs_fraction <= 0.5 and default.metrics["rounding"]["multiple"] == 16


def _aligned_to(model, multiple):
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels != 10]
    return all(w % multiple == 0 for w in widths), widths


def test_a_low_target_the_default_multiple_cannot_reach_falls_back_to_a_smaller_one():
    """resnet20 at 10% of the MACs: no width may go under one multiple of 16 (8 for 16-wide
    groups), so the default halves the multiple instead of refusing a target round_to=None meets."""
    model = _resnet()
    r = prune_(model, MagnitudeConfig(macs_fraction=0.1, probe=False), X)
    used = r.metrics["rounding"]["multiple"]
    assert r.macs_fraction <= 0.1 and used < 16 and _aligned_to(model, used)[0]
    assert "cannot be met" in " ".join(r.metrics["notes"])
    with pytest.raises(ConfigError, match="smallest multiple"):  # an explicit multiple and no fallback left
        from prunekit.importance.rounding import round_to_target
        g = build_graph(_resnet(), X)
        scores = {grp.name: torch.rand(grp.size) for grp in g.prunable_groups()}
        round_to_target(g, scores, {}, 16, lambda rem: 10**6 - sum(len(v) for v in rem.values()), target=0)


def test_a_multiple_that_is_no_power_of_two_falls_back_through_powers_of_two():
    """round_to=24 on resnet20 at channel_ratio=0.3: halving gave 12, 6, then multiples of 3
    (widths 12/24/45); the fallback goes 16, 8, 4, 2, and a group no wider than the multiple
    steps by the power of two below its width."""
    from prunekit.importance.select import group_multiple, smaller_multiple

    assert [smaller_multiple(m) for m in (24, 16, 1000, 3, 2)] == [16, 8, 512, 2, 1]
    assert group_multiple(16, 24) == 8 and group_multiple(64, 24) == 24
    model = _resnet()
    r = prune_(model, MagnitudeConfig(channel_ratio=0.3, round_to=24, probe=False), X)
    rec = r.metrics["rounding"]
    assert all(t["multiple"] in (24, 16, 8, 4, 2) for t in rec["tried"]), rec
    assert rec["multiple"] in (24, 16, 8, 4, 2) and _aligned_to(model, min(rec["multiple"], 8))[0]


def test_channel_ratio_with_the_default_rounding_removes_about_the_share_asked():
    for ratio, scope, steps in ((0.1, "local", 1), (0.25, "local", 1), (0.5, "global", 1), (0.5, "global", 3)):
        model, plain = _resnet(), _resnet()
        r = prune_(model, MagnitudeConfig(channel_ratio=ratio, scope=scope, steps=steps, probe=False), X)
        u = prune_(plain, MagnitudeConfig(channel_ratio=ratio, scope=scope, probe=False, round_to=None), X)
        assert _aligned_to(model, r.metrics["rounding"]["multiple"])[0]
        # one step: within round_slack of the unrounded share (in channels); 3 global steps re-rank
        # channels between steps, so only the MACs are compared
        if steps == 1:
            groups = lambda m: sum(g.size for g in build_graph(m, X).prunable_groups())
            assert abs(groups(model) - groups(plain)) <= 0.02 * groups(_resnet()) + 1, (ratio, scope)
        assert abs(r.macs_fraction - u.macs_fraction) < 0.1, (ratio, scope, steps, r.macs_fraction, u.macs_fraction)


def test_a_group_held_at_its_cap_keeps_an_aligned_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 48, 3), nn.ReLU(), nn.Conv2d(48, 10, 1))
    r = prune_(model, MagnitudeConfig(macs_fraction=0.6, max_ratio=0.3, probe=False), torch.randn(1, 3, 12, 12))
    used = r.metrics["rounding"]["multiple"]
    assert r.macs_fraction <= 0.6 and model[0].out_channels % used == 0 and model[2].out_channels % used == 0


@pytest.mark.parametrize("where", ["fc.bias", "bn1.running_var", "inputs"])
def test_nan_anywhere_is_refused_whatever_the_criterion_reads(where):
    """A NaN the criterion never reads (a classifier bias, a running variance, the inputs) still makes
    every output NaN: prune_ refuses it before any method runs."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    x = torch.zeros(1, 1, 8, 8)
    target = x[0, 0, 0] if where == "inputs" else model.state_dict()[where]
    with torch.no_grad():
        target[0] = float("nan")
    with pytest.raises(ConfigError, match="inputs hold NaN" if where == "inputs" else f"{where} holds NaN"):
        prune_(model, MagnitudeConfig(channel_ratio=0.5), x)


def test_a_method_called_without_what_it_needs_is_one_config_error():
    from prunekit.methods.slr import SLRConfig

    with pytest.raises(ConfigError, match="SLRConfig: missing a required argument: 'train_loader'"):
        prune_(create_model("small_cnn", num_classes=10), SLRConfig(sparsity=0.5), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("name, shape", [("small_cnn", (1, 1, 8, 8)), ("resnet20", (1, 3, 32, 32))])
def test_rounded_channel_ratio_lands_within_the_slack_on_either_side(name, shape):
    """channel_ratio=0.4 with the default round_to=16: rounding to the nearest multiple removed 50%
    (16 of 32) and was accepted because only falling short was checked; now the share removed from
    the prunable groups is within round_slack of the unrounded share either way, and the note says
    which way."""
    torch.manual_seed(0)
    model, x = create_model(name, num_classes=10), torch.randn(shape)
    sizes = {g.name: g.size for g in build_graph(model, x).prunable_groups()}
    result = prune_(model, MagnitudeConfig(channel_ratio=0.4), x)
    after = {g.name: g.size for g in build_graph(model, x).groups if g.name in sizes}
    removed = sum(sizes[n] - after[n] for n in sizes) / sum(sizes.values())
    due = sum(int(0.4 * s) for s in sizes.values()) / sum(sizes.values())  # unrounded: floor per group
    assert abs(removed - due) <= 0.02 + 1e-9, (removed, due)
    assert "than asked" in result.metrics["notes"][0]


def test_a_kept_multiple_beyond_the_slack_is_said():
    """Every multiple lands further than round_slack from macs_fraction=0.5 on the digits CNN:
    2 is kept (it meets the target) and the note says it is beyond the slack too."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    result = prune_(model, MagnitudeConfig(macs_fraction=0.5), torch.randn(1, 1, 8, 8))
    tried = result.metrics["rounding"]["tried"]
    assert result.metrics["rounding"]["multiple"] == 2 and all(t["shortfall"] > 0.02 for t in tried)
    assert "Multiples of 2 still miss it by 2.5%" in result.metrics["notes"][0]


def test_round_to_two_beyond_the_slack_is_said():
    """round_to=2 has no smaller multiple to fall back to: kept 0.025 below macs_fraction=0.5 on the
    digits CNN, further than round_slack, which the notes say as they do for a halved multiple."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    result = prune_(model, MagnitudeConfig(macs_fraction=0.5, round_to=2), torch.randn(1, 1, 8, 8))
    assert result.metrics["rounding"]["multiple"] == 2 and result.metrics["rounding"]["tried"][-1]["shortfall"] > 0.02
    assert "multiples of 2 miss the target by 2.5% of the model" in " ".join(result.metrics.get("notes", []))


@pytest.mark.parametrize("scope", ["local", "global"])
def test_max_ratio_is_a_share_of_the_width_before_the_first_step(scope):
    """Each step's cap counts what earlier steps removed: three steps take no group past
    max_ratio of its original width, and a target one step cannot reach is not reached in three."""
    first = {g.name: g.size for g in build_graph(_resnet(), X).prunable_groups()}
    for steps in (1, 3):
        model = _resnet()
        with pytest.warns(UserWarning, match="capped at max_ratio"):
            result = prune_(model, MagnitudeConfig(channel_ratio=0.8, max_ratio=0.5, steps=steps, scope=scope,
                                                   probe=False, round_to=None), X)
        kept = {n: len(result.plan.groups.get(n, range(s))) for n, s in first.items()}
        assert all(kept[n] >= s - int(0.5 * s) for n, s in first.items()), (steps, kept)
        after = {g.name: g.size for g in build_graph(model, X).groups if g.name in first}
        assert after == kept
    for steps in (1, 3):
        with pytest.raises(ConfigError, match="impossible target"):
            prune_(_resnet(), MagnitudeConfig(macs_fraction=0.2, max_ratio=0.5, steps=steps, probe=False), X)


class _EqualWidths(nn.Module):
    """Two branches whose widths the forward requires equal, in Python the trace cannot see."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.weight[:4].mul_(0.01)

    def forward(self, x):
        p, q = self.a(x), self.b(x)
        if p.shape[1] != q.shape[1]:
            raise ValueError("widths differ")
        return self.c(p) + self.d(q)


@pytest.mark.parametrize("probe", [True, False])
def test_a_pruned_model_that_fails_is_refused_with_advice_that_fits_the_probe_setting(probe):
    from prunekit.core.errors import PruningError

    torch.manual_seed(0)
    model, x = _EqualWidths(), torch.randn(1, 3, 4, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = MagnitudeConfig(channel_ratio=0.5, scope="global", normalizer="none", round_to=None, probe=probe)
    with pytest.raises(PruningError, match="no longer runs.*widths differ.*left unchanged") as err:
        prune_(model, cfg, x)
    assert ("Prune with probe=True" in str(err.value)) is not probe  # probing was on: no advice to turn it on
    assert "ignore" in str(err.value)
    assert model.a.out_channels == 8 and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("which", ["macs_fraction", "params_fraction"])
def test_rounding_shortfall_is_a_share_of_the_model_given_at_every_step(which):
    """round_slack is a share of the model handed in: the last step's recorded shortfall is the
    final landing's distance from the target in the original model's MACs (params), recounted."""
    model = _resnet()
    result = prune_(model, MagnitudeConfig(**{which: 0.5}, steps=4, probe=False), X)
    before, after = count_cost(_resnet(), X), count_cost(model, X)
    kind = "macs" if which == "macs_fraction" else "params"
    landed = 0.5 - getattr(after, kind) / getattr(before, kind)
    rounding = result.metrics["rounding"]
    last = [t for t in rounding["tried"] if t["multiple"] == rounding["multiple"] and "shortfall" in t][-1]
    assert last["shortfall"] == pytest.approx(landed, abs=1e-6), (last, landed)


class _AuxHead(nn.Module):
    """A deep-supervision head that runs in training mode only (GoogLeNet's aux_logits)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc, self.aux = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), \
            nn.Linear(8, 4), nn.Linear(16, 4)

    def forward(self, x):
        f = torch.relu(self.a(x))
        y = self.fc(torch.relu(self.b(f)).mean((2, 3)))
        return (y, self.aux(f.mean((2, 3)))) if self.training else y


def test_a_branch_only_training_runs_is_pruned_with_the_channels_it_reads():
    """The trace ran in eval mode only: the auxiliary head kept reading 16 channels, and the first
    training step after pruning failed (torchvision's GoogLeNet with aux_logits=True did so). The
    training-mode forward is traced too; its MACs are not inference's."""
    torch.manual_seed(0)
    model, x = _AuxHead().train(), torch.randn(2, 3, 8, 8)
    before = count_cost(model, x).macs
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)
    assert model.aux.in_features == model.a.out_channels == 8 and model.training
    model(x)[1].sum().backward()  # a training step's forward and backward run
    assert result.cost_before.macs == before == 3 * 9 * 16 * 64 + 16 * 9 * 8 * 64 + 8 * 4


class _AuxOffTheGraph(_AuxHead):
    """The auxiliary head reads its input through NumPy, where no trace follows it."""

    def forward(self, x):
        f = torch.relu(self.a(x))
        y = self.fc(torch.relu(self.b(f)).mean((2, 3)))
        return (y, self.aux(torch.from_numpy(f.mean((2, 3)).detach().numpy()))) if self.training else y


def test_a_training_forward_that_breaks_after_pruning_is_refused_before_the_model_changes():
    torch.manual_seed(0)
    model, x = _AuxOffTheGraph().train(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="runs in eval mode but not in training mode.*aux_logits=False"):
        prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


def test_a_model_whose_training_forward_fails_before_pruning_too_is_pruned():
    """BatchNorm1d cannot train on one sample: the dense model fails in training mode as well, so
    that failure says nothing about the pruning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
                          nn.BatchNorm1d(8), nn.Linear(8, 2))
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), torch.randn(1, 3, 8, 8))
    assert result.cost_after.macs < result.cost_before.macs


def test_a_channel_ratio_on_a_masked_model_says_the_masks_kept_channels():
    """macs/params targets named the masks when out of reach; channel_ratio went on silently with
    the other groups (or with none)."""
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    from prunekit.models import create_model
    model = create_model("small_cnn", num_classes=10)
    apply_mask(model.conv3, "weight", unstructured_mask(model.conv3.weight, 0.5))
    r = prune_(model, MagnitudeConfig(channel_ratio=0.5), torch.zeros(1, 1, 8, 8))
    (note,) = [n for n in r.metrics["notes"] if "weight masks" in n]
    assert "1 layer(s) carry weight masks (conv3)" in note and "bake them first" in note
    plain = prune_(create_model("small_cnn", num_classes=10), MagnitudeConfig(channel_ratio=0.5), torch.zeros(1, 1, 8, 8))
    assert not any("weight masks" in n for n in plain.metrics.get("notes", []))


def test_latency_settings_a_call_never_uses_are_noted():
    """method.latency.device=cuda beside a MACs target passed without a word (nothing is timed)."""
    r = prune_(_resnet(), MagnitudeConfig(macs_fraction=0.7, latency={"device": "cuda"}, probe=False), X)
    assert any("latency={'device': 'cuda'} was not used: nothing was timed" in n for n in r.metrics["notes"])
    r = prune_(_resnet(), MagnitudeConfig(macs_fraction=0.7, probe=False), X)
    assert not any("was not used" in n for n in r.metrics.get("notes", []))
