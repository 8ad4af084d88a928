"""One safetensors file per model state: checksummed, written atomically, module versions kept.

`state_tensors(model)` gives what is written: the *effective* state (masks resolved: "conv.weight"
holds weight * mask), each masked tensor's mask packed into "<name>::mask" (uint8, 8 entries per
byte), tied tensors stored once, and the per-module state-dict versions that some modules'
`_load_from_state_dict` reads (torchvision's MNASNet refuses a state without them).
`save_state_file(model, path)` does both; `write_tensor_file` adds a sha256 of all tensors to the metadata and writes atomically;
`read_tensor_file` verifies it. Metadata keys:

    prunekit.sha256          core.integrity.tensors_sha256 of every tensor in the file
    prunekit.meta_sha256     sha256 of every other metadata entry (sorted JSON); files written
                             before it existed carry none and are read without that check
                             (like the tensors' sha256 it detects damage, not deliberate edits)
    prunekit.aliases         JSON {tied name: stored name}
    prunekit.module_versions JSON {module prefix: {"version": int}} (state_dict()._metadata)

>>> import tempfile, os, torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
>>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
>>> masks = save_state_file(net, path)
>>> meta, tensors = read_tensor_file(path)
>>> twin = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
>>> load_state_(twin, tensors, meta, path)
>>> torch.equal(twin[0].weight, net[0].weight)
True
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Any, Mapping

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
import torch
from torch import Tensor, nn

from ..core.errors import CheckpointError
from ..core.integrity import atomic_write, tensors_sha256
from .mask_io import effective_state, pack_mask

__all__ = ["state_tensors", "file_metadata", "save_state_file", "write_tensor_file", "read_tensor_file", "load_state_",
           "MASK_SUFFIX", "SHA_KEY"]

SHA_KEY = "prunekit.sha256"
META_SHA_KEY = "prunekit.meta_sha256"
ALIASES_KEY = "prunekit.aliases"
VERSIONS_KEY = "prunekit.module_versions"
MASK_SUFFIX = "::mask"


def state_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Tensor]]:
    """(tensors to write, {tied name: stored name}, {masked name: bool mask})."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    masks: dict[str, Tensor] = {}
    seen: dict[tuple, str] = {}  # (device, data_ptr, shape, stride, dtype) -> first name holding that view
    storages: set = {None}  # storages already written (None: empty tensors, never shared)
    for name, (t, mask) in effective_state(model).items():
        if MASK_SUFFIX in name:
            raise CheckpointError(f"tensor name {name!r} contains {MASK_SUFFIX!r}, which the file format reserves")
        # ties are found on the model's own tensors, which stay alive: the CPU copy of a GPU
        # tensor may be freed (contiguous() copies a channels_last one) and its address reused
        t = t.detach()
        view = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if view is not None and view in seen:
            aliases[name] = seen[view]
            continue
        if view is not None:
            seen[view] = name
        t = t.cpu()
        # safetensors refuses tensors sharing memory; a copy of a partial overlap is harmless
        # because loading copies into the model's own tensors
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        tensors[name] = t.contiguous().clone() if storage in storages else t.contiguous()
        storages.add(storage)
        if mask is not None:
            masks[name] = mask
            tensors[name + MASK_SUFFIX] = pack_mask(mask)
    return tensors, aliases, masks


