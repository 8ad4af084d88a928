"""The CPU default layout steers round oneDNN's channels-last 1x1 backward-weights defect.

A strided, unpadded 1x1 convolution with fewer than 16 input channels, trained in channels-last on
an x86 CPU, has its weight gradient computed by a oneDNN kernel that writes past its workspace (a
heap corruption: an abort on an AVX2 machine, wrong gradients elsewhere). Pruned networks reach
such widths. The engine trains such a model contiguous by default and refuses channels_last=True.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.engine import Hook, TrainConfig, train
from engine_testkit import TinyLoader


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _data():
    torch.manual_seed(0)
    return torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))


class _Layouts(Hook):
    """Records whether the strided 1x1 conv saw channels-last inputs, and whether the first (3x3) conv's
    weight was channels-last, at each step (a 1x1 weight is contiguous in both layouts)."""

    def __init__(self, model: nn.Module):
        self.inputs: list[bool] = []
        self.weights: list[bool] = []
        model[2].register_forward_pre_hook(lambda m, args: self.inputs.append(_nhwc(args[0])))

    def on_step_end(self, model, step):
        self.weights.append(_nhwc(model[0].weight))


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_the_cpu_default_trains_a_model_with_a_narrow_strided_pointwise_conv_contiguous():
    x, y = _data()
    a, b = _net(), _net()
    spy = _Layouts(a)
    result = train(a, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1), hooks=[spy], progress=False)
    train(b, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1, channels_last=False), progress=False)
    assert spy.inputs and not any(spy.inputs) and spy.weights and not any(spy.weights)
    assert any("trained contiguous" in n and "2" in n for n in result.notes)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q)


def test_a_model_given_channels_last_trains_contiguous_and_comes_back_channels_last():
    x, y = _data()
    model = _net().to(memory_format=torch.channels_last)
    spy = _Layouts(model)
    train(model, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1), hooks=[spy], progress=False)
    assert spy.inputs and not any(spy.inputs) and spy.weights and not any(spy.weights)
    assert _nhwc(model[0].weight)  # the caller's layout, handed back


def test_channels_last_true_is_refused_before_training_and_the_model_is_untouched():
    x, y = _data()
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"channels_last=True.*\(2\).*oneDNN.*false or null"):
        train(model, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1, channels_last=True), progress=False)
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in model.state_dict().items())


def test_a_padded_or_wide_strided_pointwise_conv_keeps_the_channels_last_default():
    x, y = _data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1, stride=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    spy = _Layouts(model)
    result = train(model, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1), hooks=[spy], progress=False)
    assert spy.inputs and all(spy.inputs) and spy.weights and all(spy.weights)
    assert not any("contiguous" in n for n in result.notes)
