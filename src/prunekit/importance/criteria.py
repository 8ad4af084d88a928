"""Channel importance: a criterion maps a Group to one score per channel (higher = keep).

A criterion is a callable `criterion(group, ctx) -> Tensor (group.size,)`. Most criteria score
each member tensor separately (the conv's filters, the BN's gammas, the next layer's input
slices) and then combine members with one shared reduction (`reduce_members`): that is the
"group-level" importance of DepGraph, written once for all criteria.

Data-dependent criteria read `ctx` (importance/context.py): gradients (`ctx.gradients()`,
accumulated over `ctx.batches`), Hessian-vector products or output statistics of every layer
(`ctx.output_stats()`, one pass over the batches). Per-class activation statistics, streamed
batch by batch, which the evolved criteria score, come from `importance.evolved.stats`. A criterion
that falls back to another one records it (`ctx.note_fallback`) and warns. The channel criteria
snip, grasp and synflow reduce per-weight scores (importance/elements.py) to channels.

`resolve_criterion(spec)` turns a registered name, "<prefix>:<text>" (a factory registered with
`register_criterion_factory`) or a callable into a criterion.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False))
>>> m[0].weight.data = torch.tensor([1., 3., 2.]).view(3, 1, 1, 1); _ = m[1].weight.data.fill_(1.0)
>>> g = build_graph(m, torch.randn(1, 1, 2, 2)).group("0")
>>> CRITERIA.get("l1")(g, ScoreContext(m)).tolist()
[1.0, 2.0, 1.5]
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry
from ..graph import Group
from .context import ScoreContext

Criterion = Callable[[Group, "ScoreContext"], torch.Tensor]
CRITERIA: Registry[Criterion] = Registry(
    "criterion", lambda name: None if isinstance(name, str) and ":" not in name else
    "a criterion name is text without ':' (':' starts '<prefix>:<text>', built by a factory: "
    "register_criterion_factory)")
REDUCTIONS = ("mean", "sum", "max")


def per_channel(values: torch.Tensor, member, size: int, reduce: str = "sum") -> torch.Tensor:
    """Collapse a member tensor to one number per group channel.

    `values` has the member tensor's shape; positions along `member.dim` map to channels via
    `member.channel` (several positions may share a channel: the H*W columns of a Linear after a
    flatten). Other dims are summed (or max-ed).
    """
    others = [d for d in range(values.dim()) if d != member.dim]
    if not others:  # a 1-D tensor (bias, norm scale): already one number per position
        row = values
    else:  # reduce in place of a movedim + reshape, which copies a weight sliced along dim 1
        row = values.sum(others) if reduce == "sum" else values.amax(others)
    return _to_channels(row, member, size, reduce)


def _to_channels(row: torch.Tensor, member, size: int, reduce: str = "sum") -> torch.Tensor:
    """Scatter one number per position (along member.dim) onto the group's channels."""
    if reduce == "sum" and _is_identity(member, size):
        return row + 0.0  # position j is channel j: the scatter below would give this (a new tensor)
    sel = member.channel >= 0
    out = torch.zeros(size, dtype=row.dtype)
    return out.scatter_reduce_(0, member.channel[sel], row[sel], "sum" if reduce == "sum" else "amax")


def _is_identity(member, size: int) -> bool:
    """Whether member.channel is 0..size-1 (cached on the member: graphs are reused across prunings)."""
    known = getattr(member, "_identity", None)
    if known is None:
        ch = member.channel
        known = bool(ch.numel() == size and torch.equal(ch, torch.arange(size, dtype=ch.dtype)))
        member._identity = known
    return known


def reduce_members(scores: list[torch.Tensor], how: str) -> torch.Tensor:
    """Combine per-member channel scores into group scores (mean, sum or max)."""
    if not scores:
        raise ConfigError("this group has no parameter to score; ignore it or use another criterion")
    stack = torch.stack(scores)
    if how == "mean":
        return stack.mean(0)
    if how == "sum":
        return stack.sum(0)
    if how == "max":
        return stack.amax(0)
    raise ConfigError(f"reduction={how!r} is not allowed; choose one of: {', '.join(REDUCTIONS)}")


