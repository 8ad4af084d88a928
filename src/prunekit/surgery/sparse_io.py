"""Compact sparse checkpoints (safetensors + JSON metadata, no pickle) and 2:4 tensor-core weights.

`save_sparse(model, path)` stores every floating tensor of the model's *effective* state (masks
applied, plain names such as "conv.weight") either dense or as its kept values plus a bit mask
packed 8 entries per byte (numpy.packbits), whichever is smaller. A masked tensor always uses
the bit mask of its `Mask`, so `load_sparse(..., restore_masks=True)` brings the masks back for
masked retraining. At 90% sparsity an fp32 tensor takes 0.1*4 + 1/8 = 0.525 bytes per entry,
13% of dense.

File layout: tensor "<name>" (dense) or "<name>::values" + "<name>::bits" (uint8); metadata key
"prunekit_sparse" holds JSON {"format_version": 1, "tensors": {name: {"shape", "dtype",
"encoding": "dense"|"bitmask", "kind": "dense"|"irregular"|"nm", "n"?, "m"?, "masked"}}}, and
"prunekit.module_versions" the per-module state-dict versions, as in the pruned file (`tensor_file`),
with the sha256 of the tensors and of the metadata, verified on load (a flipped bit is one
CheckpointError; files written without them load unverified).

>>> import tempfile, os, torch
>>> from torch import nn
>>> net = nn.Linear(64, 64)
>>> with torch.no_grad(): net.weight[:, :48] = 0
>>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
>>> save_sparse(net, path)["weight"]["encoding"]
'bitmask'
>>> twin = nn.Linear(64, 64)
>>> _ = load_sparse(twin, path)
>>> torch.equal(twin.weight, net.weight)
True
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import CheckpointError, PruningError
from .mask_io import check_masks, effective_state, is_nm, mask_kind, pack_mask, restore_masks_, tied_values, unpack_mask
from .projections import transposed_groups
from .masks import get_mask, remove_parametrization_
from .tensor_file import VERSIONS_KEY, file_metadata, load_state_, read_tensor_file, write_tensor_file

__all__ = ["save_sparse", "load_sparse", "to_semi_structured_", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "prunekit_sparse"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)}


def _encode(name: str, t: Tensor, mask: Tensor | None, groups: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    t = t.cpu()
    info: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "masked": mask is not None}
    if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{name}: dtype {t.dtype} is not supported by save_sparse")
    keep = (t != 0) if mask is None else mask.cpu()
    n_keep = int(keep.sum())
    sparse_bytes = n_keep * t.element_size() + math.ceil(t.numel() / 8)
    if t.is_floating_point() and t.numel() > 0 and (mask is not None or sparse_bytes < t.numel() * t.element_size()):
        info.update(encoding="bitmask", **mask_kind(keep, groups))
        return {f"{name}::values": t[keep].contiguous(), f"{name}::bits": pack_mask(keep)}, info
    info.update(encoding="dense", kind="dense")
    return {name: t.contiguous().clone()}, info


def save_sparse(model: nn.Module, path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Write the model's effective state to `path` in the compact form; return the per-tensor info.

    The file is written to a temporary name and renamed, so a failure leaves no partial file.
    """
    tensors: dict[str, Tensor] = {}
    infos: dict[str, dict[str, Any]] = {}
    for name, (t, mask) in effective_state(model).items():
        if "::" in name:
            raise CheckpointError(f"tensor name {name!r} contains '::', which the sparse format reserves")
        stored, infos[name] = _encode(name, t, mask, transposed_groups(model, name))
        tensors.update(stored)
    meta = {_META_KEY: json.dumps({"format_version": FORMAT_VERSION, "tensors": infos}),
            VERSIONS_KEY: file_metadata(model)[VERSIONS_KEY]}  # torchvision's MNASNet refuses a state without them
    write_tensor_file(path, tensors, meta)  # with the sha256 of the tensors and of the metadata
    return infos


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    # checksums verified where the file has them (files written before they were added load as they did)
    meta, stored = read_tensor_file(path, require_checksum=False)
    try:
        doc = json.loads(meta[_META_KEY])
        version, infos = doc["format_version"], doc["tensors"]
    except (KeyError, TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: no prunekit sparse metadata; write it with save_sparse") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: sparse format version {version}; this prunekit reads {FORMAT_VERSION}")
    if not isinstance(infos, dict):
        raise CheckpointError(f"{path}: corrupt metadata (tensors is not a mapping)")
    return infos, stored, meta


