"""Pruning at initialisation: exact sparsity, masks equal to hand-computed SNIP selections,
masks that survive training and save/reload, channel-level removal, errors."""
import copy

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.importance.elements import grasp_scores, select_element_masks, snip_scores
from prunekit.methods import pai, prune_
from prunekit.methods.pai import GraSPConfig, RandomInitConfig, SNIPConfig, SynFlowConfig
from prunekit.surgery.masks import get_mask, masked_modules
from prunekit.surgery.persist import load_pruned, save_pruned


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


X = torch.randn(2, 3, 6, 6)


def _batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


CONFIGS = [SNIPConfig, GraSPConfig, lambda **kw: SynFlowConfig(iterations=5, **kw), RandomInitConfig]


@pytest.mark.parametrize("make", CONFIGS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_sparsity(make, scope):
    model = _net()
    r = prune_(model, make(sparsity=0.7, scope=scope), X, batches=_batches())
    masks = {k: get_mask(model.get_submodule(k), "weight") for k in ("0", "3", "7")}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert total == r.metrics["weights_total"] == 8 * 3 * 9 + 8 * 8 * 9 + 32
    if scope == "global":
        assert total - kept == int(0.7 * total + 0.5)
    else:
        assert all(m.numel() - int(m.sum()) == int(0.7 * m.numel() + 0.5) for m in masks.values())
    assert r.metrics["weights_kept"] == kept and r.metrics["params_nonzero"] == r.cost_after.params - (total - kept)


def test_snip_masks_equal_a_hand_computation():
    """One Linear layer with cross-entropy: dL/dW = (softmax(Wx + b) - onehot(y))^T x / n."""
    torch.manual_seed(3)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with torch.no_grad():
        p = torch.softmax(x @ lin.weight.T + lin.bias, 1)
        grad = (p - nn.functional.one_hot(y, 3).float()).T @ x / 10
        hand = (lin.weight * grad).abs()
    want = select_element_masks({"weight": hand}, 0.6)["weight"]
    model = nn.Sequential(lin)
    prune_(model, SNIPConfig(sparsity=0.6), x[:1], batches=[(x, y)])
    assert torch.equal(get_mask(model[0], "weight"), want)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_grasp_masks_equal_a_hand_computation(temperature):
    """One Linear layer, L = mean cross-entropy of (Wx + b) / T. With p = softmax(z / T):
    g = dL/dW = (p - onehot(y))^T x / (n T), and H g = sum_i J_i (g x_i) x_i^T / (n T^2), J_i = diag(p_i) - p_i p_i^T.
    GraSP keeps the largest W * (H g)."""
    torch.manual_seed(3)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with torch.no_grad():
        w, t = lin.weight.double(), temperature
        xd = x.double()
        p = torch.softmax((xd @ w.T + lin.bias.double()) / t, 1)
        g = (p - nn.functional.one_hot(y, 3).double()).T @ xd / (10 * t)
        hg = torch.zeros_like(w)
        for i in range(10):
            jac = torch.diag(p[i]) - torch.outer(p[i], p[i])
            hg += torch.outer(jac @ (g @ xd[i]), xd[i]) / (10 * t * t)
        hand = (w * hg).float()
    want = select_element_masks({"weight": hand}, 0.6)["weight"]
    model = nn.Sequential(lin)
    prune_(model, GraSPConfig(sparsity=0.6, temperature=temperature), x[:1], batches=[(x, y)])
    assert torch.equal(get_mask(model[0], "weight"), want)
    torch.manual_seed(3)  # the same initial weights
    other = nn.Sequential(nn.Linear(5, 3))
    prune_(other, SNIPConfig(sparsity=0.6), x[:1], batches=[(x, y)])
    assert not torch.equal(get_mask(other[0], "weight"), want)  # the two criteria select differently here


def test_masks_survive_training_and_reload(tmp_path):
    model = _net()
    r = prune_(model, SynFlowConfig(sparsity=0.8, iterations=10), X)
    zero = {k: ~get_mask(model.get_submodule(k), "weight") for k in ("0", "3", "7")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for xb, yb in _batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    for k, z in zero.items():
        assert torch.equal(~get_mask(model.get_submodule(k), "weight"), z)
        assert float(model.get_submodule(k).weight.detach()[z].abs().max()) == 0.0
        assert float(model.get_submodule(k).weight.detach()[~z].abs().min()) > 0.0
    model.eval()
    path = save_pruned(model, r.plan, tmp_path / "pai.safetensors")
    again = load_pruned(_net(), path).eval()
    torch.testing.assert_close(again(X), model(X), atol=0, rtol=0)
    assert torch.equal(get_mask(again[3], "weight"), get_mask(model[3], "weight"))


def test_synflow_default_is_iterative_with_100_rounds():
    assert SynFlowConfig().iterations == 100
    one, many = _net(), _net()
    prune_(one, SynFlowConfig(sparsity=0.95, iterations=1), X)
    prune_(many, SynFlowConfig(sparsity=0.95, iterations=20), X)
    # the iterative schedule changes which weights survive at high sparsity
    assert not all(torch.equal(get_mask(one[i], "weight"), get_mask(many[i], "weight")) for i in (0, 3, 7))


def test_channel_level_removes_channels():
    model = _net()
    r = prune_(model, SNIPConfig(sparsity=0.5, level="channel", scope="layer"), X, batches=_batches())
    assert model[0].out_channels == 4 and model[3].out_channels == 4
    assert r.cost_after.params < r.cost_before.params


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_level_sparsity_above_0_9_is_not_capped(scope):
    """19 of 20 channels at sparsity 0.95 (the selector's default max_ratio=0.9 left 2 of 20)."""
    model = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 20, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(20 * 16, 4))
    r = prune_(model, RandomInitConfig(sparsity=0.95, level="channel", scope=scope), torch.randn(2, 3, 4, 4))
    assert r.metrics["channels_removed"] == {"0": 19, "2": 19}
    assert model[0].out_channels == model[2].out_channels == 1


def test_errors():
    with pytest.raises(ConfigError, match="calibration"):
        prune_(_net(), SNIPConfig(), X)
    with pytest.raises(ConfigError, match="sparsity"):
        GraSPConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="iterations"):
        SynFlowConfig(iterations=0)
    with pytest.raises(ConfigError, match="level"):
        RandomInitConfig(level="kernel")
    with pytest.raises(ConfigError, match="score_mode='train' applies to the scores computed on data"):
        SynFlowConfig(score_mode="train")
    with pytest.raises(ConfigError, match="score_mode"):
        SNIPConfig(score_mode="batch")


