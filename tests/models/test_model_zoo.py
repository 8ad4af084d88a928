"""Model registry contract and architecture checks against hand-computed oracles."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.models import create_model, get_model_spec, list_models
from prunekit.models import registry as model_registry
from prunekit.models.resnet_cifar import ResNetCifar, ZeroPadShortcut
from prunekit.models.vgg_cifar import CONFIGS

SHARED_TOOLS = Path(__file__).resolve().parents[3] / "shared" / "tools"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- contract over the registry


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_maps_a_batch_to_logits(name):
    spec = get_model_spec(name)
    for num_classes in (None, 7):
        model = create_model(name, num_classes=num_classes)
        assert type(model).__module__.startswith("prunekit.models")
        assert not isinstance(model, torch.jit.ScriptModule)
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, *spec.input_shape))
        assert out.shape == (2, num_classes or spec.num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_builds_share_no_state_and_follow_the_torch_seed(name):
    torch.manual_seed(0)
    a = create_model(name)
    torch.manual_seed(0)
    b = create_model(name)
    c = create_model(name)
    assert list(a.state_dict()) == list(b.state_dict())
    for (key, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert pa.data_ptr() != pb.data_ptr(), key
        assert torch.equal(pa, pb), key
    # A different draw gives different weights: nothing is cached between builds.
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_registry_lists_the_expected_local_models():
    expected = {f"resnet{d}" for d in (20, 32, 44, 56, 110)} | {f"vgg{d}_bn" for d in (11, 13, 16, 19)}
    expected |= {"mobilenetv2_cifar", "lenet5", "small_cnn"}
    assert set(list_models()) == expected


# ---------------------------------------------------------------- ResNet


def resnet_params_by_hand(depth: int, shortcut: str, classes: int = 10) -> int:
    """Count from the architecture: 3x3 convs without bias, BN has 2 params per channel."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    c_in = 16
    for c in (16, 32, 64):
        for j in range(n):
            cin = c_in if j == 0 else c
            total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c
            if j == 0 and cin != c and shortcut == "projection":
                total += cin * c + 2 * c  # 1x1 conv + BN
        c_in = c
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
@pytest.mark.parametrize("shortcut", ["projection", "zeropad"])
def test_resnet_parameter_count_matches_hand_count(depth, shortcut):
    model = create_model(f"resnet{depth}", shortcut=shortcut)
    assert n_params(model) == resnet_params_by_hand(depth, shortcut)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * (depth - 2) // 6
    assert 2 * len(blocks) + 2 == depth  # 2 convs per block + stem + fc


def test_resnet56_published_sizes():
    # Worked by hand: stages hold 9 blocks each.
    # stem 432 + 32; stage1 9 * (2*2304 + 64) = 42,048; stage2 first block 4608 + 9216 + 128,
    # 8 more * (2*9216 + 128) = 148,480; stage3 first 18432 + 36864 + 256, 8 more
    # * (2*36864 + 256) = 591,872; fc 650. Sum 853,018; projections add 512 + 64 + 2048 + 128.
    assert n_params(create_model("resnet56", shortcut="zeropad")) == 853_018
    assert n_params(create_model("resnet56")) == 853_018 + 2_752 == 855_770


def test_zeropad_shortcut_is_subsample_plus_centred_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, 2)(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, ::2, ::2]
    assert torch.equal(out, expected)


def test_resnet_feature_map_sizes():
    model = create_model("resnet20")
    sizes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape)))
    model(torch.randn(1, 3, 32, 32))
    assert sizes == {"layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16), "layer3": (1, 64, 8, 8)}


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="projection, zeropad"):
        create_model("resnet20", shortcut="option_b")
    with pytest.raises(ConfigError, match="6n\\+2"):
        ResNetCifar(depth=21)


# ---------------------------------------------------------------- VGG

CLASSIC_VGG = {  # from the paper's table 1 (configs A, B, D, E), "M" = max-pool
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13_bn": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19_bn": [64, 64, "M", 128, 128, "M"] + [256] * 4 + ["M"] + [512] * 4 + ["M"] + [512] * 4 + ["M"],
}