def _param_members(group: Group, ctx: ScoreContext, roles=("out", "in", "through")):
    params = ctx.parameters()
    for m in group.tensor_members():
        if m.role in roles and m.qualname in params:
            yield m, params[m.qualname].detach()


def _norm_criterion(p: float) -> Criterion:
    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        parts = [_channel_power_sum(w, m, group.size, p) for m, w in _param_members(group, ctx)]
        return reduce_members(parts, ctx.reduction).pow(1.0 / p)
    return score


def _channel_power_sum(w: torch.Tensor, member, size: int, p: float) -> torch.Tensor:
    """per_channel(|w| ** p)."""
    return per_channel(w.abs() if p == 1 else w.square() if p == 2 else w.abs().pow(p), member, size)


def bn_scale(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """|gamma| of the group's normalisation layers (network slimming); L2 where a group has none."""
    parts = [per_channel(w.abs(), m, group.size) for m, w in _param_members(group, ctx, ("through",))
             if m.name == "weight" and isinstance(ctx.model.get_submodule(m.module), _NORMS)]
    if parts:
        return reduce_members(parts, ctx.reduction)
    ctx.note_fallback(group.name, "bn_scale", "l2", "no normalisation layer in the group")
    return l2_scores(group, ctx)


def taylor(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor: |sum over a channel's weights of w * dL/dw| (Molchanov et al.)."""
    grads = ctx.gradients("taylor")
    parts = [per_channel(w * grads[m.qualname], m, group.size).abs() for m, w in _param_members(group, ctx)]
    return reduce_members(parts, ctx.reduction)


def fpgm(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """Filter pruning via geometric median: channels far from all others are kept.

    Each channel's producer filters are concatenated into one vector (a channel holding several
    filters of one layer, a whole conv group, puts them side by side in their order); score = sum
    of distances to every other channel's vector (the geometric-median channel is the most redundant).
    """
    vecs = []
    for m, w in _param_members(group, ctx, ("out",)):
        if w.dim() < 2:
            continue
        dtype = torch.promote_types(w.dtype, torch.float32)  # the model's own float64, float32 for half types
        flat = w.movedim(m.dim, 0).reshape(w.shape[m.dim], -1).to(dtype)
        sel = m.channel >= 0
        ch = m.channel[sel]
        counts = torch.bincount(ch, minlength=group.size)
        order = torch.argsort(ch, stable=True)
        slot = torch.empty_like(ch)  # the filter's place among its channel's filters
        slot[order] = torch.arange(ch.numel()) - (counts.cumsum(0) - counts)[ch[order]]
        rows = torch.zeros(group.size, int(counts.max()), flat.shape[1], dtype=dtype)
        rows[ch, slot] = flat[sel]
        vecs.append(rows.reshape(group.size, -1))
    if not vecs:
        ctx.note_fallback(group.name, "fpgm", "l2", "no producing filter of two or more dims in the group")
        return l2_scores(group, ctx)
    v = torch.cat(vecs, 1)
    return torch.cdist(v, v).sum(1)


def activation(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """Mean |output| of the group's producing conv/Linear layers over the data (data-dependent)."""
    stats = ctx.output_stats()
    parts = []
    for m in group.tensor_members():
        if m.role == "out" and m.name == "weight" and m.module in stats:
            v = stats[m.module]
            if v.numel() == m.channel.numel():
                sel, v = m.channel >= 0, v.to(torch.promote_types(v.dtype, torch.float32))
                parts.append(torch.zeros(group.size, dtype=v.dtype).index_add_(0, m.channel[sel], v[sel]))
    if parts:
        return reduce_members(parts, ctx.reduction)
    ctx.note_fallback(group.name, "activation", "l2", "no producing conv/Linear output in the group")
    return l2_scores(group, ctx)


def random_scores(group: Group, ctx: ScoreContext) -> torch.Tensor:
    gen = torch.Generator().manual_seed(ctx.seed + sum(map(ord, group.name)))
    return torch.rand(group.size, generator=gen)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
l2_scores = _norm_criterion(2.0)
CRITERIA.register("l1", _norm_criterion(1.0))
CRITERIA.register("l2", l2_scores)
CRITERIA.register("bn_scale", bn_scale)
CRITERIA.register("taylor", taylor)
CRITERIA.register("fpgm", fpgm)
CRITERIA.register("random", random_scores)
CRITERIA.register("activation", activation)


# A factory turns the text after "<prefix>:" into a criterion (e.g. "evolved:<expression>").
CRITERION_FACTORIES: Registry[Callable[[str], Criterion]] = Registry("criterion prefix")


def register_criterion_factory(prefix: str, factory: Callable[[str], Criterion]) -> None:
    """Let `resolve_criterion("<prefix>:<text>")` build criteria with `factory(text)`.

    >>> register_criterion_factory("scaled_l1", lambda text: lambda g, ctx: float(text) * CRITERIA.get("l1")(g, ctx))
    >>> callable(resolve_criterion("scaled_l1:2.5"))
    True
    >>> CRITERION_FACTORIES.unregister("scaled_l1")
    """
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ConfigError(f"criterion prefix {prefix!r} must be a plain name such as 'evolved' (no ':')")
    CRITERION_FACTORIES.register(prefix, factory)


def _shown(spec: Any, limit: int = 80) -> str:
    """repr of a criterion spec for an error message, cut to `limit` characters."""
    text = repr(spec)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def resolve_criterion(spec: str | Criterion) -> Criterion:
    """The criterion `spec` names: a callable `(group, ctx) -> Tensor (group.size,)` as it is,
    a registered name (`CRITERIA`), or "<prefix>:<text>" built by the factory registered for
    the prefix. Anything else raises one ConfigError saying what is accepted.

    >>> resolve_criterion("l2") is CRITERIA.get("l2")
    True
    """
    if callable(spec):
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in CRITERION_FACTORIES:
        prefix, text = next(iter(spec.items()))  # YAML reads `evolved: P` (colon, space) as a mapping
        raise ConfigError(f"criterion={_shown(spec)} was read as a mapping: YAML takes '{prefix}: ...' with a space after "
                          f"the colon as a key; write {prefix}:{text if text is not None else '<text>'} without the "
                          "space, or quote the whole value")
    if not isinstance(spec, str):
        raise ConfigError(f"criterion={_shown(spec)} must be a registered name ({', '.join(CRITERIA.list())}), "
                          "'<prefix>:<text>' or a callable (group, ctx) -> scores")
    prefix, sep, text = spec.partition(":")
    if not sep:
        if spec not in CRITERIA:
            raise ConfigError(f"criterion={_shown(spec)} is not allowed; choose one of: {', '.join(CRITERIA.list())}"
                              + (f", or '<prefix>:<text>' with a prefix in {CRITERION_FACTORIES.list()}"
                                 if CRITERION_FACTORIES.list() else ""))
        return CRITERIA.get(spec)
    if prefix not in CRITERION_FACTORIES:
        raise ConfigError(f"criterion={_shown(spec)}: no criterion factory is registered for prefix {prefix!r}; "
                          f"registered prefixes: {', '.join(CRITERION_FACTORIES.list()) or '(none)'}")
    try:
        built = CRITERION_FACTORIES.get(prefix)(text)
    except ConfigError as err:
        raise ConfigError(f"criterion={_shown(spec)}: {err}") from None
    except Exception as err:  # the factory's own parser rejected the text
        raise ConfigError(f"criterion={_shown(spec)} could not be built by the {prefix!r} factory "
                          f"({type(err).__name__}: {str(err)[:200]}); fix the text after '{prefix}:'") from None
    if not callable(built):
        raise ConfigError(f"criterion={spec!r}: the {prefix!r} factory returned {type(built).__name__}, not a callable")
    return built


from . import elements  # noqa: E402,F401  (registers the channel-level snip, grasp and synflow)


# the evolved functions and their seed metrics register themselves (they import this module)
from .evolved import shipped as _shipped  # noqa: E402,F401
