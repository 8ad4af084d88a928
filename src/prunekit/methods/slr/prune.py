"""After SLR/ADMM training: hard pruning, BN recalibration, shrinking.

hard_prune_ writes W ← Π_S(W) and keeps the zeros as `Mask` parametrizations, so a later
training run (masked retraining, with a *fresh* optimizer: stale momentum would otherwise push
the effective weights of a previous phase) cannot revive pruned weights.

Filter sparsity zeroes a conv's filters, but the BatchNorm after it still adds its shift β to
those channels. Given `example_inputs`, hard_prune_ also masks the conv bias and the γ, β of the
BatchNorm that directly consumes the conv's output for every zeroed filter, so the channel
outputs exactly zero and `shrink_` can remove it without changing outputs. Without
example_inputs only the weights are projected (the reference code's behaviour).

>>> import torch
>>> from torch import nn
>>> from prunekit.methods.slr import SLRConfig
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))
>>> masks = hard_prune_(net, SLRConfig(sparsity=0.75))
>>> int((net[1].weight == 0).sum()), net[1].weight.numel()
(108, 144)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ...core.errors import ConfigError, PruningError
from ...core.modes import evaluating, kept_modes
from ...surgery.masks import Mask, apply_mask, remove_masks
from ...surgery.projections import conv_layout
from .config import ProjectionSpec, SLRConfig, check_masks_only_grow, resolve_targets
from .hook import SLRHook
from .state import SLRState

__all__ = ["hard_prune_", "recalibrate_bn", "shrink_", "norms_after"]

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


def _spec_of(model: nn.Module, source: Any) -> ProjectionSpec:
    if isinstance(source, (SLRHook, SLRState)):
        return source.spec
    if isinstance(source, SLRConfig):
        return ProjectionSpec.from_config(source, resolve_targets(model, source), model)
    raise ConfigError(f"hard_prune_ needs an SLRConfig, SLRState or SLRHook, got {type(source).__name__}")


def _raw(module: nn.Module, pname: str, where: str) -> Tensor:
    """The stored tensor behind `module.<pname>`: the parameter, or the original under our Mask."""
    if not parametrize.is_parametrized(module, pname):
        return getattr(module, pname)
    plist = module.parametrizations[pname]
    if len(plist) != 1 or not isinstance(plist[0], Mask):
        raise PruningError(f"{where} carries parametrizations other than a prunekit Mask; remove them first")
    return plist.original


def norms_after(model: nn.Module, example_inputs: Any) -> dict[str, str]:
    """{conv/linear name: name of the BatchNorm whose input is exactly that module's output}.

    Found by one eval-mode forward pass with hooks (running stats are not touched): a BN is
    paired with a producer when it receives the very tensor object the producer returned.
    """
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, Tensor]] = {}  # id(output) -> (producer, output kept alive)
    pairs: dict[str, str] = {}

    def on_output(mod, inputs, output):
        if isinstance(mod, _PRODUCERS) and isinstance(output, Tensor):
            produced[id(output)] = (names[mod], output)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and inputs and id(inputs[0]) in produced:
            owner, kept = produced[id(inputs[0])]
            if kept is inputs[0]:
                pairs[owner] = names[mod]

    handles = [m.register_forward_hook(on_output) for m in model.modules() if m is not model]
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad(), evaluating(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return pairs


def _channel_masks(model: nn.Module, spec: ProjectionSpec, masks: dict, example_inputs: Any) -> dict:
    """Masks of conv bias and following BN γ/β for the channels whose filters are all zero."""
    extra = {}
    following = norms_after(model, example_inputs)
    for pname, mask in masks.items():
        mname = pname.rsplit(".", 1)[0]
        groups = spec.transposed.get(pname)
        by_output = mask if groups is None else conv_layout(mask, groups)  # (out, ...)
        alive = by_output.reshape(by_output.shape[0], -1).any(dim=1)  # (out,)
        if bool(alive.all()):
            continue
        module = model.get_submodule(mname)
        if isinstance(getattr(module, "bias", None), Tensor):
            extra[f"{mname}.bias"] = alive.clone()
        bn_name = following.get(mname)
        if bn_name is not None and model.get_submodule(bn_name).affine:
            extra[f"{bn_name}.weight"] = alive.clone()
            extra[f"{bn_name}.bias"] = alive.clone()
    return extra


def hard_prune_(
    model: nn.Module, source: SLRConfig | SLRState | SLRHook, example_inputs: Any = None
) -> dict[str, Tensor]:
    """W ← Π_S(W) for every target weight, kept as masks; returns {param name: bool mask}.

    With `example_inputs` and filter sparsity, the channels of zeroed filters are closed too
    (conv bias, following BN γ and β; see the module doc). All masks are computed before any
    tensor changes, so an error leaves the model untouched.
    """
    spec = _spec_of(model, source)
    with torch.no_grad():
        W = {}
        for pname in spec.sparsities:
            try:
                W[pname] = model.get_submodule(pname.rsplit(".", 1)[0]).weight.detach()
            except AttributeError:
                raise PruningError(f"{pname} is not in this model; hard-prune the model SLR trained") from None
        masks = spec.masks(W)
        check_masks_only_grow(model, masks)
        if example_inputs is not None and spec.kind == "filter":
            masks.update(_channel_masks(model, spec, masks, example_inputs))
        targets = {}
        for pname, mask in masks.items():
            mname, _, attr = pname.rpartition(".")
            module = model.get_submodule(mname)
            targets[pname] = (module, attr, _raw(module, attr, pname), getattr(module, attr).detach() * mask)
        for pname, (module, attr, raw, value) in targets.items():
            raw.copy_(value)
            apply_mask(module, attr, masks[pname])
    return masks


def recalibrate_bn(model: nn.Module, batches: Iterable, n: int | None = None) -> int:
    """Recompute BatchNorm running statistics from `n` batches (all when None); return the count.

    Resets the running stats, sets momentum=None (a cumulative average, so every batch weighs
    the same) and forwards in train mode without gradients; modes and momenta are restored, and
    if a forward fails the running stats are put back as they were before the error propagates.
    Batches are tensors or (inputs, ...) tuples.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    if n is not None and n < 1:
        raise ConfigError(f"recalibrate_bn: n={n} must be at least 1")
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ConfigError("recalibrate_bn needs at least one batch; the iterable is empty")
    device = next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in bns]
    used = 0
    with kept_modes(model):  # every module's mode as it was, afterwards
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            with torch.no_grad():
                batch = first
                while batch is not None and (n is None or used < n):
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    model(x.to(device))
                    used += 1
                    batch = next(it, None)
        except BaseException:
            with torch.no_grad():
                for m, buffers in zip(bns, saved):
                    for k, b in buffers.items():
                        getattr(m, k).copy_(b)
            raise
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
    return used


def shrink_(model: nn.Module, example_inputs: Any) -> Any:
    """Bake the masks, then physically remove channels whose producing parameters are all zero.

    Uses `prunekit.surgery.plan.remove_zero_channels_(model, example_inputs) -> Plan`, which
    keeps outputs exactly; returns its Plan. Only channels closed on the producing side go
    (filter sparsity after `hard_prune_(..., example_inputs)`); input-channel ("channel")
    sparsity leaves producers alive and removes nothing.
    """
    try:
        from ...surgery.plan import remove_zero_channels_
    except ImportError as err:
        raise PruningError(
            f"physical channel removal needs prunekit.surgery.plan.remove_zero_channels_ ({err})"
        ) from None
    remove_masks(model, bake=True)
    return remove_zero_channels_(model, example_inputs)
