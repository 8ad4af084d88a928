"""Per-weight importance: one score per weight of every prunable tensor (higher = keep).

An element criterion maps a model (and optional calibration data) to
`{"<module>.<param>": Tensor of that weight's shape}`. By default the prunable weights are the
`weight` of every conv and Linear layer; `targets` chooses others (see `target_weights`).
Every function here follows one sign convention: **higher = more important = kept** by
`select_element_masks`. Where a paper ranks the other way (GraSP), the score is negated and the
docstring says so.

| name | score of weight w | data |
|---|---|---|
| `magnitude_scores` | abs(w) | none |
| `random_scores` | uniform [0, 1), seeded | none |
| `snip_scores` | abs(w * g), g = sum over batches of dL_b/dw (Lee et al. 2019) | batches |
| `grasp_scores` | w * (H g), the negated GraSP score -w * (H g) (Wang et al. 2020) | batches |
| `synflow_scores` | abs(w * dR/dw) on the linearised net, iterative (Tanaka et al. 2020) | shape only |

Masked weights (a `surgery.masks.Mask` on the tensor) are scored as the network uses them:
gradients are taken through the mask, so a masked weight's SNIP/GraSP score is 0.

>>> import torch, torch.nn as nn
>>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
>>> sorted(magnitude_scores(m))
['0.weight', '2.weight']
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..graph import Group
from .calibration import check_iterable
from .context import ScoreContext
from .criteria import CRITERIA, Criterion, l2_scores
from .element_masks import (apply_element_masks, channel_scores_from_elements, group_scores_from_elements,
                            select_element_masks)
from .synflow import synflow_scores
from .targets import leaf_names, target_weights

__all__ = ["target_weights", "magnitude_scores", "random_scores", "snip_scores", "grasp_scores",
           "synflow_scores", "select_element_masks", "apply_element_masks", "channel_scores_from_elements",
           "ELEMENT_SCORES"]

def magnitude_scores(model: nn.Module, batches: Iterable | None = None, *, targets=None) -> dict[str, torch.Tensor]:
    """abs(w) of the weight the network uses (masked entries score 0); `batches` is unused."""
    return {k: getattr(model.get_submodule(m), p).detach().abs().clone()
            for k, (m, p) in target_weights(model, targets).items()}


def random_scores(model: nn.Module, batches: Iterable | None = None, *, seed: int = 0,
                  targets=None) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores from one generator seeded with `seed`, drawn in key order."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(getattr(model.get_submodule(m), p).shape, generator=gen)
            for k, (m, p) in target_weights(model, targets).items()}


def snip_scores(model: nn.Module, batches: Iterable | None = None, *, targets=None,
                loss_fn=nn.functional.cross_entropy, mode: str = "eval") -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity abs(w * g), g the loss gradient summed over `batches`.

    The gradient is accumulated first and the product taken once (abs of the sum, as when
    gradients of several batches accumulate before scoring), in eval mode, or with `mode="train"`
    in training mode (BatchNorm on batch statistics; running statistics left as they were). Lee et
    al. divide by the sum of all scores; that does not change the ranking and is left out.

    >>> m = nn.Linear(2, 2, bias=False)
    >>> s = snip_scores(m, [(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))])
    >>> s["weight"].shape, bool((s["weight"] >= 0).all())
    (torch.Size([2, 2]), True)
    """
    weights = target_weights(model, targets)
    model, batches = _in_float32(model, batches, "snip")
    ctx = ScoreContext(model, batches=batches, loss_fn=loss_fn, mode=mode)
    grads = ctx.gradients("snip")
    params = ctx.parameters()
    return {k: (params[n].detach() * grads[n]).abs() for k, n in leaf_names(model, weights).items()}


