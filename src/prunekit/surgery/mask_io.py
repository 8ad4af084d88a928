"""Masks on disk: bit packing, what kind a mask is, the effective state, and putting masks back.

A model's *effective* state resolves every `Mask`: "conv.weight" holds weight * mask (what the
forward pass uses) instead of the two entries "conv.parametrizations.weight.original" and
"...weight.0.mask". The masks themselves are stored apart, packed 8 entries per byte.
`describe_masks(model)` says which tensors are masked, how (kind "irregular", "nm" with n and
m, or "pattern": 3x3 kernels each keeping one of the 13 SLR patterns) and how sparse.

>>> import torch
>>> from torch import nn
>>> from prunekit.surgery.masks import apply_mask, nm_mask
>>> lin = nn.Linear(8, 2)
>>> with torch.no_grad(): _ = lin.weight.copy_(torch.arange(16.0).view(2, 8) % 5)
>>> _ = apply_mask(lin, "weight", nm_mask(lin.weight, 2, 4))
>>> d = describe_masks(lin)["tensors"]["weight"]
>>> d["kind"], d["n"], d["m"], d["sparsity"]
('nm', 2, 4, 0.5)
>>> bool(torch.equal(unpack_mask(pack_mask(get_mask(lin, "weight")), (2, 8)), get_mask(lin, "weight")))
True
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.errors import CheckpointError, PruningError
from .masks import Mask, apply_mask, get_mask, masked_modules, sparsity_report
from .projections import conv_layout, pattern_library, transposed_groups

__all__ = ["pack_mask", "unpack_mask", "mask_kind", "is_nm", "effective_state", "describe_masks",
           "restore_masks_", "check_masks", "restore_masks_from_state", "tied_values", "plain_state_names",
           "weight_sparsity", "MASKS_FORMAT_VERSION"]

MASKS_FORMAT_VERSION = 1
# "<module>.parametrizations.<tensor>.<index>.mask": the buffer of a Mask in a state dict
_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(\d+)\.mask$")
# "<module>.parametrizations.<tensor>.original": the stored tensor under the parametrizations
_ORIGINAL_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


def pack_mask(mask: Tensor) -> Tensor:
    """Bool mask -> uint8 tensor of ceil(numel / 8) bytes (row-major, first entry in the high bit)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy().astype(bool)))