def _decode(path: Any, name: str, info: Any, stored: dict[str, Tensor], groups: int | None) -> tuple[Tensor, Tensor | None]:
    """Rebuild one dense tensor (and its kept-entry mask for bitmask entries)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} is corrupt ({why})")

    try:
        shape, dtype, encoding = [int(s) for s in info["shape"]], _DTYPES[info["dtype"]], info["encoding"]
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity in the JSON
        raise bad("bad shape/dtype/encoding metadata") from None
    if any(s < 0 for s in shape):
        raise bad(f"negative size in shape {shape}")
    numel = math.prod(shape)
    if encoding == "dense":
        t = stored.get(name)
        if t is None or list(t.shape) != shape or t.dtype != dtype:
            raise bad("dense data missing or of the wrong shape/dtype")
        return t, None
    if encoding != "bitmask":
        raise bad(f"unknown encoding {encoding!r}")
    bits, values = stored.get(f"{name}::bits"), stored.get(f"{name}::values")
    if bits is None or values is None or bits.dtype != torch.uint8 or bits.dim() != 1:
        raise bad("values or bits missing")
    if bits.numel() != math.ceil(numel / 8):
        raise bad(f"{bits.numel()} bit bytes for {numel} entries")
    keep = unpack_mask(bits, shape)
    if values.dtype != dtype:
        raise bad(f"its values are {str(values.dtype).removeprefix('torch.')}, its metadata says {info['dtype']}")
    if values.dim() != 1 or values.numel() != int(keep.sum()):
        raise bad(f"{values.numel()} values for {int(keep.sum())} kept entries")
    recorded = {"kind": "nm", "n": info.get("n"), "m": info.get("m")}
    # a transposed conv's N:M runs in a conv's layout; files written before that read recorded its stored layout
    if info.get("kind") == "nm" and recorded not in (mask_kind(keep, groups), mask_kind(keep)):
        raise bad("its bit mask is not the recorded N:M pattern")
    dense = torch.zeros(shape, dtype=dtype)
    dense[keep] = values
    return dense, keep


def load_sparse(model: nn.Module, path: str | os.PathLike, restore_masks: bool = False) -> dict[str, dict[str, Any]]:
    """Fill a same-architecture `model` (plain parameters, no masks) from a save_sparse file.

    restore_masks=True re-applies the saved masks as `Mask` parametrizations (for masked
    retraining). Everything is decoded and checked before the model is touched; any problem
    raises CheckpointError.
    """
    infos, stored, meta = _read(path)
    target = effective_state(model)
    masked_now = [n for n, (_, mask) in target.items() if mask is not None]
    if masked_now:
        raise CheckpointError(
            f"load_sparse needs a model without masks; {', '.join(masked_now[:3])} are masked: "
            "call remove_masks(model) first or load into a fresh model"
        )
    missing, unexpected = sorted(set(target) - set(infos)), sorted(set(infos) - set(target))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    decoded = {}
    for name, info in infos.items():
        dense, keep = _decode(path, name, info, stored, transposed_groups(model, name))
        if dense.shape != target[name][0].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(dense.shape)}, the model {tuple(target[name][0].shape)}")
        decoded[name] = (dense, keep if info.get("masked") else None)
    values = {n: d for n, (d, _) in decoded.items()}
    masks = {n: k for n, (_, k) in decoded.items() if k is not None} if restore_masks else {}
    if restore_masks:  # a tensor tied to a masked name takes its full values, not the masked zeros
        check_masks(model, masks)
        values = tied_values(model, values, masks)
    load_state_(model, values, meta, path)
    restore_masks_(model, masks)
    return infos


def to_semi_structured_(model: nn.Module) -> list[str]:
    """Swap every 2:4-masked `nn.Linear` weight for a `torch.sparse` semi-structured tensor.

    Needs a CUDA GPU of compute capability >= 8.0 (Ampere or newer) and the model on it; the
    masks are baked. Returns the converted module names. Conversion happens for all layers
    before any is swapped, so a failure leaves the model as it was.
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise PruningError(
            "to_semi_structured_ needs an NVIDIA Ampere-or-newer GPU (CUDA compute capability >= 8.0) "
            "for 2:4 sparse tensor cores; keep the masked dense model on this machine"
        )
    from torch.sparse import to_sparse_semi_structured

    chosen = []
    for name, mod in model.named_modules():
        mask = get_mask(mod, "weight") if isinstance(mod, nn.Linear) else None
        if mask is None or not is_nm(mask.expand(mod.weight.shape), 2, 4):
            continue
        if len(mod.parametrizations.weight) != 1 or not mod.weight.is_cuda:
            raise PruningError(f"{name}: needs only a prunekit Mask and the model on the GPU")
        chosen.append((name, mod))
    if not chosen:
        raise PruningError("no nn.Linear carries a 2:4 mask; prune with sparsity_type 'nm' (n=2, m=4) first")
    converted = []
    for name, mod in chosen:
        try:
            converted.append(to_sparse_semi_structured(mod.weight.detach().contiguous()))
        except (RuntimeError, ValueError) as err:
            raise PruningError(f"{name}: torch cannot make this weight semi-structured ({err})") from None
    for (name, mod), sparse in zip(chosen, converted):
        remove_parametrization_(mod, "weight", leave_parametrized=True)  # a deep copy leaves its original whole
        mod.weight = nn.Parameter(sparse, requires_grad=False)
    return [name for name, _ in chosen]
