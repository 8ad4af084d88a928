"""Prove a graph's groups safe on the real model, before any method relies on them.

Some models hard-code channel counts in Python (`reshape(B, N, 3, heads, C // heads)` with C
read from another tensor); no op-level rule can see that. So every prunable group is *probed*:
remove one channel from a copy and check that the forward still runs, keeps its output shape,
and (for exact groups) equals the model with that channel's contributions zeroed. Groups are
tested together first and split in halves only on failure, so a clean model costs two
forwards. Failing groups are marked unprunable with the reason.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)); x = torch.randn(1, 3, 6, 6)
>>> probe_groups(m, x, build_graph(m, x))
{}
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import PruningError
from ..core.modes import evaluating, scoring
from ..graph import Graph, Group, build_graph
from ..graph.trace import tensors_in
from .copying import share_copy
from .shrink import remove_channels_


def run_model(model: nn.Module, inputs: Any) -> Any:
    """One forward in eval mode without autograd; every module's mode is as it was after."""
    with torch.no_grad(), evaluating(model):
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def training_forward_error(model: nn.Module, inputs: Any) -> Exception | None:
    """What a forward of `model` in training mode raises (None when it runs), without autograd and
    leaving every buffer (BatchNorm's statistics), dropout's random draws and each module's mode as
    they were. The trace runs in eval mode, so a branch only training runs (an auxiliary head) is
    not in the graph, and its layers are not pruned with the channels they read."""
    try:
        with torch.no_grad(), scoring(model, "train"):
            if isinstance(inputs, dict):
                model(**inputs)
            else:
                model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    except Exception as err:  # noqa: BLE001 - what fails is for the caller to judge
        return err
    return None


def inputs_to(inputs: Any, device: torch.device | str) -> Any:
    """Example inputs in the forms `run_model` takes (a tensor, a tuple/list or a dict of
    arguments) with every tensor moved to `device`; other values are kept as they are."""
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move(t) for t in inputs)
    return move(inputs)


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return next(first_tensor(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict)))


def zero_contributions_(model: nn.Module, group: Group, channels: Sequence[int]) -> None:
    """What removing `channels` means, with shapes unchanged (new tensors assigned to `model`).

    Zero every consumer input slice ("in" members: the next conv's input channels, a Linear's
    columns...) and every producer parameter slice ("out"/"through": filters, biases, norm
    affine parameters), so the channel is zero wherever it is still used, also in
    parameter-free products such as q @ k^T.
    """
    zero_channels_(model, [(group, channels)])


