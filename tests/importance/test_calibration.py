"""Calibration batches: every data-dependent criterion refuses batches it cannot use with one
ConfigError naming the criterion and the batch, and never scores on no samples."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.errors import ConfigError
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.pai import SNIPConfig
from prunekit.models import create_model

X = torch.randn(8, 1, 8, 8)
Y = torch.arange(8) % 10
CASES = {
    "no batches": ([], "got no calibration samples \\(no batches\\)"),
    "empty batch": ([(X[:0], Y[:0])], "got no calibration samples \\(1 batch, all empty\\)"),
    "inputs only": ([X], "batch 0 is a Tensor, not a pair"),
    "three items": ([(X, Y, Y)], "batch 0 is a tuple of 3"),
    "float labels": ([(X, Y.float())], "one integer class label per sample"),
    "too few labels": ([(X, Y[:5])], "one integer class label per sample"),
    "not iterable": (5, "batches is a int, not an iterable"),
    "wrong channels": ([(torch.randn(8, 3, 8, 8), Y)], "cannot run calibration batch 0 \\(inputs \\(8, 3, 8, 8\\)"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("crit", ["taylor", "activation", "ga_func2", "snip"])
def test_unusable_calibration_batches_are_one_config_error_and_leave_the_model(case, crit):
    batches, fragment = CASES[case]
    if crit == "snip" and case == "no batches":
        fragment = "SNIP scores with data: pass batches"
    model = create_model("small_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = (SNIPConfig(sparsity=0.5) if crit == "snip"
           else MagnitudeConfig(criterion=crit, channel_ratio=0.5, probe=False))
    with pytest.raises(ConfigError, match=fragment):
        prune_(model, cfg, X[:1], batches=batches)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_labels_outside_the_model_s_classes_are_named():
    model = create_model("small_cnn", num_classes=10)
    with pytest.raises(ConfigError, match="labels 42..42 but the model gives 10 classes"):
        prune_(model, MagnitudeConfig(criterion="taylor", channel_ratio=0.5, probe=False), X[:1],
               batches=[(X, torch.full((8,), 42))])
