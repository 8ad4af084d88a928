"""Weight masks as PyTorch parametrizations, and the builders of 0/1 masks.

A mask is a `Mask` parametrization (torch.nn.utils.parametrize): the module's `weight` becomes
`original * mask`, so the forward pass, `state_dict` and gradients all see the masked weight, and
masked entries get exactly zero gradient. `remove_masks(model, bake=True)` turns the model back
into plain parameters holding the zeros.

>>> import torch
>>> from torch import nn
>>> lin = nn.Linear(4, 2)
>>> m = apply_mask(lin, "weight", unstructured_mask(lin.weight, 0.5))
>>> int((lin.weight == 0).sum())
4
>>> remove_masks(lin)
1
>>> type(lin.weight).__name__, int((lin.weight == 0).sum())
('Parameter', 4)
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError, PruningError

__all__ = [
    "Mask",
    "apply_mask",
    "get_mask",
    "masked_modules",
    "remove_masks",
    "bake_masks_",
    "sparsity_report",
    "prune_count",
    "unstructured_mask",
    "nm_mask",
    "channel_mask",
]


class Mask(nn.Module):
    """Parametrization `weight -> weight * mask`; `mask` is a bool buffer broadcastable to weight."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"shape={tuple(self.mask.shape)}, kept={kept}/{self.mask.numel()}"


