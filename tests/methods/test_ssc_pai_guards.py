"""SSC and the pruning-at-initialisation methods on models with layers they must leave alone: a
conv pruned with torch.nn.utils.prune, a module left out with `ignore` because the tracer has no
rule for an op inside it."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

import prunekit
from prunekit.core.errors import ConfigError
from prunekit.methods import prune_
from prunekit.methods.pai import SNIPConfig, SynFlowConfig
from prunekit.methods.ssc import SSCConfig

X = torch.randn(2, 3, 8, 8)
BATCHES = [(X, torch.tensor([0, 1]))]


class Warp(nn.Module):
    """A conv followed by grid_sample, an op prunekit has no channel rule for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        theta = torch.eye(2, 3).unsqueeze(0).expand(x.shape[0], 2, 3)
        return F.grid_sample(self.conv(x), F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)


def _net(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), middle, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _torch_pruned() -> nn.Module:
    net = _net(nn.Conv2d(8, 8, 3, padding=1))
    torch_prune.l1_unstructured(net[2], "weight", amount=0.5)
    return net


def test_ssc_leaves_a_conv_pruned_with_torch_prune_dense_and_the_model_runs():
    net = _torch_pruned()
    result = prune_(net, SSCConfig(groups=1, spatial_period=2), X)
    assert result.metrics["converted"] == ["4"] and "torch.nn.utils.prune" in result.metrics["left_dense"]["2"]
    net(X)  # the copied pruning hook read weight_mask from the SSC layer: every call failed


@pytest.mark.parametrize("config", [SNIPConfig(sparsity=0.5), SynFlowConfig(sparsity=0.5)])
def test_pai_refuses_a_weight_torch_prune_computes_and_leaves_the_model_as_it_was(config):
    net = _torch_pruned()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=r"layer '2' was pruned with torch.nn.utils.prune .*prune.remove"):
        prune_(net, config, X, batches=BATCHES)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("config", [SSCConfig(groups=1, spatial_period=2, ignore=["2"]),
                                    SNIPConfig(sparsity=0.5, ignore=["2"])], ids=["ssc", "snip"])
def test_a_module_left_out_for_an_op_without_a_rule_is_counted_saved_and_reloaded(config, tmp_path):
    """The counts traced the whole model without the ignore list (the op without a rule raised the
    error whose advice is this ignore list), and the plan did not record it for the reload."""
    net = _net(Warp())
    kwargs = {} if isinstance(config, SSCConfig) else {"batches": BATCHES}
    result = prune_(net, config, X, **kwargs)
    assert result.cost_before.macs == prunekit.count_cost(_net(Warp()), X, ["2"]).macs
    path = os.path.join(tmp_path, "net.safetensors")
    prunekit.save_pruned(net, result.plan, path)
    fresh = prunekit.load_pruned(_net(Warp()), path)
    assert torch.allclose(fresh.eval()(X), net.eval()(X))


@pytest.mark.parametrize("seed", ["a", 1.5, None, -1])
def test_a_seed_that_is_not_a_whole_number_is_one_config_error(seed):
    from prunekit.methods.pai import RandomInitConfig

    with pytest.raises(ConfigError, match="seed="):
        RandomInitConfig(sparsity=0.5, seed=seed)


@pytest.mark.parametrize("value", ["false", "nope", 1, 0.0])
def test_a_flag_given_as_text_or_a_number_is_refused(value):
    """A quoted "false" is a non-empty string, which Python reads as true: the stem was kept."""
    for key in ("keep_first", "fallback"):
        with pytest.raises(ConfigError, match=f"{key}=.* must be true or false"):
            SSCConfig.from_dict({key: value})


@pytest.mark.parametrize("pattern", ["cross", "checker"])
def test_a_patterned_preset_follows_the_pattern_at_the_table_reductions_too(pattern):
    """The table's presets are for the full pattern: cross at reduction=4 gave 6.0x and 4.01 gave 4.5x."""
    from prunekit.methods.ssc import preset_for

    for r in (2, 4, 8, 16):
        assert preset_for(r, "het", pattern) == preset_for(r + 1e-9, "het", pattern)


def test_read_only_scores_still_read_a_layer_pruned_with_torch_prune():
    """Only the methods that mask weights refuse it; magnitude_scores reads its effective weight."""
    from prunekit.importance.elements import magnitude_scores

    net = _torch_pruned()
    scores = magnitude_scores(net)
    assert int((scores["2.weight"] == 0).sum()) == int((net[2].weight_mask == 0).sum())


@pytest.mark.parametrize("config", [SNIPConfig(sparsity=0.5), SynFlowConfig(sparsity=0.5, iterations=2)],
                         ids=["snip", "synflow"])
def test_pai_on_an_ssc_model_is_refused_unless_its_ssc_layers_are_ignored(config):
    """The SSC layers' weights are not scored: pruning at initialisation refuses a model that holds
    them (the sparsity would fall on the stem and classifier alone) and masks the rest only when
    they are put in `ignore`."""
    from prunekit.layers.ssc import SSCConv2d
    from prunekit.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=2)
    x = torch.randn(2, 3, 32, 32)
    prune_(model, SSCConfig(reduction=4), x[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x, torch.tensor([0, 1]))]
    with pytest.raises(ConfigError, match=r"18 SSC layer\(s\).*put those layers in `ignore`.*left unchanged"):
        prune_(model, config, x[:1], batches=batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ssc = [n for n, m in model.named_modules() if isinstance(m, SSCConv2d)]
    result = prune_(model, config.replace(ignore=ssc), x[:1], batches=batches)
    masked = set(result.metrics["layer_density"])
    assert "conv1" in masked and "fc" in masked and not masked & set(ssc)


def test_snip_without_calibration_batches_names_the_cli_setting():
    with pytest.raises(ConfigError, match=r"got no batch.*calibration_batches.*1 or more"):
        prune_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), SNIPConfig(sparsity=0.5), X,
               batches=[])


