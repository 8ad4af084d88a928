"""`first_nonfinite`: the check every pruning runs on a model's tensors, against an element-wise oracle."""
import pytest
import torch
from torch import nn

from prunekit.core.modules import first_nonfinite


def _oracle(model):
    for n, t in model.named_parameters():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return "parameter", n
    for n, t in model.named_buffers():
        if t.is_floating_point() and bool(t.isnan().any()):
            return "buffer", n
    return None


@pytest.mark.parametrize("where, value", [(None, None), ("1.weight", float("nan")), ("1.weight", float("inf")),
                                          ("0.weight", 3e38), ("1.running_mean", float("inf")),
                                          ("1.running_var", float("nan")), ("2.weight", float("-inf"))])
@pytest.mark.parametrize("half", [False, True])
def test_first_nonfinite_equals_an_element_wise_check(where, value, half):
    """Including a finite value whose square overflows (the fast multi-tensor norm is then inf and
    the element-wise path decides), an inf buffer (allowed) and a half-precision layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    if half:  # mixed dtypes: the multi-tensor norms cannot be stacked, so every tensor is read element-wise
        model[2].half()
    if where is not None:
        with torch.no_grad():
            dict(model.named_parameters(), **dict(model.named_buffers()))[where].view(-1)[0] = value
    assert first_nonfinite(model) == _oracle(model)