def _as_bool_mask(mask: Tensor | Any, weight: Tensor, where: str) -> Tensor:
    """Check that `mask` is 0/1 and broadcastable to `weight`; return it as bool on weight's device."""
    if not isinstance(mask, Tensor):
        raise PruningError(f"{where}: mask must be a torch.Tensor, got {type(mask).__name__}")
    try:
        shape = torch.broadcast_shapes(mask.shape, weight.shape)
    except RuntimeError:
        shape = None
    if shape != weight.shape:
        raise PruningError(
            f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to the weight's shape "
            f"{tuple(weight.shape)}; give a mask of that shape or one with size-1 dimensions"
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise PruningError(f"{where}: mask values must be 0 or 1 (or bool)")
        mask = mask != 0
    return mask.to(weight.device)


def _our_index(module: nn.Module, name: str) -> int | None:
    """Position of our Mask in the parametrization list of `module.name`, or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    for i, p in enumerate(module.parametrizations[name]):
        if isinstance(p, Mask):
            return i
    return None


def apply_mask(module: nn.Module, param_name: str, mask: Tensor) -> Mask:
    """Mask `module.<param_name>` in place; return the `Mask` parametrization.

    If the tensor already carries a Mask of ours, its mask is *replaced* (not intersected):
    entries the old mask hid and the new one keeps come back with their stored values. Other
    parametrizations on the same tensor stay; a new Mask is appended, so it acts on their output
    (the effective weight is zero wherever the mask is zero).

    >>> lin = nn.Linear(3, 2)
    >>> _ = apply_mask(lin, "weight", torch.tensor([[1, 0, 1], [0, 1, 1]]))
    >>> bool(lin.weight[0, 1] == 0)
    True
    """
    where = f"apply_mask({type(module).__name__}.{param_name})"
    weight = getattr(module, param_name, None)
    if not isinstance(weight, Tensor):
        raise PruningError(f"{where}: the module has no tensor named {param_name!r}")
    if not weight.is_floating_point():
        raise PruningError(f"{where}: only floating-point tensors can be masked, got {weight.dtype}")
    bool_mask = _as_bool_mask(mask, weight, where)
    idx = _our_index(module, param_name)
    if idx is not None:
        ours = module.parametrizations[param_name][idx]
        ours.mask = bool_mask.clone()
        return ours
    ours = Mask(bool_mask)
    parametrize.register_parametrization(module, param_name, ours)
    return ours


def get_mask(module: nn.Module, name: str) -> Tensor | None:
    """The bool mask of our Mask on `module.<name>`, or None when it is not masked."""
    idx = _our_index(module, name)
    return None if idx is None else module.parametrizations[name][idx].mask


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every masked tensor as (module name, module, tensor name), in `named_modules` order."""
    found = []
    for mname, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname in module.parametrizations:
            if _our_index(module, pname) is not None:
                found.append((mname, module, pname))
    return found


def remove_masks(model: nn.Module, bake: bool = True) -> int:
    """Remove every Mask of ours; return how many were removed.

    bake=True multiplies the masks into the weights for good (plain `nn.Parameter`s holding
    zeros, same parameter objects, so optimizers stay valid); bake=False restores the stored,
    unmasked values. A masked tensor that other modules also hold (an output layer tied to its
    embedding) is baked into a copy of its own, so the other holders keep their values. A mask
    that sits *after* another parametrization cannot be baked into the raw tensor; that case
    raises PruningError before anything is changed.
    """
    entries = masked_modules(model)
    if bake:
        for mname, module, pname in entries:
            idx = _our_index(module, pname)
            if idx != 0:
                raise PruningError(
                    f"cannot bake the mask on {mname}.{pname}: it follows {idx} other "
                    "parametrization(s); remove those first or call remove_masks(bake=False)"
                )
    holders: dict[int, int] = {}  # id(tensor) -> how many module slots hold it
    for module in model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                holders[id(t)] = holders.get(id(t), 0) + 1
    for _, module, pname in entries:
        plist = module.parametrizations[pname]
        idx = _our_index(module, pname)
        original = plist.original
        shared = bake and holders.get(id(original), 0) > 1
        if shared:
            holders[id(original)] -= 1
        if len(plist) == 1:
            if shared:
                with torch.no_grad():
                    baked = getattr(module, pname).detach().clone()
                remove_parametrization_(module, pname, leave_parametrized=False)
                setattr(module, pname, _like(original, baked))
            else:
                remove_parametrization_(module, pname, leave_parametrized=bake)
            continue
        if bake:  # idx == 0: masking the raw tensor is the same as masking the first stage's input
            with torch.no_grad():
                if shared:
                    plist.original = _like(original, original.detach() * plist[idx].mask)
                else:
                    original.mul_(plist[idx].mask)
        del plist[idx]
    return len(entries)


def _like(original: Tensor, value: Tensor) -> Tensor:
    """`value` as the kind of tensor `original` is: a Parameter with its requires_grad, or a buffer."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(value, requires_grad=original.requires_grad)
    return value


def remove_parametrization_(module: nn.Module, name: str, leave_parametrized: bool) -> None:
    """`parametrize.remove_parametrizations(module, name, ...)`, confined to `module`.

    torch keeps the parametrized properties on a generated class, and a deep copy shares that
    class with the original; removing the copy's last parametrization deletes the property from
    the shared class, and the original then has no `weight`. The module first gets a private copy
    of its class (same base, same dict), so the removal touches this module only."""
    cls = module.__class__
    module.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in cls.__dict__.items()
                                                          if k not in ("__dict__", "__weakref__")})
    parametrize.remove_parametrizations(module, name, leave_parametrized=leave_parametrized)


def masked_hint(model: nn.Module) -> str:
    """Why channels may be out of reach: the tracer keeps every channel a weight mask touches
    ('' when no layer carries a mask)."""
    masked = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if not masked:
        return ""
    return (f"; {len(masked)} layer(s) carry weight masks ({', '.join(masked[:3])}{', ...' if len(masked) > 3 else ''}), "
            "whose channels are kept: "
            "bake them first (prunekit.bake_masks_), see docs/masks.md")


def bake_masks_(model: nn.Module) -> nn.Module:
    """Multiply every Mask into its weight for good and drop the parametrizations; returns model.

    The export step of the mask lifecycle: afterwards the model is plain PyTorch (no
    parametrize), its state_dict has the usual names, and the masked entries are exact zeros.

    >>> lin = nn.Linear(4, 2)
    >>> _ = apply_mask(lin, "weight", unstructured_mask(lin.weight, 0.5))
    >>> sorted(bake_masks_(lin).state_dict()), int((lin.weight == 0).sum())
    (['bias', 'weight'], 4)
    """
    remove_masks(model, bake=True)
    return model


def sparsity_report(model: nn.Module) -> dict[str, dict[str, float | int]]:
    """Exact zero counts of every masked tensor, keyed "module.tensor".

    Each entry: numel, masked (entries the mask removes), zeros (exact zeros of the effective
    weight, >= masked), sparsity = zeros / numel.
    """
    report = {}
    for mname, module, pname in masked_modules(model):
        with torch.no_grad():
            w = getattr(module, pname)
            mask = get_mask(module, pname).expand(w.shape)
            zeros = int((w == 0).sum())
        key = f"{mname}.{pname}" if mname else pname
        report[key] = {
            "numel": w.numel(),
            "masked": int((~mask).sum()),
            "zeros": zeros,
            "sparsity": zeros / w.numel(),
        }
    return report


def prune_count(total: int, sparsity: float, unit: str = "weights") -> int:
    """How many of `total` units a sparsity removes: floor(sparsity * total + 0.5) (half rounds up).

    Raises ConfigError for a sparsity outside [0, 1] and PruningError when nothing would be kept.

    >>> prune_count(10, 0.7), prune_count(3, 0.5)
    (7, 2)
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        raise ConfigError(f"sparsity={sparsity!r} is invalid; use a number in [0, 1)")
    k = removal_count(total, sparsity)
    if k >= total:
        raise PruningError(
            f"sparsity {sparsity} of {total} {unit} keeps none of them; use a sparsity of at most "
            f"{highest_keeping(total, 1)} (it keeps one: the count rounds half up)"
        )
    return k


def removal_count(total: int, sparsity: float) -> int:
    """floor(sparsity * total + 0.5): the units a sparsity removes (half rounds up), unchecked."""
    return int(math.floor(sparsity * total + 0.5))


def highest_keeping(total: int, keep: int) -> str:
    """The largest sparsity, written with 4 decimals or as many more as it takes, whose
    floor(s * total + 0.5) removal still keeps `keep` of `total`.

    >>> highest_keeping(1676, 2), highest_keeping(10, 1)
    ('0.9991', '0.9499')
    """
    limit = (total - keep + 0.5) / total  # keeping `keep` needs s < limit
    digits = 4
    while True:
        value = (math.ceil(limit * 10 ** digits) - 1) / 10 ** digits
        if value >= 0 or digits > 12:
            return f"{max(value, 0.0):.{digits}f}"
        digits += 1


def _check_finite(w: Tensor, where: str) -> None:
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise PruningError(f"{where}: the tensor holds NaN or inf; magnitudes cannot rank it")


def _keep_top(scores: Tensor, n_keep: int) -> Tensor:
    """Bool mask over a 1-D `scores` keeping the `n_keep` largest; ties keep the lower index."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:n_keep]] = True
    return keep


def unstructured_mask(w: Tensor, sparsity: float) -> Tensor:
    """Bool mask of w's shape zeroing exactly prune_count(numel, sparsity) smallest |w|.

    Ties at the threshold are broken by flat index (the lower index is kept), so the count is
    exact and the result deterministic.

    >>> unstructured_mask(torch.tensor([0.5, -2.0, 0.5, 0.1]), 0.5).tolist()
    [True, True, False, False]
    """
    _check_finite(w, "unstructured_mask")
    k = prune_count(w.numel(), sparsity)
    scores = w.detach().abs().flatten()
    return _keep_top(scores, w.numel() - k).view(w.shape)


def nm_mask(w: Tensor, n: int = 2, m: int = 4, dim: int = 1) -> Tensor:
    """N:M mask: in every run of `m` consecutive entries along `dim`, keep the `n` largest |w|.

    dim=1 is the input dimension of Linear (out, in) and Conv (out, in, kh, kw) weights, the
    layout sparse tensor cores expect for 2:4. Ties keep the lower index.

    >>> nm_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0]]), 2, 4).tolist()
    [[False, True, True, False]]
    """
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"nm_mask: {name}={v!r} must be an integer")
    if not 1 <= n <= m:
        raise ConfigError(f"nm_mask: need 1 <= n <= m, got n={n}, m={m}")
    if w.dim() == 0 or not -w.dim() <= dim < w.dim():
        raise PruningError(f"nm_mask: dim={dim} is invalid for a tensor of shape {tuple(w.shape)}")
    size = w.shape[dim]
    if size % m:
        raise PruningError(
            f"nm_mask: dimension {dim} of shape {tuple(w.shape)} has size {size}, not divisible "
            f"by m={m}; N:M sparsity needs groups of m along that dimension"
        )
    _check_finite(w, "nm_mask")
    x = w.detach().abs().movedim(dim, -1)  # (..., size)
    blocks = x.reshape(*x.shape[:-1], size // m, m)  # (..., size/m, m)
    order = torch.argsort(blocks, dim=-1, descending=True, stable=True)
    keep = torch.zeros(blocks.shape, dtype=torch.bool, device=w.device)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(x.shape).movedim(-1, dim).contiguous()


def channel_mask(
    size: Sequence[int], keep_indices: Iterable[int] | Tensor, dim: int = 0, device: Any = None
) -> Tensor:
    """Bool mask keeping whole channels along `dim`, shaped to broadcast to a weight of `size`.

    dim=0 gives an output-channel mask: (C, 1, 1, 1) for a conv weight, (C, 1) for a Linear.

    >>> channel_mask((3, 2, 1, 1), [0, 2]).flatten().tolist()
    [True, False, True]
    """
    size = tuple(int(s) for s in size)
    if not size or not -len(size) <= dim < len(size):
        raise PruningError(f"channel_mask: dim={dim} is invalid for size {size}")
    channels = size[dim]
    idx = torch.as_tensor(list(keep_indices) if not isinstance(keep_indices, Tensor) else keep_indices)
    idx = idx.to(torch.long).flatten()
    if idx.numel() == 0:
        raise PruningError("channel_mask: keep_indices is empty; keeping no channel would empty the layer")
    if int(idx.min()) < 0 or int(idx.max()) >= channels:
        raise PruningError(f"channel_mask: keep_indices must lie in [0, {channels - 1}], got {idx.tolist()}")
    if idx.unique().numel() != idx.numel():
        raise PruningError(f"channel_mask: keep_indices has duplicates: {idx.tolist()}")
    shape = [1] * len(size)
    shape[dim] = channels
    mask = torch.zeros(channels, dtype=torch.bool, device=device)
    mask[idx.to(mask.device)] = True
    return mask.view(shape)