@pytest.mark.parametrize("name", sorted(CLASSIC_VGG))
def test_vgg_layers_and_parameter_count(name):
    cfg = CLASSIC_VGG[name]
    assert list(CONFIGS[name[:-3]]) == cfg
    model = create_model(name, num_classes=10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [c for c in cfg if c != "M"]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == len(convs)
    assert model.classifier.in_features == 512 and isinstance(model.classifier, nn.Linear)
    expected, c_in = 0, 3
    for c in cfg:
        if c != "M":
            expected += 9 * c_in * c + 2 * c  # conv without bias + BN
            c_in = c
    assert n_params(model) == expected + 512 * 10 + 10


# ---------------------------------------------------------------- MobileNetV2


def test_mobilenetv2_cifar_strides_and_blocks():
    model = create_model("mobilenetv2_cifar")
    shapes = []
    for block in model.features:
        block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
    model(torch.randn(1, 3, 32, 32))
    # stem at stride 1; 24- and 32-channel stages at stride 1; 64 and 160 halve the size.
    assert shapes[0] == (32, 32, 32)
    assert [s for s in shapes if s[0] == 24] == [(24, 32, 32)] * 2
    assert [s for s in shapes if s[0] == 32][1:] == [(32, 32, 32)] * 3
    assert [s for s in shapes if s[0] == 64] == [(64, 16, 16)] * 4
    assert [s for s in shapes if s[0] == 160] == [(160, 8, 8)] * 3
    assert shapes[-1] == (1280, 8, 8)
    residual = [m for m in model.modules() if type(m).__name__ == "InvertedResidual" and m.use_residual]
    assert len(residual) == 10  # blocks 2..n of each stage: 1 + 2 + 3 + 2 + 2 + 0


def test_mobilenetv2_matches_torchvision_parameter_count():
    # Same blocks as torchvision's MobileNetV2 (only strides differ, which own no parameters);
    # its classifier has dropout then Linear(1280, classes), ours the same with dropout=0.2.
    tv = _import_torchvision_models()
    ours = create_model("mobilenetv2_cifar", num_classes=10, dropout=0.2)
    assert n_params(ours) == n_params(tv.mobilenet_v2(num_classes=10))


# ---------------------------------------------------------------- small models


@pytest.mark.parametrize("in_channels,size,flat", [(1, 28, 256), (3, 32, 400)])
def test_lenet5_sizes_and_parameter_count(in_channels, size, flat):
    model = create_model("lenet5", in_channels=in_channels, input_size=size)
    assert model.fc1.in_features == flat
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)
    by_hand = (in_channels * 25 * 6 + 6) + (6 * 25 * 16 + 16) + (flat * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert n_params(model) == by_hand


def test_small_cnn_layout_and_residual():
    model = create_model("small_cnn")
    by_hand = (1 * 9 * 32 + 64) + (32 * 9 * 64 + 128) + (64 * 9 * 64 + 128) + (64 * 10 + 10)
    assert n_params(model) == by_hand
    # Zeroing conv3's BN output scale and shift turns the residual branch into relu(0) = 0:
    # the logits must then equal the head applied to the pooled input of the branch.
    model.eval()
    with torch.no_grad():
        model.bn3.weight.zero_()
        model.bn3.bias.zero_()
        x = torch.randn(3, 1, 8, 8)
        trunk = model.pool(model.relu2(model.bn2(model.conv2(model.relu1(model.bn1(model.conv1(x)))))))
        assert torch.allclose(model(x), model.fc(trunk.mean((2, 3))), atol=1e-6)


# ---------------------------------------------------------------- errors and zoo prefixes


def test_unknown_names_and_keywords_raise_config_errors():
    with pytest.raises(ConfigError, match="available: .*resnet56"):
        create_model("resnet57")
    with pytest.raises(ConfigError, match="allowed keywords: in_channels, shortcut"):
        create_model("resnet20", width=2)
    with pytest.raises(ConfigError, match="positive integer"):
        create_model("resnet20", num_classes=0)


@pytest.mark.parametrize("prefix,package", [("tv", "torchvision"), ("timm", "timm")])
def test_zoo_prefix_without_package_names_the_package(monkeypatch, prefix, package):
    def fail(module):
        raise ImportError(f"No module named {module!r}")

    monkeypatch.setattr(model_registry.importlib, "import_module", fail)
    with pytest.raises(ConfigError, match=f"need the '{package}' package.*pip install {package}"):
        create_model(f"{prefix}:resnet18")


def test_torchvision_prefix_builds_without_weights():
    _import_torchvision_models()
    model = create_model("tv:resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert get_model_spec("tv:resnet18").input_shape == (3, 224, 224)
    with pytest.raises(ConfigError, match="unknown model 'tv:resnet1800'"):
        create_model("tv:resnet1800")


def test_timm_prefix_builds_without_weights():
    _import_torchvision_models()  # timm imports torchvision
    pytest.importorskip("timm")
    model = create_model("timm:resnet18", num_classes=5)
    assert model.get_classifier().out_features == 5


def _import_torchvision_models():
    # This machine's torchvision wheel needs the shim in shared/tools; elsewhere it imports as is.
    if SHARED_TOOLS.is_dir() and str(SHARED_TOOLS) not in sys.path:
        sys.path.insert(0, str(SHARED_TOOLS))
    try:
        if SHARED_TOOLS.is_dir():
            importlib.import_module("torchvision_cpu")
        return importlib.import_module("torchvision.models")
    except Exception as err:  # noqa: BLE001 (any import failure means "not available here")
        pytest.skip(f"torchvision does not import here: {err}")
