"""Physical removal: slice every parameter, buffer and layer attribute that a channel touches.

`remove_channels_` takes, per group, the channel indices to delete, computes *all* new tensors
first, checks them, and only then writes them into the model: a bad request leaves the model
exactly as it was.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
>>> remove_channels_(m, build_graph(m, torch.randn(1, 3, 8, 8)), {"0": [1, 5]})
>>> m[0].out_channels, m[1].num_features, m[2].in_channels
(6, 6, 6)
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import PruningError
from ..graph import Graph
from ..graph.ids import IdSet

AttrFix = Callable[[nn.Module, dict[str, int]], None]
ATTRIBUTE_FIXES: dict[type, AttrFix] = {}


def removed_roots(graph: Graph, remove: Mapping[str, Sequence[int]]) -> set[int]:
    """Union-find roots of the channels to delete; validates names, indices and prunability."""
    roots: set[int] = set()
    for name, idx in remove.items():
        group = graph.group(name)
        idx = sorted(set(channel_indices(name, idx)))
        if not idx:
            continue
        if idx[0] < 0 or idx[-1] >= group.size:
            raise PruningError(f"group {name!r} has {group.size} channels; indices {idx[0]}..{idx[-1]} are out of range")
        fixed = [i for i, ok in zip(idx, group.prunable.numpy()[idx].tolist()) if not ok]
        if fixed:
            raise PruningError(f"group {name!r}: channels {fixed[:8]} are fixed (they reach a model input/output "
                               "or an op whose channel positions are hard-coded) and cannot be removed")
        if len(idx) >= group.size:
            raise PruningError(f"removing all {group.size} channels of group {name!r} would empty it; keep at least one")
        roots.update(group.classes.numpy()[idx].tolist())
    return roots


def channel_indices(name: str, idx: Any) -> list[int]:
    """`idx` as a list of channel numbers; PruningError for a boolean mask (it read as channels 0
    and 1) or fractional numbers (1.5 read as channel 1), which are not channel numbers."""
    if isinstance(idx, torch.Tensor):
        kind = "b" if idx.dtype == torch.bool else "f" if idx.is_floating_point() or idx.is_complex() else "i"
    elif isinstance(idx, np.ndarray):
        kind = idx.dtype.kind
    if isinstance(idx, (torch.Tensor, np.ndarray)):
        if kind not in "iu":
            raise PruningError(_not_indices(name, "a boolean mask" if kind == "b" else f"{idx.dtype} values"))
        return idx.reshape(-1).tolist()
    if isinstance(idx, (str, bytes)) or not isinstance(idx, Iterable):
        raise PruningError(_not_indices(name, f"{idx!r} ({type(idx).__name__})"))
    idx = list(idx)
    if not all(type(i) is int for i in idx):
        for odd in idx:
            if type(odd) is int:
                continue
            if isinstance(odd, (bool, np.bool_)) or (isinstance(odd, torch.Tensor) and odd.dtype == torch.bool):
                raise PruningError(_not_indices(name, "a boolean mask"))
            if not isinstance(odd, (int, np.integer)) and not (isinstance(odd, torch.Tensor) and odd.numel() == 1
                                                               and not odd.is_floating_point() and not odd.is_complex()):
                raise PruningError(_not_indices(name, f"{odd!r} ({type(odd).__name__})"))
    return [int(i) for i in idx]


def _not_indices(name: str, what: str) -> str:
    return (f"group {name!r}: channels to remove must be whole channel numbers, got {what}; for a mask of the "
            "channels to remove pass its positions (mask.nonzero().flatten().tolist())")


def remove_channels_(model: nn.Module, graph: Graph, remove: Mapping[str, Sequence[int]]) -> None:
    """Delete channels in place. `remove` maps group name -> channel indices of that group."""
    roots = removed_roots(graph, remove)
    if not roots:
        return
    dead = IdSet(roots)
    keep: dict[tuple[str, str, int], np.ndarray] = {}
    flat, sizes = graph.member_ids()
    # one lookup for all members; NumPy views, since per-member torch calls cost more than the work
    alive = np.split(~dead.contains(flat), np.cumsum(sizes)[:-1]) if sizes else []
    for m, k in zip(graph.members, alive):
        key = (m.module, m.name, m.dim)
        keep[key] = keep[key] & k if key in keep and keep[key].size == k.size else k
    mods = dict(model.named_modules())
    new_tensors, counts = _sliced(mods, keep)
    _check(mods, new_tensors, counts)
    _check_ties(mods, new_tensors)
    for (mod_name, tname), value in new_tensors.items():
        mod = mods[mod_name]
        if tname in mod._parameters:
            old = mod._parameters[tname]
            mod.register_parameter(tname, nn.Parameter(value, requires_grad=old.requires_grad))
        elif tname in mod._buffers:  # registered again as it was: persistent or not
            mod.register_buffer(tname, value, persistent=tname not in mod._non_persistent_buffers_set)
        else:
            setattr(mod, tname, value)
    for mod_name, sizes in counts.items():
        mod = mods[mod_name]
        fix = ATTRIBUTE_FIXES.get(type(mod)) or _fix_by_base(mod)
        if fix is not None:
            fix(mod, sizes)
    for mod in mods.values():
        if isinstance(mod, nn.Transformer):
            _fix_transformer(mod)


def _sliced(mods: dict[str, nn.Module], keep: dict) -> tuple[dict, dict]:
    """New tensors for every touched (module, tensor), and per-module kept sizes by role key."""
    per_tensor: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (mod_name, tname, dim), k in keep.items():
        if mod_name not in mods:
            raise PruningError(f"module {mod_name!r} of the graph is not in this model; rebuild the graph on it")
        if tname.startswith("#"):
            counts[mod_name][tname] = int(np.count_nonzero(k))
            continue
        per_tensor[(mod_name, tname)].append((dim, k))
    out = {}
    for (mod_name, tname), slices in per_tensor.items():
        t = _get_tensor(mods, mod_name, tname)
        value = t.detach()
        for dim, k in slices:
            if value.shape[dim] != k.size:
                raise PruningError(f"{mod_name}.{tname}: dim {dim} has {value.shape[dim]} entries but the graph "
                                   f"recorded {k.size}; rebuild the graph on this model before pruning")
            if not k.all():
                value = value.index_select(dim, torch.from_numpy(np.flatnonzero(k)).to(value.device))
        if value.shape != t.shape:  # index_select made a new tensor: nothing shared with `t`
            out[(mod_name, tname)] = _in_layout_of(t, value)
            counts[mod_name][tname] = value.shape[slices[0][0]]
    return out, counts


def _in_layout_of(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in `t`'s memory format: index_select gives a contiguous tensor, and a channels-last
    model must not come out of pruning half in one layout and half in the other."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _check_ties(mods: dict[str, nn.Module], new: dict) -> None:
    """PruningError when a tensor to be replaced is held under several names (tied weights): the
    graph sees one of them, so slicing would cut the tensor for that holder only and leave the
    others on the old one (a model that no longer runs, or silently untied). Raised before
    anything is written."""
    holders: dict[int, list[str]] = defaultdict(list)
    for mod_name, mod in mods.items():
        for tname, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                holders[id(t)].append(f"{mod_name}.{tname}" if mod_name else tname)
    for key in new:
        names = holders.get(id(_get_tensor(mods, *key)), [])
        if len(names) > 1:
            owners = sorted({n.rpartition(".")[0] for n in names if n.rpartition(".")[0]})
            raise PruningError(f"{' = '.join(names)} share one tensor (tied weights), and channel removal cannot cut "
                               "a shared tensor for one holder only; leave the modules that share it out with "
                               f"ignore={owners} (the other groups still prune; the model was left unchanged)")


def _get_tensor(mods: dict[str, nn.Module], mod_name: str, tname: str) -> torch.Tensor:
    mod = mods.get(mod_name)
    t = None
    if mod is not None:  # the registries first: a Module attribute lookup costs more than a small slice
        t = mod._parameters.get(tname)
        t = mod._buffers.get(tname) if t is None else t
        t = getattr(mod, tname, None) if t is None else t
    if not isinstance(t, torch.Tensor):
        raise PruningError(f"{mod_name}.{tname} is not a tensor of this model; rebuild the graph on it")
    return t


def _check(mods: dict[str, nn.Module], new: dict, counts: dict) -> None:
    for (mod_name, tname), value in new.items():
        if 0 in value.shape:
            raise PruningError(f"{mod_name}.{tname} would have no entries left; remove fewer channels")
    for mod_name in counts:
        mod = mods[mod_name]
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
            w = new.get((mod_name, "weight"), mod.weight)
            per_group = mod.out_channels // mod.groups
            n_out = w.shape[1] * mod.groups if isinstance(mod, nn.modules.conv._ConvTransposeNd) else w.shape[0]
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                per_group = mod.in_channels // mod.groups
                n_out = w.shape[0]
            if n_out % per_group:
                raise PruningError(f"{mod_name}: grouped conv would lose part of a group; this is a bug in a rule")


def _fix_by_base(mod: nn.Module) -> AttrFix | None:
    for base, fix in ATTRIBUTE_FIXES.items():
        if isinstance(mod, base):
            return fix
    return None


def register_attribute_fix(cls: type, fix: AttrFix) -> None:
    """Teach surgery how to update a layer's attributes (e.g. in_channels) after slicing."""
    ATTRIBUTE_FIXES[cls] = fix