def file_metadata(model: nn.Module, aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Aliases and module versions as metadata strings (the checksum is added when writing)."""
    versions = {}
    for prefix, entry in getattr(model.state_dict(), "_metadata", {}).items():
        if "parametrizations" in prefix.split("."):
            continue  # belongs to a Mask; masks are stored and restored by prunekit itself
        plain = {k: v for k, v in dict(entry).items() if isinstance(v, (int, str, float, bool))}
        if plain:
            versions[prefix] = plain
    return {ALIASES_KEY: json.dumps(dict(aliases or {})), VERSIONS_KEY: json.dumps(versions)}


def write_tensor_file(path: str | os.PathLike[str], tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str]) -> None:
    """Write `tensors` + `metadata` + their sha256 to `path` atomically (CheckpointError on OSError)."""
    meta = {**metadata, SHA_KEY: tensors_sha256(tensors)}
    meta[META_SHA_KEY] = _metadata_sha256(meta)
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=meta))


def save_state_file(model: nn.Module, path: str | os.PathLike[str],
                    metadata: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """Write the model's state (see module doc) plus `metadata`; returns {masked name: mask}."""
    tensors, aliases, masks = state_tensors(model)
    write_tensor_file(path, tensors, {**file_metadata(model, aliases), **(metadata or {})})
    return masks


def _not_safetensors_hint(path: str | os.PathLike[str]) -> str:
    """What to do with a file safetensors cannot read: prunekit's other files have their own readers."""
    name = os.fspath(path)
    if name.endswith(".json"):
        return ("it is not a weights file: a plan.json replays with apply_plan_(model, load_plan(path)), and the "
                "weights are in the run's pruned.safetensors")
    if name.endswith((".pt", ".pth")):
        return ("it is not a weights file prunekit reads (a training checkpoint such as last.pt resumes with "
                "`prunekit resume`; prunekit never unpickles files): give a .safetensors file")
    return "give a .safetensors file written by prunekit, or copy it again if it was cut short"


def read_tensor_file(path: str | os.PathLike[str], require_checksum: bool = True
                     ) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a safetensors file whose checksum matches; CheckpointError otherwise.

    A file without a checksum (written by another tool) is accepted when require_checksum=False.
    """
    if os.path.isdir(path):
        inside = [n for n in ("pruned.safetensors", "dense.safetensors") if os.path.isfile(os.path.join(path, n))]
        hint = f"; give {os.path.join(path, inside[0])}" if inside else "; give a .safetensors file"
        raise CheckpointError(f"cannot read {path}: it is a directory{hint}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {path}: {first}; {_not_safetensors_hint(path)}") from None
    want = meta.get(SHA_KEY)
    if want is None:
        if require_checksum:
            raise CheckpointError(f"{path} carries no prunekit checksum; it was not written by this prunekit, "
                                  "save it again with save_pruned")
        return meta, tensors
    if tensors_sha256(tensors) != want:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum stored with them; "
                              "restore the file from a good copy or write it again")
    if META_SHA_KEY in meta and _metadata_sha256(meta) != meta[META_SHA_KEY]:
        raise CheckpointError(f"{path} is corrupt: its metadata (plan, tied names, module versions) does not match "
                              "the checksum stored with it; restore the file from a good copy or write it again")
    return meta, tensors


def _metadata_sha256(meta: Mapping[str, str]) -> str:
    """sha256 of every metadata entry but this checksum itself, as sorted JSON."""
    rest = {k: v for k, v in meta.items() if k != META_SHA_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _json(meta: Mapping[str, str], key: str, path: Any) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {key} is not a JSON object; the file is damaged")
    return value


def load_state_(model: nn.Module, tensors: Mapping[str, Tensor], meta: Mapping[str, str], path: Any) -> None:
    """Load the plain tensors of a file (not the "::mask" entries) into `model`, strictly.

    Tied names are filled from their stored twin and module versions are passed on, so modules
    that read them in `_load_from_state_dict` load as from their own state_dict. Names and
    shapes are compared first, for one short CheckpointError instead of a key dump.
    """
    aliases, versions = _json(meta, ALIASES_KEY, path), _json(meta, VERSIONS_KEY, path)
    state: OrderedDict[str, Tensor] = OrderedDict(
        (k, v) for k, v in tensors.items() if not k.endswith(MASK_SUFFIX))
    for name, source in aliases.items():
        if not isinstance(source, str) or source not in state:
            raise CheckpointError(f"{path}: tied tensor {name!r} points at {source!r}, which the file lacks")
        state[name] = state[source]
    _check_fit(model, state, path)
    if not all(isinstance(v, dict) for v in versions.values()):
        raise CheckpointError(f"{path}: metadata {VERSIONS_KEY} must map module names to objects")
    # modules compare their version with numbers ("x" < 2 is a TypeError inside load_state_dict)
    if not all(type(v.get("version", 0)) is int for v in versions.values()):
        raise CheckpointError(f"{path}: metadata {VERSIONS_KEY} gives a module a version that is not a whole "
                              "number; the file is damaged, write it again")
    state._metadata = OrderedDict(versions)  # type: ignore[attr-defined]  (what state_dict() carries)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"weights in {path} do not fit this model: {first}") from None


def _kind(t: Tensor | str) -> str:
    """"bool", "float", "complex" or "int" of a tensor, or of a dtype as a safetensors header names
    it ("F32", "BF16", "I64", "BOOL", "C64", "F8_E4M3", ...)."""
    if isinstance(t, str):
        return "bool" if t == "BOOL" else "float" if t.startswith(("F", "BF")) else "complex" if t.startswith("C") \
            else "int"
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.is_floating_point() else "complex" if t.is_complex() else "int"


def header_dtypes(path: str | os.PathLike[str]) -> dict[str, str]:
    """The dtype of each tensor of a .safetensors file as its header names it, without reading
    the tensors."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def dtype_kind_error(state: Mapping[str, Tensor], stored: Mapping[str, Tensor | str]) -> str:
    """"N tensors of another kind of dtype ... (first: name)" for stored tensors (or header dtype
    names, `header_dtypes`) whose kind (integer, bool, float, complex) differs from the model's
    `state`, else "": another float width is a cast, integers for float weights (or the reverse)
    a damaged file."""
    wrong = sorted(k for k in set(state) & set(stored) if _kind(state[k]) != _kind(stored[k]))
    if not wrong:
        return ""
    return f"{len(wrong)} tensors of another kind of dtype (integer, bool or float) (first: {wrong[0]})"


def _check_fit(model: nn.Module, stored: Mapping[str, Tensor], path: Any) -> None:
    state = model.state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items()}
    theirs = {k: tuple(v.shape) for k, v in stored.items()}
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    wrong = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    kind = dtype_kind_error(state, stored)
    if missing or extra or wrong or kind:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("tensors missing from the file", missing), ("unexpected tensors", extra),
                  ("shape mismatches", wrong)) if v] + ([kind] if kind else [])
        raise CheckpointError(f"weights in {path} do not fit this model: {'; '.join(parts)}. Build the same "
                              "architecture (name, num_classes, options) that the file was saved from")
