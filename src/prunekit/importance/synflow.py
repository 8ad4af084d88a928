"""SynFlow (Tanaka et al. 2020): data-free, iterative synaptic-flow scores.

On a copy of the model, every floating-point parameter and buffer is replaced by its absolute
value (the linearised net of the reference code; BN running statistics included) and the copy
is put in eval mode, so BN is a fixed positive affine map. With an all-ones input of one sample,
R = sum of the output and the score of weight w is abs(w * dR/dw). With a `sparsity`, this repeats
over `iterations` rounds on an exponential schedule: round k removes down to density
(1 - sparsity) ** (k / iterations), the removed weights stay zero in the copy, and the next
round scores again. The copy runs in float64 (R of a deep net overflows float32). The caller's
model is never touched.

The returned scores are the last round's; weights removed in earlier rounds score -inf, so
`select_element_masks(scores, sparsity, scope)` gives exactly the iterative result.

>>> import torch, torch.nn as nn
>>> m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
>>> with torch.no_grad():
...     _ = m[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 1.0]])); _ = m[2].weight.copy_(torch.tensor([[3.0, -1.0]]))
>>> synflow_scores(m, input_shape=(2,))["0.weight"].tolist()  # |W2|^T 1 times |W1|, row by row
[[3.0, 6.0], [0.5, 1.0]]
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layout import onednn_safe
from ..surgery.verify import first_tensor
from .context import refuse_inference_mode
from .element_masks import global_keep_count, select_element_masks
from .targets import leaf_names, target_weights


def _ones_like_one_sample(example_inputs: Any, input_shape, batches: Iterable | None, dtype) -> tuple:
    """The all-ones input of batch size 1, as positional arguments."""
    if input_shape is not None:
        return (torch.ones((1, *input_shape), dtype=dtype),)
    if example_inputs is None and batches is not None:
        first = next(iter(batches))  # the reference code reads the shape off the data
        example_inputs = first[0] if isinstance(first, (tuple, list)) else first  # (inputs, labels) or inputs
    if example_inputs is None:
        raise ConfigError("synflow needs the input shape: pass example_inputs (a tensor or tuple of tensors), "
                          "input_shape (one sample's shape, e.g. (3, 32, 32)) or batches")
    xs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(x, torch.Tensor) for x in xs):
        raise ConfigError("synflow: example_inputs must be a tensor or a tuple of tensors")
    return tuple(torch.ones((1, *x.shape[1:]), dtype=dtype if x.is_floating_point() else x.dtype) for x in xs)


def _linearised_copy(model: nn.Module, dtype) -> nn.Module:
    work = copy.deepcopy(model).to(dtype).eval()
    with torch.no_grad():
        for t in work.state_dict().values():  # the tensors themselves: abs_ writes into the copy
            if t.is_floating_point():
                t.abs_()
    for p in work.parameters():  # a frozen weight still has its synaptic flow (the copy's flags only)
        p.requires_grad_(True)
    return work


def synflow_scores(model: nn.Module, batches: Iterable | None = None, *, example_inputs: Any = None,
                   input_shape: tuple[int, ...] | None = None, sparsity: float | None = None,
                   iterations: int = 100, scope: str = "global", targets=None,
                   dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """SynFlow scores ("<module>.<param>" -> float64 tensor); see the module docstring.

    sparsity=None scores once (no pruning between rounds; the one-shot saliency). `batches` is
    only read for the input shape when neither `example_inputs` nor `input_shape` is given.
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ConfigError(f"iterations={iterations!r} must be an integer >= 1 (the reference uses 100)")
    refuse_inference_mode("SynFlow")
    inputs = _ones_like_one_sample(example_inputs, input_shape, batches, dtype)
    weights = target_weights(model, targets)
    work = _linearised_copy(model, dtype)
    params = dict(work.named_parameters())
    leaves = {k: params[n] for k, n in leaf_names(work, weights).items()}
    if sparsity is not None and scope == "global":  # the last round's budget, checked before the first
        global_keep_count([leaf.numel() for leaf in leaves.values()], sparsity)
    rounds = 1 if sparsity is None else iterations
    keep: dict[str, torch.Tensor] | None = None
    for k in range(1, rounds + 1):
        with torch.enable_grad(), onednn_safe():  # also inside a caller's torch.no_grad()
            scores = _one_round(work, inputs, leaves)
        if keep is not None:
            for key, s in scores.items():
                s[~keep[key]] = float("-inf")  # removed in an earlier round: stays removed
        if sparsity is None:
            break
        density = (1.0 - sparsity) ** (k / rounds)
        keep = select_element_masks(scores, 1.0 - density if k < rounds else sparsity, scope)
        with torch.no_grad():
            for key, leaf in leaves.items():
                leaf.mul_(keep[key])
    return scores


def _one_round(work: nn.Module, inputs: tuple, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    work.zero_grad(set_to_none=True)
    out = first_tensor(work(*inputs))
    out.sum().backward()  # R: (1, ...) summed
    scores = {}
    for key, leaf in leaves.items():
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        scores[key] = (grad * leaf).detach().abs()
    return scores