@pytest.mark.parametrize("make", [SNIPConfig, GraSPConfig])
@pytest.mark.parametrize("level", ["element", "channel"])
def test_score_mode_train_selects_on_batch_statistics_and_leaves_the_running_ones(make, level, monkeypatch):
    """score_mode="train" prunes by the training-mode scores (BatchNorm on the batch's statistics)
    and the model's running statistics and flags are left as they were; at element level the masks
    are exactly the selection of those scores."""
    model = _net()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    batches = _batches()
    cfg = make(sparsity=0.6, level=level, score_mode="train")
    score = snip_scores if make is SNIPConfig else grasp_scores
    seen = []

    def spy(*args, mode="eval", **kwargs):
        seen.append(mode)
        return score(*args, mode=mode, **kwargs)
    monkeypatch.setattr(pai, score.__name__, spy)
    want = score(copy.deepcopy(model), batches[:1], mode="train")
    other = select_element_masks(score(copy.deepcopy(model), batches[:1], mode="eval"), 0.6)
    prune_(model, cfg, X, batches=batches)
    assert model.training
    if level == "element":
        masks = select_element_masks(want, 0.6)
        assert any(not torch.equal(masks[k], other[k]) for k in masks)  # the mode decides
        for k in ("0", "3", "7"):
            assert torch.equal(get_mask(model.get_submodule(k), "weight"), masks[f"{k}.weight"])
        for n, b in model.named_buffers():
            if n in buffers:
                torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)
    else:  # channels are removed; the scores they were ranked by came from the training mode
        assert model[0].out_channels < 8 and seen == ["train"]


