"""Save and load pruned models: safetensors weights, masks and the plan in one file.

Loading rebuilds the architecture from the user's own constructor, replays the plan, loads the
weights, then puts back the weight masks: no pickle is involved, so an untrusted file cannot
execute code. The file holds the *effective* weights (masked entries are exact zeros), each
mask packed 8 entries per byte under "<name>::mask", the plan under "prunekit.plan" with the
masks described in `plan.meta["masks"]` (`mask_io.describe_masks`), and a sha256 of every
tensor (see `tensor_file`). A file that is missing, corrupt, or made for another architecture
raises CheckpointError and leaves the model the caller passed in unchanged.

>>> import torch, torch.nn as nn, tempfile, os
>>> from prunekit.surgery.plan import prune_channels_
>>> from prunekit.surgery.masks import apply_mask, unstructured_mask
>>> make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> m = make(); x = torch.randn(1, 3, 8, 8); plan = prune_channels_(m, x, {"0": [3]})
>>> _ = apply_mask(m[2], "weight", unstructured_mask(m[2].weight, 0.5))
>>> path = os.path.join(tempfile.mkdtemp(), "pruned.safetensors"); _ = save_pruned(m, plan, path)
>>> again = load_pruned(make(), path); bool(torch.equal(again(x), m(x)))
True
>>> read_plan(path).meta["masks"]["tensors"]["2.weight"]["masked"], type(again[2].parametrizations.weight[0]).__name__
(14, 'Mask')
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..core.errors import CheckpointError, PrunekitError
from ..core.layout import is_channels_last, to_memory_format_
from ..core.modules import unwrap_model
from .mask_io import MASKS_FORMAT_VERSION, describe_masks, mask_kind, restore_masks_, tied_values, unpack_mask
from .masks import masked_modules
from .plan import Plan, apply_plan_, describe_replay
from .plan_check import check_fingerprint
from .projections import transposed_groups
from .tensor_file import MASK_SUFFIX, load_state_, read_tensor_file, save_state_file

PLAN_KEY = "prunekit.plan"
MASKS_META = "masks"  # plan.meta entry describing the masks the file holds
LAYOUT_META = "memory_format"  # plan.meta entry: "channels_last" when the model was saved that way


def save_pruned(model: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write effective weights, packed masks and plan atomically; returns `path`.

    The plan's meta["masks"] is set to the model's current masks (`describe_masks`), and replay
    entries that describe the model (an SSC layer's execution) to the model as it is, so a
    plan.json written from the same Plan afterwards describes them too. A torch.compile or DDP
    wrapper is looked through (the file holds the module's own names). A plan that records the
    pruned architecture's fingerprint must match `model`: otherwise the file could never be
    loaded, so CheckpointError and nothing is written.
    """
    if not isinstance(plan, Plan):
        raise CheckpointError(f"save_pruned needs a Plan, got {type(plan).__name__}")
    model = unwrap_model(model)
    check_fingerprint(model, plan.fingerprint.get("pruned"), "pruned")
    path = Path(path)
    before = copy.deepcopy(vars(plan))  # a save that fails leaves the caller's plan as it was
    try:
        plan.meta[MASKS_META] = describe_masks(model)
        describe_replay(model, plan)
        if is_channels_last(model):  # the file holds plain tensors; the layout is put back on loading
            plan.meta[LAYOUT_META] = "channels_last"
        else:
            plan.meta.pop(LAYOUT_META, None)
        save_state_file(model, path, {PLAN_KEY: plan.to_json()})
    except BaseException:
        vars(plan).update(before)
        raise
    return path


def _plan_of(meta: Mapping[str, str], path: Any) -> Plan:
    if PLAN_KEY not in meta:
        raise CheckpointError(f"{path} holds no prunekit plan, so it holds unpruned weights (a run's dense.safetensors, "
                              "say): load it with model.load_state_dict(safetensors.torch.load_file(path)), or give "
                              "the run's pruned.safetensors")
    try:
        return Plan.from_dict(json.loads(meta[PLAN_KEY]))
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested thousands deep
        raise CheckpointError(f"the plan in {path} is corrupt ({type(err).__name__}: {str(err)[:200]})") from None


