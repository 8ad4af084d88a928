"""Channel importance: a criterion maps a Group to one score per channel (higher = keep).

A criterion is a callable `criterion(group, ctx) -> Tensor (group.size,)`. Most criteria score
each member tensor separately (the conv's filters, the BN's gammas, the next layer's input
slices) and then combine members with one shared reduction (`reduce_members`): that is the
"group-level" importance of DepGraph, written once for all criteria.

Data-dependent criteria read `ctx`: gradients (`ctx.gradients()`, accumulated over
`ctx.batches`) or output statistics of every layer (`ctx.output_stats()`, one pass over the
batches). Per-class activation statistics, which evolved criteria build on, come from
`importance.activations.activation_stats`.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False))
>>> m[0].weight.data = torch.tensor([1., 3., 2.]).view(3, 1, 1, 1); _ = m[1].weight.data.fill_(1.0)
>>> g = build_graph(m, torch.randn(1, 1, 2, 2)).group("0")
>>> CRITERIA.get("l1")(g, ScoreContext(m)).tolist()
[1.0, 2.0, 1.5]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry
from ..graph import Graph, Group

Criterion = Callable[[Group, "ScoreContext"], torch.Tensor]
CRITERIA: Registry[Criterion] = Registry("criterion")
REDUCTIONS = ("mean", "sum", "max")


@dataclass
class ScoreContext:
    """What a criterion may look at: the model, optional data, and settings."""

    model: nn.Module
    batches: Iterable | None = None  # iterable of (x, y); needed by data-dependent criteria
    reduction: str = "mean"
    seed: int = 0
    loss_fn: Callable = nn.functional.cross_entropy
    graph: Graph | None = None  # when set, data passes may serve all its prunable groups at once
    cache: dict = field(default_factory=dict, repr=False)  # criteria keep per-context results here
    _grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _outs: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _params: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def parameters(self) -> dict[str, torch.Tensor]:
        """name -> parameter of the model (looked up once per context)."""
        if self._params is None:
            self._params = dict(self.model.named_parameters())
        return self._params

    def tensor(self, module: str, name: str) -> torch.Tensor:
        return getattr(self.model.get_submodule(module), name).detach()

    def require_batches(self, who: str) -> Iterable:
        if self.batches is None:
            raise ConfigError(f"criterion {who!r} needs data: pass batches (an iterable of (inputs, targets))")
        return self.batches

    def gradients(self) -> dict[str, torch.Tensor]:
        """Sum of loss gradients of every parameter over `batches` (computed once, cached)."""
        if self._grads is None:
            params = dict(self.model.named_parameters())
            grads = {n: torch.zeros_like(p) for n, p in params.items()}
            was = self.model.training
            self.model.eval()
            for x, y in self.require_batches("taylor"):
                self.model.zero_grad(set_to_none=True)
                self.loss_fn(self.model(x), y).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        grads[n] += p.grad.detach()
            self.model.zero_grad(set_to_none=True)
            self.model.train(was)
            self._grads = grads
        return self._grads


    def output_stats(self) -> dict[str, torch.Tensor]:
        """Mean |output| per output channel of every conv/Linear over `batches` (one pass, cached)."""
        if self._outs is None:
            sums: dict[str, torch.Tensor] = {}
            count = [0]

            def hook(name, conv):
                def record(_m, _inp, out):
                    ch = 1 if conv else out.dim() - 1
                    v = out.detach().abs().movedim(ch, -1).reshape(-1, out.shape[ch]).mean(0)
                    sums[name] = sums.get(name, 0) + v
                return record

            handles = [m.register_forward_hook(hook(n, isinstance(m, nn.modules.conv._ConvNd)))
                       for n, m in self.model.named_modules()
                       if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            was = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    for x, _ in self.require_batches("activation"):
                        self.model(x)
                        count[0] += 1
            finally:
                for h in handles:
                    h.remove()
                self.model.train(was)
            self._outs = {n: v / max(count[0], 1) for n, v in sums.items()}
        return self._outs


def per_channel(values: torch.Tensor, member, size: int, reduce: str = "sum") -> torch.Tensor:
    """Collapse a member tensor to one number per group channel.

    `values` has the member tensor's shape; positions along `member.dim` map to channels via
    `member.channel` (several positions may share a channel: the H*W columns of a Linear after a
    flatten). Other dims are summed (or max-ed).
    """
    flat = values.movedim(member.dim, 0).reshape(values.shape[member.dim], -1)
    row = flat.sum(1) if reduce == "sum" else flat.amax(1)
    sel = member.channel >= 0
    out = torch.zeros(size, dtype=row.dtype)
    return out.scatter_reduce_(0, member.channel[sel], row[sel], "sum" if reduce == "sum" else "amax")


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
        power = (lambda w: w.abs()) if p == 1 else (lambda w: w.square()) if p == 2 else (lambda w: w.abs().pow(p))
        parts = [per_channel(power(w), m, group.size) for m, w in _param_members(group, ctx)]
        return reduce_members(parts, ctx.reduction).pow(1.0 / p)
    return score


def bn_scale(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """|gamma| of the group's normalisation layers (network slimming); L2 where a group has none."""
    parts = [per_channel(w.abs(), m, group.size) for m, w in _param_members(group, ctx, ("through",))
             if m.name == "weight" and isinstance(ctx.model.get_submodule(m.module), _NORMS)]
    return reduce_members(parts, ctx.reduction) if parts else _norm_criterion(2.0)(group, ctx)


def taylor(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor: |sum over a channel's weights of w * dL/dw| (Molchanov et al.)."""
    grads = ctx.gradients()
    parts = [per_channel(w * grads[m.qualname], m, group.size).abs() for m, w in _param_members(group, ctx)]
    return reduce_members(parts, ctx.reduction)


def fpgm(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """Filter pruning via geometric median: channels far from all others are kept.

    Each channel's producer filters are concatenated into one vector; score = sum of distances
    to every other channel's vector (the geometric-median channel is the most redundant).
    """
    vecs = []
    for m, w in _param_members(group, ctx, ("out",)):
        if w.dim() < 2:
            continue
        rows = torch.zeros(group.size, w.numel() // w.shape[m.dim])
        flat = w.movedim(m.dim, 0).reshape(w.shape[m.dim], -1)
        sel = m.channel >= 0
        rows.index_add_(0, m.channel[sel], flat[sel])
        vecs.append(rows)
    if not vecs:
        return _norm_criterion(2.0)(group, ctx)
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
                sel = m.channel >= 0
                parts.append(torch.zeros(group.size).index_add_(0, m.channel[sel], v[sel]))
    return reduce_members(parts, ctx.reduction) if parts else _norm_criterion(2.0)(group, ctx)


def random_scores(group: Group, ctx: ScoreContext) -> torch.Tensor:
    gen = torch.Generator().manual_seed(ctx.seed + sum(map(ord, group.name)))
    return torch.rand(group.size, generator=gen)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
CRITERIA.register("l1", _norm_criterion(1.0))
CRITERIA.register("l2", _norm_criterion(2.0))
CRITERIA.register("bn_scale", bn_scale)
CRITERIA.register("taylor", taylor)
CRITERIA.register("fpgm", fpgm)
CRITERIA.register("random", random_scores)
CRITERIA.register("activation", activation)

# the evolved functions and their seed metrics register themselves (they import this module)
from .evolved import shipped as _shipped  # noqa: E402,F401