def unpack_mask(bits: Tensor, shape: Any) -> Tensor:
    """Inverse of `pack_mask`: a bool tensor of `shape`."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise CheckpointError(f"packed mask shape {str(shape)[:80]} is not a list of whole numbers")
    shape = tuple(shape)
    if any(s < 0 for s in shape):  # (-64, -32, 3, 3) has as many entries as (64, 32, 3, 3)
        raise CheckpointError(f"packed mask shape {list(shape)} has a negative size")
    numel = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != math.ceil(numel / 8):
        raise CheckpointError(f"packed mask of {bits.numel()} {bits.dtype} bytes cannot hold {numel} entries")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool)).view(shape)


def mask_kind(mask: Tensor, groups: int | None = None) -> dict[str, Any]:
    """{"kind": "nm", "n", "m"} | {"kind": "pattern"} | {"kind": "irregular"} for a full-shape mask.

    N:M: every run of m entries along dim 1 keeps the same n < m (m tried in 2, 4, 8, 16).
    Pattern: a (out, in, 3, 3) mask whose every kernel keeps one of the 13 four-zero patterns.
    `groups`: the mask is a transposed conv's weight, (in, out / groups, *k); it is read in a
    conv's layout (out, in / groups, *k), where its inputs run along dim 1 as for any layer.
    """
    if groups is not None:
        mask = conv_layout(mask, groups)
    for m in (2, 4, 8, 16):  # smallest m first: a 1:2 mask is also 2:4, and 1:2 says more
        runs = _kept_per_run(mask, m)
        if runs is not None and 0 < int(runs[0]) < m and bool((runs == runs[0]).all()):  # 0:m is no N:M
            return {"kind": "nm", "n": int(runs[0]), "m": m}
    if mask.dim() == 4 and tuple(mask.shape[2:]) == (3, 3) and mask.numel():
        kernels = mask.reshape(-1, 1, 9)  # (out*in, 1, 9) against the (13, 9) library
        hits = (kernels == pattern_library(mask.device).unsqueeze(0)).all(dim=2).any(dim=1)
        if bool(hits.all()):
            return {"kind": "pattern"}
    return {"kind": "irregular"}


def _kept_per_run(mask: Tensor, m: int) -> Tensor | None:
    """Kept entries in each run of `m` consecutive inputs (dim 1), or None if dim 1 does not split."""
    if mask.dim() < 2 or mask.shape[1] % m or not mask.numel():
        return None
    return mask.movedim(1, -1).reshape(-1, m).sum(dim=1)


def is_nm(mask: Tensor, n: int, m: int) -> bool:
    """True when every run of `m` entries along dim 1 keeps exactly `n` (2:4 for sparse kernels)."""
    runs = _kept_per_run(mask, m)
    return runs is not None and bool((runs == n).all())


def effective_state(model: nn.Module) -> dict[str, tuple[Tensor, Tensor | None]]:
    """{plain name: (effective tensor, full-shape bool mask or None)}, state_dict order.

    Only our `Mask` may parametrize a tensor (anything else raises PruningError): the file
    formats store plain tensors plus masks. A masked module reached under several names (one
    layer called twice) gives every name the same tensor object, as `state_dict` would.
    """
    skip, out = [], {}
    first: dict[int, str] = {}  # id(module) -> the prefix it was met under first
    for mname, module in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(module):
            continue
        prefix = f"{mname}." if mname else ""
        skip.append(f"{prefix}parametrizations.")
        seen = first.setdefault(id(module), prefix)
        for pname, plist in module.parametrizations.items():
            if len(plist) != 1 or not isinstance(plist[0], Mask):
                raise PruningError(f"{prefix}{pname} has parametrizations other than a prunekit Mask; "
                                   "remove them (torch.nn.utils.parametrize) before saving")
            if seen != prefix:
                out[prefix + pname] = out[seen + pname]
                continue
            with torch.no_grad():
                w = getattr(module, pname).detach()
            out[prefix + pname] = (w, get_mask(module, pname).expand(w.shape))
    for key, t in model.state_dict().items():
        if not any(key.startswith(p) for p in skip):
            out[key] = (t.detach(), None)
    return out


def describe_masks(model: nn.Module) -> dict[str, Any]:
    """Which tensors carry a Mask, each with shape, kind, numel, masked count and sparsity.

    Totals over all masked tensors are given too; `sparsity` = masked / numel (exact counts).
    """
    tensors, total, masked = {}, 0, 0
    for mname, module, pname in masked_modules(model):
        w = getattr(module, pname)
        mask = get_mask(module, pname).expand(w.shape)
        n_masked = int((~mask).sum())
        key = f"{mname}.{pname}" if mname else pname
        tensors[key] = {"shape": list(w.shape), **mask_kind(mask, transposed_groups(model, key)), "numel": w.numel(),
                        "masked": n_masked, "sparsity": n_masked / max(w.numel(), 1)}
        total, masked = total + w.numel(), masked + n_masked
    return {"format_version": MASKS_FORMAT_VERSION, "tensors": tensors, "numel": total, "masked": masked,
            "sparsity": masked / total if total else 0.0}


def restore_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Put a `Mask` on every "module.tensor" named in `masks` (bool, broadcastable); returns model.

    Every mask is checked first (`check_masks`), so a mismatch raises CheckpointError with
    nothing masked yet.
    """
    for module, pname, mask in check_masks(model, masks):
        apply_mask(module, pname, mask)
    return model


def check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> list[tuple[nn.Module, str, Tensor]]:
    """(module, tensor name, mask) for every "module.tensor" of `masks`, each checked to name a
    floating-point tensor of `model`, to broadcast to it and to hold only 0 and 1; CheckpointError
    otherwise."""
    targets = []
    for name, mask in masks.items():
        mname, _, pname = name.rpartition(".")
        try:
            module = model.get_submodule(mname) if mname else model
        except AttributeError:
            raise CheckpointError(f"mask for {name}: the model has no module {mname!r}") from None
        w = getattr(module, pname, None)
        try:
            fits = isinstance(w, Tensor) and torch.broadcast_shapes(mask.shape, w.shape) == w.shape
        except RuntimeError:
            fits = False
        if not fits:
            got = tuple(w.shape) if isinstance(w, Tensor) else None
            raise CheckpointError(f"mask for {name} has shape {tuple(mask.shape)} but the model's tensor is {got}")
        if not w.is_floating_point():
            raise CheckpointError(f"mask for {name}: only floating-point tensors can be masked, and this one is "
                                  f"{w.dtype}; the file is damaged or was written for another model")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise CheckpointError(f"mask for {name} holds values other than 0 and 1; the file is damaged")
        targets.append((module, pname, mask))
    return targets


