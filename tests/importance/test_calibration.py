"""Calibration batches: every data-dependent criterion refuses batches it cannot use with one
ConfigError naming the criterion and the batch, never scores on no samples, and reads labels only
as far as it needs them (the activation criterion not at all, a custom loss any targets)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunekit.core.errors import ConfigError
from prunekit.importance.elements import snip_scores
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.pai import SNIPConfig
from prunekit.models import create_model

X = torch.randn(8, 1, 8, 8)
Y = torch.arange(8) % 10
ALL = ("taylor", "activation", "ga_func2", "snip")
# case -> (batches, fragment of the error, criteria that refuse it; the others prune)
CASES = {
    "no batches": ([], "got no calibration samples \\(no batches\\)|SNIP scores with data", ALL),
    "empty batch": ([(X[:0], Y[:0])], "got no calibration samples \\(1 batch, all empty\\)", ALL),
    "inputs only": ([X], "batch 0 is a Tensor, not a pair", ALL),
    "three items": ([(X, Y, Y)], "batch 0 is a tuple of 3", ALL),
    "float labels": ([(X, Y.float())], "loss of calibration batch 0 cannot be computed|one integer class label",
                     ("taylor", "ga_func2", "snip")),
    "too few labels": ([(X, Y[:5])], "one (target|integer class label) per sample", ("taylor", "ga_func2", "snip")),
    "not iterable": (5, "batches is a int, not an iterable", ALL),
    "wrong channels": ([(torch.randn(8, 3, 8, 8), Y)], "cannot run calibration batch 0 \\(inputs \\(8, 3, 8, 8\\)", ALL),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("crit", ALL)
def test_unusable_calibration_batches_are_one_config_error_and_leave_the_model(case, crit):
    batches, fragment, refusing = CASES[case]
    model = create_model("small_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = (SNIPConfig(sparsity=0.5) if crit == "snip"
           else MagnitudeConfig(criterion=crit, channel_ratio=0.5, probe=False))
    if crit not in refusing:  # labels this criterion does not read
        prune_(model, cfg, X[:1], batches=batches)
        return
    with pytest.raises(ConfigError, match=fragment):
        prune_(model, cfg, X[:1], batches=batches)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_labels_outside_the_model_s_classes_are_named():
    model = create_model("small_cnn", num_classes=10)
    with pytest.raises(ConfigError, match="labels 42..42 but the model gives 10 classes"):
        prune_(model, MagnitudeConfig(criterion="taylor", channel_ratio=0.5, probe=False), X[:1],
               batches=[(X, torch.full((8,), 42))])


def test_a_custom_loss_takes_any_targets_with_one_entry_per_sample():
    model = create_model("small_cnn", num_classes=10)
    soft = torch.softmax(torch.randn(8, 10), 1)  # soft labels: cross-entropy takes probabilities
    assert snip_scores(model, [(X, soft)])
    regression = torch.randn(8, 10)
    assert snip_scores(model, [(X, regression)], loss_fn=F.mse_loss)
