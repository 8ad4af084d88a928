"""Config.check_model_with hands the example inputs to configs that take them, and still calls
configs written for the one-argument check_model."""
import dataclasses

import torch
from torch import nn

from prunekit.core.config import Config


@dataclasses.dataclass
class OneArgument(Config):
    seen: list = dataclasses.field(default_factory=list)

    def check_model(self, model):
        self.seen.append(type(model).__name__)


@dataclasses.dataclass
class TwoArguments(Config):
    seen: list = dataclasses.field(default_factory=list)

    def check_model(self, model, example_inputs=None):
        self.seen.append(tuple(example_inputs.shape))


def test_check_model_with_suits_both_forms():
    x = torch.randn(1, 3)
    one, two = OneArgument(), TwoArguments()
    one.check_model_with(nn.Linear(3, 2), x)
    two.check_model_with(nn.Linear(3, 2), x)
    assert one.seen == ["Linear"] and two.seen == [(1, 3)]
