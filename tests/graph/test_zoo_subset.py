"""A few real torchvision architectures, pruned at 50% of the channels with the classifier kept.

One model per family of structures the graph must get right: residual basic blocks (resnet18),
inverted residuals with squeeze-excitation and hardswish (mobilenet_v3_small), chunk + channel
shuffle (shufflenet_v2_x0_5), fire modules that concatenate two expand branches
(squeezenet1_1), and depthwise conv + channels-last LayerNorm + layer scale + stochastic depth
(convnext_tiny, marked slow). Inputs are 64x64, the smallest size at which every one of them
still has spatial extent left before its classifier. benchmarks/zoo_coverage.py runs all 80
classification models at their native 224x224.

torchvision is optional: the module is skipped when it cannot be imported. On machines whose
torchvision wheel does not match torch, the helper in ../shared/tools makes it importable.
"""
from __future__ import annotations


import pytest
import torch

from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from zoo_imports import import_zoo



def _import_torchvision_models():
    return import_zoo("torchvision.models", module_level=True)


tvm = _import_torchvision_models()

SIDE = 64
FAST = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1"]
SLOW = ["convnext_tiny"]


def _prune_and_check(name: str) -> None:
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        ref = model(x)
    before = sum(p.numel() for p in model.parameters())
    classifier = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    n_classes = classifier.weight.shape[0]

    result = prune_(model, MagnitudeConfig(channel_ratio=0.5), x)

    with torch.no_grad():
        out = model(x)
    after = sum(p.numel() for p in model.parameters())
    assert out.shape == ref.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert classifier.weight.shape[0] == n_classes, "the classifier lost outputs"
    assert after == result.cost_after.params
    # 50% of the channels of every free group: well over a third of the weights go
    assert after < 0.75 * before, f"{name}: {before:,} -> {after:,} parameters"
    assert result.cost_after.macs < result.cost_before.macs


@pytest.mark.parametrize("name", FAST)
def test_zoo_model_prunes(name):
    _prune_and_check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_zoo_model_prunes_slow(name):
    _prune_and_check(name)