def grasp_scores(model: nn.Module, batches: Iterable | None = None, *, targets=None, temperature: float = 200.0,
                 loss_fn=nn.functional.cross_entropy, mode: str = "eval") -> dict[str, torch.Tensor]:
    """GraSP importance w * (H g): keep the highest (the paper's S(-w) = -w * (H g), removing its highest).

    g = dL/dw and H = d2L/dw2 over the target weights only, L = sum over `batches` of
    loss_fn(logits / temperature, y), in eval mode; `mode="train"` scores in training mode, as the
    reference code does (BatchNorm on batch statistics; running statistics left as they were).
    Wang et al. (2020) score S(-w) = -w * Hg and
    remove the weights with the *largest* S (their Algorithm 1, and the reference code, keep the
    weights whose S lies at or below the pruning threshold). Keeping the largest w * Hg is the
    same selection in the one convention of this module. temperature=200
    is the reference code's default (logits divided by T before the loss).

    >>> m = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> s = grasp_scores(m, [(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))], temperature=1.0)
    >>> s["0.weight"].shape
    torch.Size([3, 2])
    """
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature!r} must be > 0 (the reference code uses 200)")
    weights = target_weights(model, targets)
    model, batches = _in_float32(model, batches, "grasp")
    names = leaf_names(model, weights)
    ctx = ScoreContext(model, batches=batches, loss_fn=lambda out, y: loss_fn(out / temperature, y), mode=mode)
    grads = ctx.gradients("grasp")
    hg = ctx.hessian_vector_product({n: grads[n] for n in names.values()}, "grasp")
    params = ctx.parameters()
    return {k: params[n].detach() * hg[n] for k, n in names.items()}


def _in_float32(model: nn.Module, batches: Iterable | None, who: str) -> tuple[nn.Module, Iterable | None]:
    """A float16 model as a float32 copy, with its batches' float16 tensors in float32; any other
    model as it is. Gradient scores are tiny (GraSP's w * H g at temperature 200 is about 1e-10 on
    a small CNN) and float16 holds nothing below 6e-8: scored in float16, nearly every weight
    scored 0 and the masks were chosen by ties. Scores of the copy are keyed like the model's."""
    if not any(t.dtype == torch.float16 for t in model.parameters()):
        return model, batches
    check_iterable(batches, who)
    wide = copy.deepcopy(model)._apply(_float32)
    return wide, _Float32Batches(batches)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype == torch.float16 else t


class _Float32Batches:
    """`batches`, each (inputs, labels) pair's float16 tensors given in float32 (read lazily: a
    batch of the wrong form reaches the criterion's checks as it is)."""

    def __init__(self, batches: Iterable):
        self.batches = batches

    def __iter__(self):
        for batch in self.batches:
            if isinstance(batch, (tuple, list)):
                batch = tuple(_float32(t) if isinstance(t, torch.Tensor) else t for t in batch)
            yield batch


ELEMENT_SCORES = {"magnitude": magnitude_scores, "random": random_scores, "snip": snip_scores,
                  "grasp": grasp_scores, "synflow": synflow_scores}


def element_scores(name: str, model: nn.Module, batches: Iterable | None = None, **opts: Any) -> dict[str, torch.Tensor]:
    """Scores of the built-in element criterion `name` (one of ELEMENT_SCORES)."""
    fn = ELEMENT_SCORES.get(name)
    if fn is None:
        raise ConfigError(f"unknown element criterion {name!r}; choose one of: {', '.join(ELEMENT_SCORES)}")
    return fn(model, batches, **opts)


def element_channel_criterion(name: str, **opts: Any) -> Criterion:
    """A channel criterion from the element criterion `name`: element scores are computed once
    per `ScoreContext` (cached in `ctx.cache`) and reduced per group with
    `group_scores_from_elements` (channel sums per member, `ctx.reduction` across members).
    A group without a scored conv/Linear weight falls back to l2, recorded in `ctx.fallbacks`.
    SynFlow here is the one-shot score (no pruning between rounds: channels are removed at once),
    returned in float64: on a deep net it exceeds float32's range."""
    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        key = f"elements:{name}"
        if key not in ctx.cache:
            batches = None if name in ("synflow", "magnitude", "random") else ctx.require_batches(name)
            extra = {"example_inputs": ctx.example_inputs} if name == "synflow" else {}
            ctx.cache[key] = element_scores(name, ctx.model, batches, **extra, **opts)
        out = group_scores_from_elements(group, ctx.cache[key], ctx.reduction)
        if out is None:
            ctx.note_fallback(group.name, name, "l2", "no scored conv/Linear weight in the group")
            return l2_scores(group, ctx)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # SynFlow's float64 may exceed float32
    what = {"snip": "SNIP |g * w| (needs calibration batches)", "grasp": "GraSP w * Hg, highest kept (needs calibration batches)",
            "synflow": "SynFlow's data-free synaptic flow"}[name]
    score.__doc__ = f"{what}: element scores summed per channel"
    return score


for _name in ("snip", "grasp", "synflow"):
    CRITERIA.register(_name, element_channel_criterion(_name))