@pytest.mark.parametrize("recipe", ["pai_resnet20_cifar10", "pai_resnet56_cifar10", "pai_vgg16_cifar10"])
@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "random_init"])
def test_the_pai_recipes_switch_criterion_with_method_name_alone(recipe, method):
    from pathlib import Path

    from prunekit.cli.recipe import load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / f"{recipe}.yaml"
    parsed, _ = load_recipe(str(path), [f"method.name={method}"])
    assert parsed.method.name == method and 0 < parsed.method.config.sparsity < 1


def test_element_masks_are_applied_only_once_the_plan_can_be_made():
    from prunekit.core.errors import PruningError
    from prunekit.methods import prune_
    from prunekit.methods.pai import RandomInitConfig

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3)

        def forward(self, x):
            return self.conv1(x)

    model = Keyword()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="positional tensor inputs only"):
        prune_(model, RandomInitConfig(sparsity=0.5), {"x": torch.randn(1, 1, 8, 8)})
    assert model.state_dict().keys() == before.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c3.weight = self.c2.weight
        self.o = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.o(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))))


@pytest.mark.parametrize("make", [lambda: RandomInitConfig(sparsity=0.5), lambda: SynFlowConfig(sparsity=0.5, level="channel"),
                                  lambda: __import__("prunekit").MagnitudeConfig(channel_ratio=0.5)])
def test_tied_weights_are_named_not_untied(make):
    """Masks or scores kept per name would untie a shared tensor; SSC leaves such convs dense."""
    from prunekit.core.errors import PruningError

    with pytest.raises(PruningError, match=r"c2.weight (and|=) c3.weight"):
        prune_(_Tied(), make(), torch.randn(2, 3, 8, 8))
    prune_(_Tied(), RandomInitConfig(sparsity=0.5, ignore=["c2", "c3"]), torch.randn(2, 3, 8, 8))  # left out: fine


class _TiedHead(nn.Module):
    """A language-model head tied to the token embedding: the embedding is no conv or Linear, so
    only the head's name of the tensor is scored."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.mid(self.emb(t))))


def test_a_weight_tied_to_a_tensor_that_is_not_scored_is_named_not_masked():
    """A mask on the head would leave the embedding reading the whole tensor: the masked entries
    are still used, and params_nonzero would count them as gone."""
    from prunekit.core.errors import PruningError

    model, t = _TiedHead(), torch.randint(0, 10, (2, 5))
    with pytest.raises(PruningError, match=r"head.weight .*emb.weight.*ignore=\['head'\]"):
        prune_(model, RandomInitConfig(sparsity=0.5), t)
    assert not masked_modules(model)
    r = prune_(model, RandomInitConfig(sparsity=0.5, ignore=["head"]), t)
    assert r.metrics["params_nonzero"] == 80 + 32 + 8  # the shared tensor whole, half of mid's weights, mid's bias


def test_ssc_leaves_convs_with_tied_weights_dense():
    from prunekit.core.errors import PruningError
    from prunekit.methods.ssc import SSCConfig

    with pytest.raises(PruningError, match="c2: shares its weight with c3; c3: shares its weight with c2"):
        prune_(_Tied(), SSCConfig(), torch.randn(2, 3, 8, 8))


def test_a_second_mask_keeps_what_the_first_one_removed():
    """PaI on an already masked model: the weights hidden before stay hidden (they go first), the
    new sparsity is exact, and a sparsity that would bring some back is
    refused with the model's masks left as they were."""
    from prunekit.surgery.masks import get_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    x = torch.randn(2, 3, 6, 6)
    prune_(model, RandomInitConfig(sparsity=0.5, seed=1), x)
    first = [get_mask(model[i], "weight").clone() for i in (0, 3)]
    prune_(model, RandomInitConfig(sparsity=0.8, seed=2), x)
    second = [get_mask(model[i], "weight").clone() for i in (0, 3)]
    assert all(not bool((b & ~a).any()) for a, b in zip(first, second))  # nothing came back
    assert [int(m.sum()) for m in second] == [216 - 173, 512 - 410]  # exact per layer (the default scope)
    with pytest.raises(ConfigError, match="would bring back .* masks only grow"):
        prune_(model, RandomInitConfig(sparsity=0.3, seed=3), x)
    assert all(torch.equal(get_mask(model[i], "weight"), m) for i, m in zip((0, 3), second))