def tied_values(model: nn.Module, tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` (effective values by plain name), with each masked name that `model` ties to
    other names given the shared tensor's full values, so that loading every name into the one
    tensor and then putting the masks back reproduces each holder's effective values.

    A masked entry holds zeros where its own mask hides values another holder uses (an output
    layer sharing its embedding's weight, or two layers masking one weight differently): loading
    it as is would write those zeros into the shared tensor. The full values are a holder's
    stored without a mask, else, entry by entry, those of any masked holder whose mask keeps the
    entry (an entry that every mask hides is 0).
    """
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    out = dict(tensors)
    for tied in names.values():
        masked = [n for n in tied if n in masks and n in tensors]
        if not masked or len(tied) < 2:
            continue
        plain = [n for n in tied if n not in masks and n in tensors]
        if plain:
            full = tensors[plain[0]]
        else:
            full = tensors[masked[0]]
            for name in masked[1:]:
                full = torch.where(masks[name].expand(full.shape), tensors[name], full)
        for name in masked:
            out[name] = full
    return out


def plain_state_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` as an unmasked model would name it: "m.parametrizations.w.original" -> "m.w",
    Mask buffers dropped. Lets a masked state be compared with a fresh model's."""
    out = {}
    for key, value in state.items():
        if _MASK_KEY.match(key):
            continue
        hit = _ORIGINAL_KEY.match(key)
        if hit is not None:
            key = f"{hit.group(1)}.{hit.group(2)}" if hit.group(1) else hit.group(2)
        out[key] = value
    return out


def unpaired_masks(state: Mapping[str, Tensor]) -> list[str]:
    """Mask buffer keys of `state` whose masked tensor ("...parametrizations.w.original") it lacks:
    a state no masked model wrote (damaged or edited)."""
    out = []
    for key in state:
        hit = _MASK_KEY.match(key)
        if hit is not None:
            prefix = f"{hit.group(1)}." if hit.group(1) else ""
            if f"{prefix}parametrizations.{hit.group(2)}.original" not in state:
                out.append(key)
    return out


def restore_masks_from_state(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Mask the tensors of `model` whose Mask buffers `state` holds but the model lacks.

    This lets a state dict written from a masked model (a training checkpoint) load into a
    freshly built one: afterwards `model.load_state_dict(state)` finds every key. Returns the
    "module.tensor" names masked here.
    """
    own = set(model.state_dict())
    found = {}
    for key, value in state.items():
        hit = _MASK_KEY.match(key)
        if hit is None or key in own:
            continue
        if hit.group(3) != "0":
            raise CheckpointError(f"{key}: only a single prunekit Mask per tensor can be restored")
        name = f"{hit.group(1)}.{hit.group(2)}" if hit.group(1) else hit.group(2)
        found[name] = value
    try:
        restore_masks_(model, found)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; build the architecture the state was saved from") from None
    return sorted(found)


def weight_sparsity(model: nn.Module) -> dict[str, Any]:
    """Exact zeros counted in the effective weights (never taken from a config).

    "tensors": `sparsity_report` per masked tensor; "masked": zeros / numel over all masked
    tensors; "weights": the same over every conv and linear weight, masked or not. A structured
    sparse conv (`SSCConv2d`) counts as the full dense conv it stands for (out x in x k x k), of
    which every weight off its support, or exactly zero on it, is a zero.
    """
    from ..layers.ssc import SSCConv2d

    report = sparsity_report(model)
    for mname, module, pname in masked_modules(model):  # each tensor's mask kind: 2:4, pattern, irregular
        key = f"{mname}.{pname}" if mname else pname
        kind = mask_kind(get_mask(module, pname).expand(getattr(module, pname).shape), transposed_groups(model, key))
        report[key]["kind"] = f"{kind['n']}:{kind['m']}" if kind["kind"] == "nm" else kind["kind"]
    zeros, numel = sum(e["zeros"] for e in report.values()), sum(e["numel"] for e in report.values())
    wz = wn = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SSCConv2d):
                n = module.out_channels * module.in_channels * module.kernel_size ** 2
                wz, wn = wz + n - int((module.dense_weight() != 0).sum()), wn + n
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(module.weight, Tensor):
                w = module.weight  # the effective weight when masked
                wz, wn = wz + int((w == 0).sum()), wn + w.numel()
    return {"tensors": report, "masked": {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0},
            "weights": {"zeros": wz, "numel": wn, "sparsity": wz / wn if wn else 0.0}}