def zero_channels_(model: nn.Module, removal: Sequence[tuple[Group, Sequence[int]]]) -> None:
    """`zero_contributions_` for several groups at once: one new tensor per touched tensor."""
    params = {name for name, _ in model.named_parameters()}
    modules = dict(model.named_modules())
    dead_at: dict[tuple[str, str], dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for group, channels in removal:
        dead = np.zeros(group.size + 1, dtype=bool)  # the extra last entry answers for channel -1
        dead[list(channels)] = True
        for m in group.tensor_members():
            if m.role != "in" and m.qualname not in params:
                continue  # buffers (BN running stats) stay: with zero affine they change nothing
            at = np.flatnonzero(dead[m.channel.numpy()])
            if at.size:
                dead_at[(m.module, m.name)][m.dim].append(at)
    for (mod_name, name), dims in dead_at.items():
        mod = modules[mod_name]
        t = getattr(mod, name)
        zeroed = t.detach().clone()  # never a write into `t`: copies made by share_copy share tensors
        for dim, parts in dims.items():
            zeroed.index_fill_(dim, torch.from_numpy(np.concatenate(parts)), 0.0)
        setattr(mod, name, nn.Parameter(zeroed, t.requires_grad) if name in mod._parameters else zeroed)


def group_is_exact(group: Group, model: nn.Module, modules: dict[str, nn.Module] | None = None) -> bool:
    """False when the group's channels meet a LayerNorm-style statistic over channels."""
    module = model.get_submodule if modules is None else modules.__getitem__  # a table when asked often
    return not any(m.name == "#statistics" or isinstance(module(m.module), nn.LayerNorm)
                   or type(module(m.module)).__name__ in ("RMSNorm", "LayerNorm2d")
                   for m in group.members)


def _trial(model: nn.Module, inputs: Any, graph: Graph, groups: list[Group], channel: dict[str, int],
           atol: float) -> str:
    """'' if removing channel[g.name] of each group behaves, else the reason it does not."""
    return removal_trial(model, inputs, graph, groups, {g.name: [channel[g.name]] for g in groups}, atol)


def unproven_removal_error(model: nn.Module, inputs: Any, graph: Graph, removal: dict[str, list[int]],
                           atol: float = 1e-4) -> str:
    """'' unless removing `removal` (every channel, at the real widths) from `model` gives other
    outputs than zeroing the same channels, checked only where a group that loses channels meets an
    op the rules cannot vouch for (`Group.proven` False: the probe removed one channel there, and
    a forward that branches on the channel count passes that at 8 -> 7 and fails at 8 -> 4). Only
    those groups are removed and compared, so a proven group behind another kind of statistic does
    not turn the comparison off (`removal_trial`)."""
    modules = dict(model.named_modules())
    # the rules vouch for the other groups; of these, those with a reference (exact, or behind a
    # plain LayerNorm/RMSNorm) are removed and compared alone: one behind another kind of
    # statistic would turn the comparison off for all
    touched = [g for g in graph.groups if removal.get(g.name) and not g.proven and (
        group_is_exact(g, model, modules) or _kept_by_norms(modules, [g], removal) is not None)]
    why = removal_trial(model, inputs, graph, touched, {g.name: removal[g.name] for g in touched}, atol) if touched else ""
    return f"group(s) {', '.join(sorted(g.name for g in touched)[:3])}: {why}" if why else ""


def check_unproven_removal(model: nn.Module, inputs: Any, graph: Graph, removal: dict[str, list[int]]) -> None:
    """PruningError when `unproven_removal_error` finds one: what a pruner says before the caller's
    model changes."""
    why = unproven_removal_error(model, inputs, graph, removal)
    if why:
        raise PruningError(f"pruned at their real widths, {why}: the forward depends on the channel count in "
                           "a way neither the trace nor the probe (one channel removed) sees, such as a branch on "
                           "x.shape[1]; add the layers involved to ignore=[...]; the model was left unchanged")


def removal_trial(model: nn.Module, inputs: Any, graph: Graph, groups: list[Group], removal: dict[str, list[int]],
                  atol: float) -> str:
    """'' if removing `removal` (channels of `groups`) behaves as zeroing them, else why not."""
    # removal first: a model whose code rejects the new widths usually fails early in the
    # forward, and then the zeroed reference is never needed
    shrunk = share_copy(model)
    try:
        remove_channels_(shrunk, graph, removal)
        out = tensors_in(run_model(shrunk, inputs))
    except Exception as err:  # the model's own code rejected the new widths
        return f"forward fails after removal ({type(err).__name__}: {str(err)[:120]})"
    # removal deletes exactly the slices that zeroing clears, so the shrunk model is also the
    # shrunk version of the zeroed one, and the two must agree (every output: a group may feed
    # only a second head)
    modules = dict(model.named_modules())
    # a LayerNorm/RMSNorm over the channels: the reference normalises over the kept ones only
    norms = {} if all(group_is_exact(g, model, modules) for g in groups) else _kept_by_norms(modules, groups, removal)
    zeroed = share_copy(model)
    zero_channels_(zeroed, [(g, removal[g.name]) for g in groups])
    _normalise_over_kept_(zeroed, norms or {})
    ref = tensors_in(run_model(zeroed, inputs))
    shapes = [(tuple(r.shape), tuple(o.shape)) for r, o in zip(ref, out) if r.shape != o.shape]
    if len(ref) != len(out) or shapes:
        return f"output shape changes ({shapes[0][0]} -> {shapes[0][1]})" if shapes else "the number of outputs changes"
    if norms is not None:  # None: a statistic zeroing cannot be made a reference for (only "it runs")
        gap = _gap(ref, out)
        if gap > atol:
            diff = _float64_gap(model, inputs, graph, removal, groups, norms)
            if diff is None or diff > _ATOL64:
                shown = f"{diff:.3g} in float64" if diff is not None else f"{gap:.3g}"
                return f"removal differs from zeroing by {shown} (the forward hard-codes channel positions, or uses a channel count as a number)"
    return ""


# Removing a channel shortens the conv's reduction, so float32 sums round differently; a network
# at random initialisation can amplify that far beyond `atol` (timm's visformer_tiny: activations
# grow to ~700 through its attention stages and a 1e-6 difference at stage 2 becomes 0.03 at the
# logits, while float64 agrees to 1e-12). A float32 failure is therefore re-checked in float64,
# where rounding cannot hide or fake a rule error.
_ATOL64 = 1e-7


def _kept_by_norms(modules: dict[str, nn.Module], groups: list[Group],
                   removal: dict[str, list[int]]) -> dict[str, torch.Tensor] | None:
    """{norm module name: bool mask of the normalised channels kept} for the LayerNorm-style
    statistics `groups` meet, when each is an nn.LayerNorm or nn.RMSNorm over one dim; None when
    one is of another kind (a functional norm, a LayerNorm2d)."""
    kept: dict[str, torch.Tensor] = {}
    for g in groups:
        dead = np.zeros(g.size + 1, dtype=bool)  # the extra last entry answers for channel -1
        dead[list(removal.get(g.name, []))] = True
        for m in g.members:
            if m.name != "#statistics":
                continue
            norm = modules.get(m.module)
            if type(norm).forward not in _PLAIN_NORM_FORWARDS or len(norm.normalized_shape) != 1:
                return None  # another kind, or a subclass with its own forward (a LayerNorm2d over NCHW)
            keep = torch.from_numpy(~dead[m.channel.numpy()])
            kept[m.module] = keep & kept[m.module] if m.module in kept else keep
    return kept


# the norms whose forward is torch's own, over the last dim (nn.RMSNorm exists from torch 2.4)
_PLAIN_NORM_FORWARDS = {cls.forward for cls in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if cls is not None}


def _normalise_over_kept_(model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """Give each named LayerNorm/RMSNorm of `model` (a copy) a forward whose statistics cover only
    its kept channels, as the norm of the pruned model computes them."""
    for name, keep in kept.items():
        norm = model.get_submodule(name)

        def forward(x: torch.Tensor, norm: nn.Module = norm, keep: torch.Tensor = keep) -> torch.Tensor:
            part = x[..., keep.to(x.device)]
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            if type(norm).forward is nn.LayerNorm.forward:
                y = (x - part.mean(-1, keepdim=True)) / torch.sqrt(part.var(-1, unbiased=False, keepdim=True) + eps)
            else:
                y = x / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + eps)
            y = y * norm.weight if norm.weight is not None else y
            return y + norm.bias if getattr(norm, "bias", None) is not None else y
        norm.forward = forward


def _float64_gap(model: nn.Module, inputs: Any, graph: Graph, removal: dict[str, list[int]],
                 groups: list[Group], norms: dict[str, torch.Tensor] | None = None) -> float | None:
    """Largest |zeroed - removed| relative to max(1, |zeroed|), both run in float64; None if
    the model cannot run in float64."""
    import copy

    def as64(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.double() if x.is_floating_point() else x
        if isinstance(x, dict):
            return {k: as64(v) for k, v in x.items()}
        return type(x)(as64(v) for v in x) if isinstance(x, (tuple, list)) else x

    try:
        shrunk, zeroed = copy.deepcopy(model).double(), copy.deepcopy(model).double()
        remove_channels_(shrunk, graph, removal)
        zero_channels_(zeroed, [(g, removal[g.name]) for g in groups])
        _normalise_over_kept_(zeroed, norms or {})
        out, ref = tensors_in(run_model(shrunk, as64(inputs))), tensors_in(run_model(zeroed, as64(inputs)))
    except Exception:  # a model whose code insists on float32 (a hard-coded dtype, say)
        return None
    return _gap(ref, out)


def _gap(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """Largest |ref - out| of the floating outputs, each entry relative to the larger of its own
    |ref| and the median |ref| of its tensor (at least 1); inf where a non-finite entry differs.

    Per entry, not per tensor: one masked logit of -1e9 (or -inf) beside ordinary scores made any
    error in the others vanish against the tensor's largest value."""
    gaps = []
    for r, o in zip(ref, out):
        if not (r.is_floating_point() and r.numel()):
            continue
        r, o = r.detach().double(), o.detach().double()
        differ = ~((r == o) | (torch.isnan(r) & torch.isnan(o)))
        if not bool(differ.any()):
            continue
        if bool((differ & ~(torch.isfinite(r) & torch.isfinite(o))).any()):
            return float("inf")
        finite = r[torch.isfinite(r)].abs()
        floor = max(1.0, float(finite.median())) if finite.numel() else 1.0
        gaps.append(float(((r - o)[differ].abs() / r[differ].abs().clamp(min=floor)).max()))
    return max(gaps, default=0.0)


def _trial_channel(group: Group) -> int | None:
    """A prunable channel whose removal empties no tensor (a member all of whose positions are
    that one channel, e.g. a layer feeding a single attention head, would be emptied)."""
    whole = {int(m.channel[0]) for m in group.tensor_members()
             if m.channel.numel() and bool((m.channel == m.channel[0]).all()) and int(m.channel[0]) >= 0}
    return next((c for c in group.prunable.nonzero().flatten().tolist() if c not in whole), None)


def probe_groups(model: nn.Module, inputs: Any, graph: Graph, atol: float = 1e-4,
                 everything: bool = True) -> dict[str, str]:
    """Name -> reason for every prunable group whose removal breaks the model.

    everything=False tries only the groups whose channels meet an op the rules cannot vouch for
    (`Group.proven` is False: a reshape given a channel count, a user-registered rule); the others
    provably behave. All groups tried are tried together. A failing set is halved, following a failing half down to a
    culprit; the halves passed by on the way are set aside and tried later all together, and
    one by one only if that fails. A clean model costs one trial; a model with one bad group
    about log2(groups) trials that fail early in the forward, and one that passes."""
    channel = {g.name: _trial_channel(g) for g in graph.prunable_groups() if int(g.prunable.sum()) >= 2 or g.size >= 2}
    todo = [g for g in graph.prunable_groups() if channel.get(g.name) is not None and (everything or not g.proven)]
    return find_bad(todo, lambda groups: _trial(model, inputs, graph, groups, channel, atol))


def find_bad(todo: list[Group], trial) -> dict[str, str]:
    """The search behind `probe_groups`; `trial(groups)` gives '' or why removing from all of them fails."""
    bad: dict[str, str] = {}
    pending = [todo] if todo else []
    while pending:
        union = [g for part in pending for g in part]
        together = trial(union) if len(pending) > 1 else ""
        if len(pending) > 1 and not together:
            break  # everything set aside is fine together
        aside: list[list[Group]] = []
        failed = False
        for part in pending:
            reason = trial(part)
            if reason:
                failed = True
                _descend(part, reason, trial, bad, aside)
        if together and not failed:  # the parts pass alone but not together: search across them
            _descend(union, together, trial, bad, aside)
        pending = aside
    return bad


def _descend(groups: list[Group], reason: str, trial, bad: dict[str, str], aside: list[list[Group]]) -> None:
    """Find a culprit in `groups` (whose removal failed with `reason`); untested halves go to `aside`."""
    while len(groups) > 1:
        half = len(groups) // 2
        first = trial(groups[:half])
        if first:
            aside.append(groups[half:])
            groups, reason = groups[:half], first
            continue
        second = trial(groups[half:])
        if second:
            groups, reason = groups[half:], second
            continue
        bad.update({g.name: "breaks the model together with other groups: " + reason for g in groups})
        return  # each half alone is fine, together they are not
    bad[groups[0].name] = reason


def build_safe_graph(model: nn.Module, example_inputs: Any, ignore: Sequence[str] = (), probe: bool = True,
                     everything: bool = False) -> Graph:
    """build_graph + probe: groups that would break the model are made unprunable (with a note).

    Only groups not proven by the rules are tried, unless `everything`; the verdict is cached per
    model classes, weight shapes and values (`_probe_key`), inputs and ignore list, so a copy of
    the same model is not probed again."""
    graph = build_graph(model, example_inputs, ignore)
    if probe:
        key = _probe_key(model, example_inputs, ignore, everything)
        bad = _PROBED.get(key)
        if bad is None:
            bad = probe_groups(model, example_inputs, graph, everything=everything)
            _PROBED[key] = bad
            while len(_PROBED) > _PROBED_MAX:
                _PROBED.pop(next(iter(_PROBED)))
        for name, reason in bad.items():
            g = graph.group(name)
            g.prunable = torch.zeros_like(g.prunable)
            g.note = reason
    return graph


_PROBED: dict[tuple, dict[str, str]] = {}  # probe verdicts, oldest first
_PROBED_MAX = 64


def _probe_key(model: nn.Module, inputs: Any, ignore: Sequence[str], everything: bool) -> tuple:
    """What a probe verdict depends on: the code (the class objects themselves, so that a class
    defined again under the same name, as a re-run notebook cell does, is probed again), the
    architecture (tensor names and shapes), the weights (each tensor's norm: a verdict reached at
    one initialisation, where a zero-initialised scale can hide a branch, is not reused for trained
    weights; a copy of the same weights hits), the example inputs' shapes and dtypes, the ignore
    list."""
    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), str(x.dtype))
        if isinstance(x, dict):
            return tuple((k, spec(v)) for k, v in sorted(x.items()))
        return tuple(spec(v) for v in x) if isinstance(x, (tuple, list)) else repr(type(x))
    modules = tuple((n, type(m), module_settings(m)) for n, m in model.named_modules())
    state = model.state_dict(keep_vars=True)
    shapes = tuple((n, tuple(t.shape)) for n, t in state.items())
    return (modules, shapes, weight_norms(list(state.values())), spec(inputs), tuple(ignore), everything)


def module_settings(mod: nn.Module) -> tuple:
    """A module's plain attributes (num_heads, a flag that turns a branch on, a config dict of
    plain values): they shape the forward."""
    return tuple(sorted((k, plain) for k, v in vars(mod).items()
                        if not k.startswith("_") and k != "training"
                        and (plain := _plain_setting(v)) is not _NOT_PLAIN))


_NOT_PLAIN = object()


def _plain_setting(v: Any, depth: int = 0) -> Any:
    """`v` as a comparable value when it is plain data (numbers, text, None, and lists, tuples and
    str-keyed dicts of them, a few levels deep), else _NOT_PLAIN."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if depth < 3 and isinstance(v, (list, tuple)) and len(v) <= 64:
        items = [_plain_setting(i, depth + 1) for i in v]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else tuple(items)
    if depth < 3 and isinstance(v, dict) and len(v) <= 64 and all(isinstance(k, str) for k in v):
        items = [(k, _plain_setting(i, depth + 1)) for k, i in sorted(v.items())]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for _, i in items) else ("dict", tuple(items))
    return _NOT_PLAIN


def weight_norms(tensors: list[torch.Tensor]) -> tuple[float, ...]:
    """Each floating tensor's norm (one multi-tensor kernel per device and dtype): a cheap stand-in
    for the weights' values, equal for copies of the same weights."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return ()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in floats:  # float32 norms (a float16 norm is too coarse a key), one copy to the host per device
        by_device.setdefault(t.device, []).append(t if t.dtype in (torch.float32, torch.float64) else t.float())
    with torch.no_grad():
        return tuple(v for ts in by_device.values()
                     for v in torch.stack([n.float() for n in torch._foreach_norm(ts)]).cpu().tolist())