def _fix_conv(m: nn.Module, sizes: dict[str, int]) -> None:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    in_per_group, out_per_group = m.in_channels // m.groups, m.out_channels // m.groups
    w = m.weight
    if transposed:  # weight (in, out/groups, k...)
        m.groups = w.shape[0] // in_per_group if m.groups > 1 else 1
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:  # weight (out, in/groups, k...)
        m.groups = w.shape[0] // out_per_group if m.groups > 1 else 1
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _fix_linear(m: nn.Linear, sizes: dict[str, int]) -> None:
    m.out_features, m.in_features = m.weight.shape


def _norm_count(m: nn.Module, sizes: dict[str, int]) -> int:
    for key in ("weight", "running_mean", "bias", "running_var", "#channels"):
        if key in sizes:
            return sizes[key]
    raise PruningError(f"cannot tell the new width of {type(m).__name__}")


def _fix_batchnorm(m: nn.Module, sizes: dict[str, int]) -> None:
    m.num_features = _norm_count(m, sizes)


def _fix_groupnorm(m: nn.GroupNorm, sizes: dict[str, int]) -> None:
    per_group = m.num_channels // m.num_groups
    m.num_channels = _norm_count(m, sizes)
    m.num_groups = m.num_channels // per_group


def _fix_layernorm(m: nn.Module, sizes: dict[str, int]) -> None:
    m.normalized_shape = (_norm_count(m, sizes),)