def read_plan(path: str | Path) -> Plan:
    """The plan stored in a pruned-model file (its checksum verified)."""
    meta, _ = read_tensor_file(path)
    return _plan_of(meta, path)


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Return a pruned copy of the freshly built `model` carrying the stored weights and masks.

    `model` itself is never modified, so a failed load leaves nothing half-changed. A
    torch.compile or DistributedDataParallel wrapper is looked through: the copy is of the module
    inside, to be wrapped again after loading.
    """
    model = unwrap_model(model)
    meta, tensors = read_tensor_file(path)
    plan = _plan_of(meta, path)
    if masked_modules(model):
        raise CheckpointError(f"load_pruned({path}) needs a freshly built model without masks; "
                              "build a new one with its constructor")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"load_pruned({path}) needs a model whose tensors are allocated, and this one is on the "
                              "meta device, where loading copies nothing; build it on the CPU (or GPU) instead")
    masks = _masks_of(plan, tensors, path)
    work = copy.deepcopy(model)
    try:
        apply_plan_(work, plan)
    except PrunekitError:
        raise
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"the plan in {path} does not replay on this model: {err}") from None
    layout = plan.meta.get(LAYOUT_META, "contiguous")
    if layout not in ("contiguous", "channels_last"):
        raise CheckpointError(f"{path}: plan meta '{LAYOUT_META}' is {str(layout)[:40]!r}, not 'channels_last' or "
                              "'contiguous'; the file is damaged")
    _check_mask_kinds(work, plan, masks, path)
    load_state_(work, tied_values(work, tensors, masks), meta, path)
    work = restore_masks_(work, masks)
    if layout == "channels_last":  # as it was saved (memory_format='channels_last' or 'auto' chose it)
        to_memory_format_(work, torch.channels_last)
    return work


def _masks_of(plan: Plan, tensors: Mapping[str, Tensor], path: Any) -> dict[str, Tensor]:
    """Unpack every "<name>::mask" entry, checked against the description in the plan."""
    desc = plan.meta.get(MASKS_META, {"tensors": {}})
    described = desc.get("tensors") if isinstance(desc, dict) else None
    if not isinstance(described, dict):
        raise CheckpointError(f"{path}: plan meta '{MASKS_META}' is malformed; write the file again")
    version = desc.get("format_version", MASKS_FORMAT_VERSION)
    if version != MASKS_FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(f"{path}: its masks format version {str(version)[:20]} is not supported (this prunekit "
                              f"reads {MASKS_FORMAT_VERSION}); load it with the prunekit that wrote it")
    stored = {k[: -len(MASK_SUFFIX)] for k in tensors if k.endswith(MASK_SUFFIX)}
    if stored != set(described):
        raise CheckpointError(f"{path}: the masks stored ({sorted(stored)[:3]}) differ from those the plan "
                              f"describes ({sorted(described)[:3]}); the file is damaged")
    masks = {}
    for name, info in described.items():
        try:
            mask = unpack_mask(tensors[name + MASK_SUFFIX], info["shape"])
            masked = info["masked"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path}: the description of the mask on {name} is malformed") from None
        except CheckpointError as err:
            raise CheckpointError(f"{path}: the mask on {name}: {err}; the file is damaged") from None
        if not isinstance(masked, int) or isinstance(masked, bool):
            raise CheckpointError(f"{path}: the description of the mask on {name} gives {str(masked)[:40]} masked "
                                  "entries, not a whole number; the file is damaged")
        if int((~mask).sum()) != masked:
            raise CheckpointError(f"{path}: the mask on {name} removes {int((~mask).sum())} entries, "
                                  f"the plan says {masked}; the file is damaged")
        value = tensors.get(name)  # saved as its effective value: zero wherever the mask is
        if isinstance(value, Tensor) and value.shape == mask.shape and bool(value[~mask].ne(0).any()):
            raise CheckpointError(f"{path}: {name} is nonzero where its stored mask removes entries ("
                                  f"{int(value[~mask].ne(0).sum())} of them); the file is damaged")
        masks[name] = mask
    return masks


def _check_mask_kinds(model: nn.Module, plan: Plan, masks: Mapping[str, Tensor], path: Any) -> None:
    """The kind each mask is described as (N:M, pattern, irregular) is the kind it is."""
    described = plan.meta.get(MASKS_META, {}).get("tensors", {})
    for name, mask in masks.items():
        recorded = {k: described[name].get(k) for k in ("kind", "n", "m") if k in described[name]}
        if recorded.get("kind") == "nm" and recorded.get("n") == 0:  # how files before 0:m was refused said all-zero
            recorded = {"kind": "irregular"}
        actual = mask_kind(mask, transposed_groups(model, name))
        if recorded != actual:
            raise CheckpointError(f"{path}: the mask on {name} is described as {recorded} but is {actual}; the file "
                                  "is damaged")
