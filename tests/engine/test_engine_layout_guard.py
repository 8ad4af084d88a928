"""Training and gradient scores steer round oneDNN's channels-last 1x1 backward-weights defect.

A strided, unpadded 1x1 convolution with fewer than 16 input channels, given a channels-last input on
an x86 CPU, has its weight gradient computed by a oneDNN kernel that writes past its workspace (a heap
corruption: an abort on an AVX2 machine, wrong gradients elsewhere). Pruned networks reach such widths.
While the engine trains, or a criterion takes gradients, such a layer gets its input contiguous; every
other layer keeps the channels-last layout. Without that, these tests abort the process on an AVX2 CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.engine import Hook, TrainConfig, train
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.pai import SNIPConfig, SynFlowConfig

from engine_testkit import TinyLoader


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 1, stride=2), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _data():
    torch.manual_seed(0)
    return torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class _Layouts(Hook):
    """Records whether the strided 1x1 conv saw channels-last inputs, and whether the first (3x3) conv's
    weight was channels-last, at each step (a 1x1 weight has one layout in both formats)."""

    def __init__(self, model: nn.Module):
        self.inputs: list[bool] = []
        self.weights: list[bool] = []
        model[2].register_forward_pre_hook(lambda m, args: self.inputs.append(_nhwc(args[0])))

    def on_step_end(self, model, step):
        self.weights.append(_nhwc(model[0].weight))


@pytest.mark.parametrize("channels_last", [None, True])
def test_training_channels_last_gives_the_narrow_strided_pointwise_conv_a_contiguous_input(channels_last):
    x, y = _data()
    a, b = _net(), _net()
    spy = _Layouts(a)
    train(a, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1, channels_last=channels_last), hooks=[spy],
          progress=False)
    train(b, TinyLoader(x, y, 8), None, TrainConfig(epochs=1, lr=0.1, channels_last=False), progress=False)
    assert spy.inputs and not any(spy.inputs)  # that conv ran on contiguous inputs ...
    assert spy.weights and all(spy.weights)  # ... while the rest of the model trained channels-last
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    spy.inputs.clear()
    a(x.contiguous(memory_format=torch.channels_last))
    assert spy.inputs == [True]  # nothing stays attached after training


@pytest.mark.parametrize("config", [MagnitudeConfig(channel_ratio=0.5, criterion="taylor", probe=False),
                                    SNIPConfig(sparsity=0.5), SynFlowConfig(sparsity=0.5, iterations=2)],
                         ids=["taylor", "snip", "synflow"])
def test_gradient_scores_of_a_channels_last_model_are_those_of_the_contiguous_one(config):
    x, y = _data()
    a, b = _net().to(memory_format=torch.channels_last), _net()
    batches = [(x.contiguous(memory_format=torch.channels_last), y)]
    ra = prune_(a, config, x[:2].contiguous(memory_format=torch.channels_last), batches=batches)
    rb = prune_(b, config, x[:2], batches=[(x, y)])
    assert ra.metrics.keys() == rb.metrics.keys()
    for (name, ma), mb in zip(a.named_modules(), b.modules()):  # the same channels and weights kept
        if isinstance(ma, (nn.Conv2d, nn.Linear)):
            assert ma.weight.shape == mb.weight.shape, name
            torch.testing.assert_close(ma.weight, mb.weight, msg=name)
