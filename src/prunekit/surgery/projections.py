"""Euclidean projections onto sparsity sets: SLR's and ADMM's Z-step, and hard pruning.

`projection_mask(W, kind, sparsity)` returns the bool mask of the closest tensor in the set;
`project(W, kind, sparsity)` returns `W * mask`. Kinds (registry `PROJECTIONS`):

| kind      | zeroed unit (W of shape (out, in, kh, kw) or (out, in))             | count            |
|-----------|---------------------------------------------------------------------|------------------|
| irregular | single weights, smallest |w|                                        | round(s * numel) |
| nm        | in every m consecutive inputs keep the n largest |w| (s = 1 - n/m)  | numel * (m-n)/m  |
| filter    | whole output filters W[o], smallest L2 norm                         | round(s * out)   |
| channel   | whole input channels W[:, i], smallest L2 norm                      | round(s * in)    |
| column    | columns of W.reshape(out, in*kh*kw), smallest L2 norm               | round(s * cols)  |
| pattern   | per 3x3 kernel, one of 13 patterns with 4 zeros (s fixed at 4/9)    | 4 * out * in     |

"round" is half-up (`masks.prune_count`); ties keep the lower index. The zero count of every mask
is checked against the count above and a mismatch raises PruningError, so the achieved sparsity
is exact. Keeping the largest-norm units is the exact Euclidean projection for all kinds but
pattern, where it is the projection onto the union of the 13 pattern sets.

>>> import torch
>>> w = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
>>> project(w, "irregular", 0.5).tolist()
[[3.0, -0.0], [0.0, 2.0]]
>>> project(w, "filter", 0.5).tolist()
[[3.0, -1.0], [0.0, 0.0]]
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, PruningError
from ..core.registry import Registry
from .masks import _check_finite, _keep_top, nm_mask, prune_count, unstructured_mask

__all__ = [
    "PROJECTIONS",
    "PATTERN_ZEROS",
    "pattern_library",
    "projection_mask",
    "project",
    "global_irregular_masks",
    "project_global",
    "conv_layout",
    "transposed_groups",
]

# A kind maps (W, sparsity, **options) -> (bool mask of W's shape, expected number of zeros).
MaskFn = Callable[..., "tuple[Tensor, int]"]
PROJECTIONS: Registry[MaskFn] = Registry("projection")

# The 13 four-zero 3x3 patterns of the SLR/ADMM reference code (S10 slr/admm.py, "pattern"),
# written as flat row-major indices of the zeroed entries (0 1 2 / 3 4 5 / 6 7 8). Pattern 1
# zeroes the corners and keeps the centre cross; patterns 4, 11, 12 and 13 zero the centre.
PATTERN_ZEROS: tuple[tuple[int, int, int, int], ...] = (
    (0, 2, 6, 8), (0, 1, 7, 8), (0, 1, 6, 7), (0, 1, 3, 4),
    (2, 3, 5, 6), (0, 3, 5, 8), (1, 2, 6, 7), (1, 2, 7, 8),
    (3, 5, 6, 8), (0, 2, 3, 5), (4, 5, 7, 8), (3, 4, 6, 7),
    (1, 2, 4, 5),
)


def pattern_library(device: torch.device | str | None = None) -> Tensor:
    """The 13 patterns as a (13, 9) bool tensor of *kept* entries, in PATTERN_ZEROS order."""
    keep = torch.ones(len(PATTERN_ZEROS), 9, dtype=torch.bool, device=device)
    for i, zeros in enumerate(PATTERN_ZEROS):
        keep[i, list(zeros)] = False
    return keep


def _need_sparsity(kind: str, sparsity: float | None) -> float:
    if sparsity is None:
        raise ConfigError(f"projection {kind!r} needs a sparsity in [0, 1)")
    return sparsity


def _need_matrix(w: Tensor, kind: str) -> None:
    if w.dim() < 2:
        raise PruningError(
            f"projection {kind!r} needs a weight with at least 2 dimensions (out, in, ...), "
            f"got shape {tuple(w.shape)}; use 'irregular' for vectors"
        )


def _scores(w: Tensor) -> Tensor:
    """Magnitudes in at least float32, so low-precision weights rank like their float32 copies."""
    w = w.detach()
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


@PROJECTIONS.register("irregular")
def _irregular(w: Tensor, sparsity: float | None = None) -> tuple[Tensor, int]:
    s = _need_sparsity("irregular", sparsity)
    return unstructured_mask(w, s), prune_count(w.numel(), s)


@PROJECTIONS.register("nm")
def _nm(w: Tensor, sparsity: float | None = None, n: int = 2, m: int = 4, dim: int = 1) -> tuple[Tensor, int]:
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise ConfigError(
            f"projection 'nm' with n={n}, m={m} has sparsity {1 - n / m:g}, but sparsity={sparsity} "
            "was asked; leave sparsity unset (None) or change n and m"
        )
    mask = nm_mask(w, n, m, dim)
    return mask, w.numel() // m * (m - n)


@PROJECTIONS.register("filter")
def _filter(w: Tensor, sparsity: float | None = None) -> tuple[Tensor, int]:
    s = _need_sparsity("filter", sparsity)
    _need_matrix(w, "filter")
    out = w.shape[0]
    k = prune_count(out, s, "filters")
    norms = _scores(w).reshape(out, -1).norm(dim=1)  # (out,)
    keep = _keep_top(norms, out - k).view(-1, *([1] * (w.dim() - 1)))
    return keep.expand(w.shape).contiguous(), k * (w.numel() // out)


@PROJECTIONS.register("channel")
def _channel(w: Tensor, sparsity: float | None = None) -> tuple[Tensor, int]:
    s = _need_sparsity("channel", sparsity)
    _need_matrix(w, "channel")
    cin = w.shape[1]
    k = prune_count(cin, s, "input channels")
    norms = _scores(w).transpose(0, 1).reshape(cin, -1).norm(dim=1)  # (in,)
    keep = _keep_top(norms, cin - k).view(1, -1, *([1] * (w.dim() - 2)))
    return keep.expand(w.shape).contiguous(), k * (w.numel() // cin)


@PROJECTIONS.register("column")
def _column(w: Tensor, sparsity: float | None = None) -> tuple[Tensor, int]:
    s = _need_sparsity("column", sparsity)
    _need_matrix(w, "column")
    out = w.shape[0]
    cols = w.numel() // out
    k = prune_count(cols, s, "columns")
    norms = _scores(w).reshape(out, cols).norm(dim=0)  # (in*kh*kw,)
    keep = _keep_top(norms, cols - k).view(1, cols)
    return keep.expand(out, cols).reshape(w.shape).contiguous(), k * out


@PROJECTIONS.register("pattern")
def _pattern(w: Tensor, sparsity: float | None = None) -> tuple[Tensor, int]:
    if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
        raise PruningError(f"projection 'pattern' needs a 3x3 conv weight (out, in, 3, 3), got {tuple(w.shape)}")
    if sparsity is not None and abs(sparsity - 4 / 9) > 1e-9:
        raise ConfigError(
            f"projection 'pattern' zeroes 4 of 9 entries per kernel (sparsity 4/9); "
            f"sparsity={sparsity} cannot be met: leave sparsity unset (None)"
        )
    _check_finite(w, "projection 'pattern'")
    sq = _scores(w).reshape(-1, 9) ** 2  # (out*in, 9)
    library = pattern_library(w.device)  # (13, 9)
    kept_energy = sq @ library.to(sq.dtype).T  # (out*in, 13): squared norm each pattern keeps
    best = kept_energy.argmax(dim=1)  # first maximum wins, as in the reference's max()
    return library[best].reshape(w.shape), 4 * (w.numel() // 9)


def projection_mask(w: Tensor, kind: str, sparsity: float | None = None, **options) -> Tensor:
    """Bool mask (w's shape) of the projection of `w` onto the `kind` sparsity set.

    Options: n, m, dim for "nm". Raises PruningError if the zero count is not the exact target.

    >>> projection_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0]]), "nm").tolist()
    [[False, True, True, False]]
    """
    fn = PROJECTIONS.get(kind)
    try:
        mask, expected = fn(w, sparsity, **options)
    except TypeError as err:
        raise ConfigError(f"projection {kind!r}: bad options {sorted(options)} ({err})") from None
    zeros = int((~mask).sum())
    if mask.shape != w.shape or zeros != expected:
        raise PruningError(
            f"projection {kind!r} produced {zeros} zeros (mask shape {tuple(mask.shape)}) on a tensor "
            f"of shape {tuple(w.shape)}; expected exactly {expected}"
        )
    return mask


def project(w: Tensor, kind: str, sparsity: float | None = None, **options) -> Tensor:
    """Π_S(w): the closest tensor to `w` in the `kind` sparsity set (a new tensor, w unchanged)."""
    return w * projection_mask(w, kind, sparsity, **options)


def global_irregular_masks(tensors: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """One magnitude threshold across all tensors; exactly round(s * total numel) zeros in all.

    Ties keep the entry that comes first in (tensor order, flat index). A layer may end up
    entirely zero, as with any global magnitude criterion.

    >>> a, b = torch.tensor([1.0, 5.0]), torch.tensor([2.0, 0.5, 4.0])
    >>> [m.tolist() for m in global_irregular_masks([a, b], 0.4)]
    [[False, True], [True, False, True]]
    """
    tensors = list(tensors)
    if not tensors:
        raise PruningError("global_irregular_masks: no tensors given")
    for t in tensors:
        _check_finite(t, "global_irregular_masks")
    device = tensors[0].device
    scores = torch.cat([_scores(t).abs().flatten().to(device, torch.float64) for t in tensors])
    total = scores.numel()
    k = prune_count(total, sparsity)
    keep = _keep_top(scores, total - k)
    masks = [part.view(t.shape).to(t.device) for part, t in zip(keep.split([t.numel() for t in tensors]), tensors)]
    zeros = sum(int((~m).sum()) for m in masks)
    if zeros != k:
        raise PruningError(f"global projection produced {zeros} zeros; expected exactly {k}")
    return masks


def project_global(tensors: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Global irregular projection: each tensor times its `global_irregular_masks` mask."""
    return [t * m for t, m in zip(tensors, global_irregular_masks(tensors, sparsity))]


def conv_layout(w: Tensor, groups: int) -> Tensor:
    """A transposed conv's weight (in, out / g, *k) in a conv's layout (out, in / g, *k), and back:
    the map is its own inverse.

    >>> import torch
    >>> w = torch.arange(8).view(4, 2, 1)  # in=4, out=4, groups=2
    >>> conv_layout(w, 2)[:, :, 0].tolist()
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    >>> torch.equal(conv_layout(conv_layout(w, 2), 2), w)
    True
    """
    a, b, k = w.shape[0], w.shape[1], w.shape[2:]
    # (g, rows / g, cols, *k) -> (g, cols, rows / g, *k): each group's block transposed
    return w.reshape(groups, a // groups, b, *k).transpose(1, 2).reshape(b * groups, a // groups, *k).contiguous()


def transposed_groups(model: nn.Module, name: str) -> int | None:
    """The groups of the transposed conv whose weight `name` (a parameter name) is; else None.
    Such a weight is stored (in, out / groups, *k): `conv_layout` gives it a conv's layout."""
    owner, _, tensor = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and tensor == "weight":
        return module.groups
    return None
