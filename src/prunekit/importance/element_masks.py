"""From per-weight scores to masks (exact sparsity), onto the model, or up to channel scores.

`select_element_masks` keeps the highest scores at an exact sparsity, over all tensors at once
(scope="global") or tensor by tensor (scope="layer"); ties keep the lower index, as
`surgery.masks.unstructured_mask` does. No tensor is ever emptied: globally, the best weight of
every tensor is kept first and the rest of the budget goes by rank; per layer, a tensor whose
rounded count would remove everything keeps its best weight.

>>> import torch
>>> scores = {"a.weight": torch.tensor([3.0, 1.0, 2.0, 4.0]), "b.weight": torch.tensor([0.1, 0.2])}
>>> {k: v.tolist() for k, v in select_element_masks(scores, 0.5).items()}  # 3 of 6 kept; b keeps its best
{'a.weight': [True, False, False, True], 'b.weight': [False, True]}
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import nn

from ..core.config import check_choice
from ..core.errors import ConfigError, PruningError
from ..graph import Graph, Group
from ..surgery.masks import apply_mask, highest_keeping, removal_count
from .criteria import REDUCTIONS, per_channel, reduce_members


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    if not scores:
        raise ConfigError("no element scores to select from; score at least one weight tensor")
    for k, s in scores.items():
        if not isinstance(s, torch.Tensor) or s.numel() == 0:
            raise ConfigError(f"scores[{k!r}] must be a non-empty tensor")
        if bool(torch.isnan(s).any()):
            raise PruningError(f"scores[{k!r}] holds NaN; a criterion cannot rank it (check the data and the model)")


def select_element_masks(scores: Mapping[str, torch.Tensor], sparsity: float,
                         scope: str = "global") -> dict[str, torch.Tensor]:
    """Bool masks (True = keep) removing the lowest-scoring weights at an exact sparsity.

    global: prune_count(total, sparsity) weights go in all (half rounds up), at least one kept
    per tensor (PruningError when the budget cannot keep one per tensor). layer: each tensor loses
    prune_count(numel, sparsity), at most numel - 1.
    """
    check_choice("scope", scope, ("global", "layer"))
    _check_scores(scores)
    if scope == "layer":
        out = {}
        for k, s in scores.items():
            n = s.numel()
            drop = min(removal_count(n, _sparsity(sparsity)), n - 1)
            out[k] = _keep_top(s.detach().flatten(), n - drop).view(s.shape)
        return out
    keys = list(scores)
    sizes = [scores[k].numel() for k in keys]
    total = sum(sizes)
    keep_n = global_keep_count(sizes, sparsity)
    dtype = functools.reduce(torch.promote_types, (scores[k].dtype for k in keys), torch.float32)  # float64 if any is
    device = scores[keys[0]].device
    flat = torch.cat([scores[k].detach().flatten().to(device, dtype) for k in keys])
    starts = torch.tensor([0] + sizes[:-1], device=flat.device).cumsum(0)
    keep = torch.zeros(total, dtype=torch.bool, device=flat.device)  # on the scores' device (a CUDA model's)
    # the best weight of each tensor first (argmax returns the first maximum: the lower index)
    keep[starts + torch.stack([scores[k].detach().flatten().to(device, dtype).argmax() for k in keys])] = True
    order = torch.argsort(flat, descending=True, stable=True)  # (total,), ties keep the lower index
    rest = order[~keep[order]]
    keep[rest[: keep_n - len(keys)]] = True
    return {k: part.view(scores[k].shape) for k, part in zip(keys, keep.split(sizes))}


def global_keep_count(sizes: list[int], sparsity: float) -> int:
    """Weights a global selection keeps of tensors of `sizes` at `sparsity`; PruningError when
    that is fewer than one for each tensor."""
    total = sum(sizes)
    keep_n = total - removal_count(total, _sparsity(sparsity))
    if keep_n < len(sizes):
        raise PruningError(f"sparsity {sparsity} keeps {keep_n} of {total} weights, fewer than one for each of the "
                           f"{len(sizes)} tensors; use a sparsity of at most {highest_keeping(total, len(sizes))} "
                           "(the count rounds half up), or score fewer tensors")
    return keep_n


def _sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity={sparsity!r} is invalid; use a number in [0, 1) (the fraction of weights removed)")
    return float(sparsity)


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:n_keep]] = True
    return keep


def apply_element_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Hold `masks` ("<module>.<param>" -> bool tensor) as persistent `surgery.masks.Mask`
    parametrizations: the masked weights read 0 in every forward and get zero gradient, so
    training keeps them at 0. All masks are checked before any is applied. Returns the count.

    >>> lin = nn.Linear(2, 2)
    >>> apply_element_masks(lin, {"weight": torch.tensor([[True, False], [False, True]])})
    1
    >>> bool(lin.weight[0, 1] == 0)
    True
    """
    targets = []
    for key, mask in masks.items():
        mod, _, pname = key.rpartition(".")
        try:
            module = model.get_submodule(mod)
        except AttributeError:
            raise PruningError(f"mask for {key!r}: the model has no module {mod!r}; key masks by "
                               "'<module>.<param>' as element scores are") from None
        weight = getattr(module, pname, None)
        if not isinstance(weight, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
            got = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
            raise PruningError(f"mask for {key!r} has shape {tuple(mask.shape)}, the tensor has {got}; "
                               "masks must come from scores of this model")
        targets.append((module, pname, mask))
    for module, pname, mask in targets:
        apply_mask(module, pname, mask)
    return len(targets)


def channel_scores_from_elements(graph: Graph, element_scores: Mapping[str, torch.Tensor],
                                 reduction: str = "mean") -> dict[str, torch.Tensor]:
    """One score per channel of every prunable group that has a scored member.

    Each scored member tensor (a conv's filters along dim 0, the next layer's input slices along
    dim 1...) is summed per channel (`per_channel`), and members are combined with `reduction`
    (`reduce_members`), as channel criteria do. Groups without a scored member are left out.

    >>> import torch.nn as nn
    >>> from prunekit.graph import build_graph
    >>> m = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False))
    >>> g = build_graph(m, torch.randn(1, 1, 2, 2))
    >>> s = {"0.weight": torch.tensor([1.0, 3.0]).view(2, 1, 1, 1), "1.weight": torch.ones(1, 2, 1, 1)}
    >>> channel_scores_from_elements(g, s)["0"].tolist()
    [1.0, 2.0]
    """
    check_choice("reduction", reduction, REDUCTIONS)
    bad = [k for k, s in element_scores.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise PruningError(f"element scores of {bad[:3]} are not finite: weights or gradients holding NaN or inf "
                           "(a diverged training?), or scores of iterative SynFlow, which marks the weights it removed "
                           "with -inf (reduce single-round scores to channels: iterations=1, no sparsity)")
    out = {}
    for group in graph.prunable_groups():
        scores = group_scores_from_elements(group, element_scores, reduction)
        if scores is not None:
            out[group.name] = scores
    return out


def group_scores_from_elements(group: Group, element_scores: Mapping[str, torch.Tensor],
                               reduction: str) -> torch.Tensor | None:
    """`channel_scores_from_elements` for one group; None when no member tensor is scored."""
    parts = [per_channel(element_scores[m.qualname], m, group.size)
             for m in group.tensor_members() if m.qualname in element_scores]
    return reduce_members(parts, reduction) if parts else None