def test_when_no_conv_converts_the_error_says_why_for_each():
    """The message named no reason ('no convs') for a stem kept dense, 1x1 convs and layers that
    are SSC layers already."""
    from prunekit.core.errors import PruningError
    from prunekit.models import create_model

    with pytest.raises(PruningError, match=r"0: the first conv is kept dense \(keep_first=True\); "
                                           r"1: a 1x1 conv \(never converted\)"):
        prune_(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)), SSCConfig(), torch.randn(1, 3, 4, 4))
    model, x = create_model("resnet20", num_classes=2), torch.randn(1, 3, 32, 32)
    prune_(model, SSCConfig(reduction=4), x)
    with pytest.raises(PruningError, match=r"18 layer\(s\) are SSC layers already .*start from the dense model"):
        prune_(model, SSCConfig(reduction=4), x)


def test_both_holders_of_a_tied_conv_weight_are_listed_as_left_dense():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b, self.c = (nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(4))
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(self.a(self.stem(x))))

    result = prune_(Tied(), SSCConfig(groups=1, spatial_period=4), torch.randn(1, 3, 8, 8))
    assert result.metrics["left_dense"] == {"a": "shares its weight with b", "b": "shares its weight with a"}
    assert result.metrics["converted"] == ["c"]


def test_the_commonest_reason_no_conv_converts_comes_first():
    """A depthwise network: the reason that stops every 3x3 (grouped) came after eight others and
    was hidden under 'and 44 more'."""
    from prunekit.core.errors import PruningError

    blocks = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(12):
        blocks += [nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)]
    with pytest.raises(PruningError) as err:
        prune_(nn.Sequential(*blocks), SSCConfig(reduction=4), torch.randn(1, 3, 8, 8))
    text = str(err.value)
    assert "take the SSC preset" in text
    reasons = text.split("'version': 1}: ")[1]
    assert reasons.startswith("a grouped conv (groups=16) (12 convs: 1, 3, 5, ...)"), reasons
    assert "(12 convs: 2, 4, 6, ...)" in reasons and reasons.endswith("0: the first conv is kept dense (keep_first=True)")


def test_padding_same_and_valid_convert_as_the_numbers_they_stand_for():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding="same"), nn.ReLU(),
                          nn.Conv2d(16, 16, 5, padding="same", dilation=2), nn.ReLU(), nn.Conv2d(16, 16, 3, padding="valid"))
    x = torch.randn(2, 3, 12, 12)
    dense = copy.deepcopy(model)
    r = prune_(model, SSCConfig(reduction=2, init="project"), x)
    assert set(r.metrics["converted"]) == {"2", "4", "6"} and not r.metrics["left_dense"]
    for i in (2, 4, 6):  # each layer equals its dense conv with the weights off the support zeroed
        layer, conv = model[i], copy.deepcopy(dense[i])
        with torch.no_grad():
            conv.weight.mul_(layer.support())
        h = torch.randn(2, 16, 12, 12)
        torch.testing.assert_close(layer(h), conv(h), atol=1e-5, rtol=1e-5)


def test_a_forward_reading_a_converted_convs_weight_is_one_error_naming_it():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), *(nn.Conv2d(16, 16, 3, padding=1) for _ in "ab")

        def forward(self, x):
            x = x.to(self.c2.weight.dtype)
            return self.c3(self.c2(torch.relu(self.c1(x))))

    from prunekit.core.errors import PruningError

    model = ReadsWeight()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"reads 'weight' of a conv SSC converts.*ignore=\[...\] \(converted: c2, c3\)"):
        prune_(model, SSCConfig(reduction=4), X)
    assert type(model.c2) is nn.Conv2d and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r = prune_(model, SSCConfig(reduction=4, ignore=["c2"]), X)
    assert list(r.metrics["converted"]) == ["c3"]


@pytest.mark.parametrize("config", [SNIPConfig(sparsity=0.5), SynFlowConfig(sparsity=0.5, iterations=2),
                                    SNIPConfig(sparsity=0.5, level="channel")])
def test_gradient_scores_inside_inference_mode_are_one_config_error(config):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 64, 2))
    before = copy.deepcopy(model.state_dict())
    with torch.inference_mode(), pytest.raises(ConfigError, match="torch.inference_mode\\(\\).*outside that block"):
        prune_(model, config, X, batches=BATCHES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # no_grad is fine: the scores turn autograd back on
        prune_(model, config, X, batches=BATCHES)


def test_channel_level_pai_on_a_masked_model_names_the_masks():
    from prunekit.core.errors import PruningError

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 64, 2))
    prune_(model, SNIPConfig(sparsity=0.5), X, batches=BATCHES)
    with pytest.raises(PruningError, match=r"^no channel group can change width: 3 layer\(s\) carry weight masks "
                                           r"\(0, 2, 4\).*bake them first") as err:
        prune_(model, SNIPConfig(sparsity=0.5, level="channel"), X, batches=BATCHES)
    assert "SSC" not in str(err.value)
