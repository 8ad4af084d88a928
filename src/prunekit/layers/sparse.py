"""Score-masked sparse layers (HYDRA / "hidden networks" style): `SparseConv2d`, `SparseLinear`.

Each weight w has a learnable score s. The forward pass uses w * m with m = TopK(|s|, k): the
k = round(density * numel) largest |s| of the layer are 1, the rest 0 (ties keep the lower flat
index, so the count is exact). The top-k has no gradient of its own; a straight-through
estimator passes dL/dm to |s| unchanged, so dL/ds = dL/dw_eff * w * sign(s). Weights may be
frozen (HYDRA's score training) or trainable (fine-tuning under a fixed top-k).

`sparsify_(model, density)` swaps every Conv2d/Linear for its sparse twin (same parameters);
`harden_(model)` turns them back into plain layers whose masks persist as
`prunekit.surgery.masks.Mask` parametrizations.

>>> import torch
>>> layer = SparseLinear(8, 4, density=0.25)
>>> int((layer.effective_weight() != 0).sum())
8
>>> layer(torch.randn(2, 8)).shape
torch.Size([2, 4])
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.names import within
from ..surgery.masks import apply_mask

__all__ = ["TopKStraightThrough", "keep_count", "topk_mask", "SparseMixin", "SparseConv2d",
           "SparseLinear", "scaled_scores", "sparsifiable", "sparsify_", "harden_", "sparse_layers", "set_density_", "train_scores_only_",
           "count_nonzeros", "SCORE_INITS"]

SCORE_INITS = ("kaiming", "scaled")


def keep_count(numel: int, density: float) -> int:
    """Weights kept at `density`: round(density * numel) with halves up, at least 1.

    >>> keep_count(10, 0.25), keep_count(9, 0.01), keep_count(100, 1.0)
    (3, 1, 100)
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"density={density!r} is invalid; use the kept share of weights in (0, 1]")
    return max(1, min(numel, int(math.floor(density * numel + 0.5))))


def topk_mask(magnitude: Tensor, k: int) -> Tensor:
    """Float 0/1 mask of magnitude's shape keeping its k largest entries; ties keep the lower index."""
    flat = magnitude.detach().flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat)
    mask[order[:k]] = 1.0
    return mask.view_as(magnitude)


class TopKStraightThrough(torch.autograd.Function):
    """Forward: `topk_mask(magnitude, k)`. Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, magnitude: Tensor, k: int) -> Tensor:  # noqa: D102
        return topk_mask(magnitude, k)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


def scaled_scores(weight: Tensor) -> Tensor:
    """HYDRA's scaled score init: sqrt(6 / fan_in) * w / max|w| (fan_in = in_channels * kh * kw).

    Scores then rank like |w| (magnitude pruning at the start) on the scale of kaiming_uniform.
    """
    fan_in = weight[0].numel()
    peak = weight.detach().abs().max().clamp_min(torch.finfo(weight.dtype).tiny)
    return math.sqrt(6.0 / fan_in) * weight.detach() / peak


class SparseMixin:
    """Shared part of the sparse layers: `scores`, `density`, the mask and its straight-through."""

    scores: nn.Parameter
    density: float

    def _init_sparse(self, density: float, score_init: str, freeze_weights: bool) -> None:
        if score_init not in SCORE_INITS:
            raise ConfigError(f"score_init={score_init!r} is not allowed; choose one of: {', '.join(SCORE_INITS)}")
        keep_count(self.weight.numel(), density)  # validates the density
        self.density = float(density)
        self.scores = nn.Parameter(torch.empty_like(self.weight))
        self.reset_scores(score_init)
        self.freeze_weights(freeze_weights)

    def reset_scores(self, score_init: str = "kaiming") -> None:
        """'kaiming': kaiming_uniform(a=sqrt(5)), the layers' own weight init; 'scaled': see
        `scaled_scores` (ranks like |w|)."""
        if score_init not in SCORE_INITS:
            raise ConfigError(f"score_init={score_init!r} is not allowed; choose one of: {', '.join(SCORE_INITS)}")
        with torch.no_grad():
            if score_init == "scaled":
                self.scores.copy_(scaled_scores(self.weight))
            else:
                nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    def freeze_weights(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) weight and bias; scores are untouched."""
        self.weight.requires_grad_(not frozen)
        if getattr(self, "bias", None) is not None:
            self.bias.requires_grad_(not frozen)

    @property
    def num_kept(self) -> int:
        return keep_count(self.weight.numel(), self.density)

    def mask(self) -> Tensor:
        """The current 0/1 mask (a straight-through function of the scores)."""
        if self.density >= 1.0:
            return torch.ones_like(self.weight)
        return TopKStraightThrough.apply(self.scores.abs(), self.num_kept)

    def effective_weight(self) -> Tensor:
        if self.density >= 1.0:  # dense phase: skip the sort (the mask would be all ones)
            return self.weight
        return self.weight * self.mask()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density:g}"  # type: ignore[misc]