def test_a_channel_sparsity_out_of_reach_is_said_not_hidden():
    """0.99 of 2 x 20 channels globally: each group keeps one, so 38 of 40 go (0.95); the result
    says so in its notes and a warning, and reports the sparsity reached."""
    model = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 20, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(20 * 16, 4))
    with pytest.warns(UserWarning, match="less than sparsity=0.99"):
        r = prune_(model, RandomInitConfig(sparsity=0.99, level="channel", scope="global"), torch.randn(2, 3, 4, 4))
    assert r.metrics["channel_sparsity"] == 38 / 40 and "38 of 40" in r.metrics["notes"][0]
    r = prune_(nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 20, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(20 * 16, 4)),
               RandomInitConfig(sparsity=0.5, level="channel", scope="global"), torch.randn(2, 3, 4, 4))
    assert r.metrics["channel_sparsity"] == 0.5 and "notes" not in r.metrics


def test_channel_pruning_after_masks_with_ignored_layers_reloads(tmp_path):
    """`ignore` only chose which weights the masks cover: the element-level plan must not carry
    it as a trace ignore list, or a channel pruning composed after it replays on a graph where
    the ignored layers' channels cannot be removed."""
    from prunekit.methods.magnitude import MagnitudeConfig

    model = _net().eval()
    first = prune_(model, RandomInitConfig(sparsity=0.5, ignore=["0", "3"]), X)  # masks the Linear only
    second = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), X)
    assert list(second.plan.groups) == ["0"]  # between the two ignored convs
    path = save_pruned(model, first.plan.compose(second.plan), tmp_path / "m.safetensors")
    torch.testing.assert_close(load_pruned(_net().eval(), path)(X), model(X), atol=0, rtol=0)


def _nonzero_recount(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Parameters (conv/Linear weights: their nonzero entries) and the MACs of nonzero conv/Linear
    weights, counted from the model."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("weight", "original")))
    params += sum(p.numel() for m in model.modules() if not isinstance(m, (nn.Conv2d, nn.Linear))
                  for n, p in m.named_parameters(recurse=False) if n == "weight")
    params += sum(int((m.weight != 0).sum()) for m in layers)
    macs = []
    hooks = [m.register_forward_hook(lambda m, _i, out: macs.append(
        int((m.weight != 0).sum()) * (out[0, 0].numel() if out.dim() > 2 else 1)))
        for m in layers]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return params, sum(macs)


def test_nonzero_views_count_the_masks_of_ignored_layers_from_an_earlier_pass():
    """A second pass that ignores layers a first pass masked: params_nonzero and macs_nonzero
    still count those layers' hidden weights (they counted them as dense)."""
    model = _net().eval()
    prune_(model, RandomInitConfig(sparsity=0.5), X)
    r = prune_(model, RandomInitConfig(sparsity=0.8, ignore=["7"]), X)
    assert (r.metrics["params_nonzero"], r.metrics["macs_nonzero"]) == _nonzero_recount(model, X)