def _fix_prelu(m: nn.PReLU, sizes: dict[str, int]) -> None:
    m.num_parameters = m.weight.numel()


def _fix_embedding(m: nn.Embedding, sizes: dict[str, int]) -> None:
    m.embedding_dim = m.weight.shape[1]


def _fix_multihead_attention(m: nn.MultiheadAttention, sizes: dict[str, int]) -> None:
    """Attributes after whole heads were removed (head_dim unchanged)."""
    if m._qkv_same_embed_dim:
        m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[0] // 3
    else:
        m.embed_dim = m.q_proj_weight.shape[0]
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]
    m.num_heads = m.embed_dim // m.head_dim


def _fix_transformer(m: nn.Transformer) -> None:
    """nn.Transformer holds no tensor but checks its inputs' width against d_model."""
    layers = [*getattr(m.encoder, "layers", ()), *getattr(m.decoder, "layers", ())]
    widths = [layer.linear1.in_features for layer in layers if isinstance(getattr(layer, "linear1", None), nn.Linear)]
    if widths:
        m.d_model = widths[0]


def _fix_bilinear(m: nn.Bilinear, sizes: dict[str, int]) -> None:
    m.out_features, m.in1_features, m.in2_features = m.weight.shape


def _fix_rnn(m: nn.RNNBase, sizes: dict[str, int]) -> None:
    m.input_size = m.weight_ih_l0.shape[1]


for _cls, _fix in [(nn.modules.conv._ConvNd, _fix_conv), (nn.Linear, _fix_linear),
                   (nn.modules.batchnorm._NormBase, _fix_batchnorm), (nn.GroupNorm, _fix_groupnorm),
                   (nn.LayerNorm, _fix_layernorm), (nn.PReLU, _fix_prelu), (nn.Embedding, _fix_embedding),
                   (nn.MultiheadAttention, _fix_multihead_attention), (nn.RNNBase, _fix_rnn),
                   (nn.Bilinear, _fix_bilinear)]:
    register_attribute_fix(_cls, _fix)
if hasattr(nn, "RMSNorm"):
    register_attribute_fix(nn.RMSNorm, _fix_layernorm)