class SparseConv2d(SparseMixin, nn.Conv2d):
    """`nn.Conv2d` whose weight is masked by the top-k of its scores (the paper's PrunedConv)."""

    def __init__(self, *args, density: float = 1.0, score_init: str = "kaiming",
                 freeze_weights: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_sparse(density, score_init, freeze_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class SparseLinear(SparseMixin, nn.Linear):
    """`nn.Linear` whose weight is masked by the top-k of its scores (the paper's PrunedLinear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float = 1.0,
                 score_init: str = "kaiming", freeze_weights: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_sparse(density, score_init, freeze_weights)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseMixin]]:
    """Every sparse layer of `model` as (name, module)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMixin)]


def train_scores_only_(weights: Iterable[nn.Parameter], model: nn.Module, scores: bool) -> list[SparseMixin]:
    """Score training (`scores=True`) freezes `weights` and trains every sparse layer's scores;
    any other phase trains the weights and freezes the scores. Returns the sparse layers."""
    for p in weights:
        p.requires_grad_(not scores)
    layers = [m for _, m in sparse_layers(model)]
    for m in layers:
        m.scores.requires_grad_(scores)
    return layers


def set_density_(model: nn.Module, density: float) -> None:
    """Set the density of every sparse layer of `model`."""
    for _, m in sparse_layers(model):
        keep_count(m.weight.numel(), density)
        m.density = float(density)


def _sparse_twin(mod: nn.Module, density: float, score_init: str, freeze: bool) -> nn.Module:
    """A sparse layer sharing `mod`'s parameters (same objects), its scores initialised."""
    if isinstance(mod, nn.Conv2d):
        new = SparseConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                           mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode,
                           device=mod.weight.device, dtype=mod.weight.dtype, density=density)
    else:
        new = SparseLinear(mod.in_features, mod.out_features, mod.bias is not None,
                           device=mod.weight.device, dtype=mod.weight.dtype, density=density)
    new.weight, new.bias = mod.weight, mod.bias
    new.train(mod.training)
    new.reset_scores(score_init)
    new.freeze_weights(freeze)
    return new


def sparsifiable(model: nn.Module, ignore: Iterable[str] = ()) -> list[str]:
    """Names of the plain Conv2d/Linear layers of `model` outside `ignore` (and its children):
    the layers `sparsify_` swaps."""
    ignore = tuple(ignore)
    return [n for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear) and not within(n, ignore)]


def sparsify_(model: nn.Module, density: float, score_init: str = "scaled", freeze_weights: bool = True,
              ignore: Iterable[str] = ()) -> list[str]:
    """Swap every plain Conv2d/Linear of `model` (names in `ignore` and their children excepted)
    for a sparse twin sharing its parameters; returns the swapped names.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 2))
    >>> sparsify_(net, 0.5), type(net[0]).__name__
    (['0', '2'], 'SparseConv2d')
    """
    chosen = sparsifiable(model, ignore)
    twins = {id(model.get_submodule(n)): _sparse_twin(model.get_submodule(n), density, score_init, freeze_weights)
             for n in chosen}
    _replace_everywhere(model, twins)
    return chosen


def _replace_everywhere(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Put `new[id(module)]` in the place of `module` under every name the model holds it by
    (a layer reached under two names stays one layer)."""
    names = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if id(m) in new]
    for name, mod in names:
        _set_submodule(model, name, new[id(mod)])


def harden_(model: nn.Module) -> list[str]:
    """Replace every sparse layer by its plain class carrying the current top-k as a persistent
    `Mask` (weights and masks then save, train and reload like any masked layer); returns names.
    Masked weights keep their stored values under the mask; parameters are the same objects."""
    layers = sparse_layers(model)
    plain = {id(mod): _plain_twin(mod) for _, mod in layers}
    _replace_everywhere(model, plain)
    return [name for name, _ in layers]


def _plain_twin(mod: SparseMixin) -> nn.Module:
    """The plain Conv2d/Linear holding `mod`'s parameters, its current top-k as a `Mask`."""
    with torch.no_grad():
        keep = topk_mask(mod.scores.abs(), mod.num_kept).bool() if mod.density < 1 else None
    if isinstance(mod, nn.Conv2d):
        plain = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                          mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode, device="meta")
    else:
        plain = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None, device="meta")
    plain.weight, plain.bias = mod.weight, mod.bias
    plain.weight.requires_grad_(True)
    if plain.bias is not None:
        plain.bias.requires_grad_(True)
    plain.train(mod.training)
    if keep is not None:
        apply_mask(plain, "weight", keep)
    return plain


def count_nonzeros(model: nn.Module) -> dict[str, int]:
    """{"nonzero": nonzero entries of the effective conv/linear weights, "total": their entries}.

    Effective means after masks (score top-k or `Mask` parametrizations): what inference uses.
    """
    nonzero = total = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, SparseMixin):
                w = mod.effective_weight()
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                w = mod.weight
            else:
                continue
            nonzero += int((w != 0).sum())
            total += w.numel()
    return {"nonzero": nonzero, "total": total}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ConfigError("the model itself is a single Conv2d/Linear; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
