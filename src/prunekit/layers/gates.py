"""One learnable gate vector per channel group, applied where the group's channels are *read*.

Where the gates act. A channel of a group is removed, physically, by deleting its producer
filters and BN entries and the matching input slices of every consumer (`surgery.shrink`);
the graph oracle proves that this equals zeroing the consumer input slices
(`testing.checks.check_removal_matches_zeroing`). So a gate multiplies the group's channels in
the *inputs of its consumers* (a forward pre-hook on each conv/linear with an "in" member):

- closed channels contribute exactly nothing, whatever sits between producer and consumer
  (BN's beta after ReLU, a bias), so the gated model with hard gates equals the pruned one;
- a residual stream (the "highway": stem, every block's last conv, every shortcut) is one
  group, so one gate vector closes the same channels in every block input, shortcut and the
  classifier; the stream itself still carries them, but nobody reads them any more.

The authors gated BN outputs and conv inputs with independent noise at each place; here one
sample per group, per image and per forward is shared by all its consumers, so every sampled
network is a real pruned network.

Gate of channel c (logit theta_c): s = sigmoid((theta_c + L) / T), L ~ Logistic(0, 1); the forward
value is 1[s > 0.5] (P(open) = sigmoid(theta_c)), the gradient that of s (straight-through).
A channel whose logit falls below 0 is switched off for good (`active`), unless the controller
defers it. In eval mode gates are deterministic: open iff active and theta >= 0, or the frozen
final masks once `freeze` was called.

>>> import torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)); x = torch.randn(1, 1, 6, 6)
>>> gates = GateSet.from_graph(m, build_graph(m, x))
>>> gates.names, [c.module for c in gates.consumers]
(['0'], ['2'])
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..graph import Graph, Group
from ..surgery.verify import group_is_exact


@dataclass
class Consumer:
    """A module whose input carries gated channels: `index[p]` points into [1, gates of `gate_ids`...]."""

    module: str
    dim: int  # the activation dim holding the channels: 1 (conv) or -1 (linear)
    gate_ids: list[int]
    key: str  # buffer name of the index


def activation_dim(module: nn.Module, name: str, dim: int) -> int | None:
    """Which input dim an "in" member (weight, dim) slices, for layers whose input is args[0]."""
    if name != "weight" or getattr(module, "groups", 1) != 1:
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1 if dim == 0 else None
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1 if dim == 1 else None
    if isinstance(module, nn.Linear):
        return -1 if dim == 1 else None
    return None


def read_outside(graph: Graph) -> dict[str, str]:
    """Modules whose parameters an op of another module's forward reads (`F.conv2d(x, self.c.weight)`,
    nn.MultiheadAttention's out_proj), with that reader: a pre-hook on the module never sees the read."""
    outside: dict[str, str] = {}
    for node in graph.nodes:
        for owner in {q.rpartition(".")[0] for q in node.params} - {node.module}:
            outside.setdefault(owner, node.module)
    return outside


def gateable(model: nn.Module, graph: Graph) -> tuple[list[Group], dict[str, str]]:
    """Prunable groups a gate can act on exactly, and why the others cannot."""
    chosen, skipped = [], {}
    outside = read_outside(graph)
    for g in graph.prunable_groups():
        ins = [m for m in g.tensor_members() if m.role == "in"]
        elsewhere = next((m for m in ins if m.module in outside), None)
        if not group_is_exact(g, model):
            skipped[g.name] = "its channels feed a statistic over channels (LayerNorm)"
        elif not ins:
            skipped[g.name] = "no layer reads its channels"
        elif elsewhere is not None:
            reader = f"'{outside[elsewhere.module]}'" if outside[elsewhere.module] else "the model itself"
            skipped[g.name] = (f"read by {elsewhere.qualname} outside its own forward (in {reader}), where no "
                               "gate can act")
        elif any(activation_dim(model.get_submodule(m.module), m.name, m.dim) is None for m in ins):
            bad = next(m for m in ins if activation_dim(model.get_submodule(m.module), m.name, m.dim) is None)
            skipped[g.name] = f"read by {bad.qualname} (dim {bad.dim}), which is not a conv/linear input"
        else:
            chosen.append(g)
    return chosen, skipped


class GateSet(nn.Module):
    """Logits, permanent masks and consumer hooks for the gated groups of one model."""

    def __init__(self, groups: list[Group], model: nn.Module, initial_logit: float = 5.293,
                 init_noise: float = 0.0, temperature: float = 1.0, seed: int = 0):
        super().__init__()
        self.names = [g.name for g in groups]
        self.sizes = [g.size for g in groups]
        self.temperature = float(temperature)
        gen = torch.Generator().manual_seed(seed)
        self.logits = nn.ParameterList()
        for i, g in enumerate(groups):
            noise = (torch.rand(g.size, generator=gen) * 2 - 1) * init_noise
            self.logits.append(nn.Parameter(initial_logit * (1 + noise)))
            self.register_buffer(f"prunable_{i}", g.prunable.clone())
            self.register_buffer(f"active_{i}", torch.ones(g.size, dtype=torch.bool))
        self.consumers: list[Consumer] = []
        self._build_consumers(groups, model)
        self.frozen: list[torch.Tensor] | None = None
        self.samples: dict[int, torch.Tensor] = {}  # this forward's sampled gates (B, C) per group
        self._opens: list[torch.Tensor] | None = None  # this forward's deterministic gates
        self._handles: list[Any] = []

    @classmethod
    def from_graph(cls, model: nn.Module, graph: Graph, **kwargs: Any) -> "GateSet":
        return cls(gateable(model, graph)[0], model, **kwargs)

    def _build_consumers(self, groups: list[Group], model: nn.Module) -> None:
        per_module: dict[str, list[tuple[int, Any]]] = {}
        for i, g in enumerate(groups):
            for m in g.tensor_members():
                if m.role == "in":
                    per_module.setdefault(m.module, []).append((i, m))
        for k, (mod_name, entries) in enumerate(per_module.items()):
            mod = model.get_submodule(mod_name)
            dim = activation_dim(mod, entries[0][1].name, entries[0][1].dim)
            gate_ids = sorted({i for i, _ in entries})
            offsets, total = {}, 1
            for i in gate_ids:
                offsets[i], total = total, total + self.sizes[i]
            index = torch.zeros(entries[0][1].channel.numel(), dtype=torch.long)  # 0 -> the constant 1
            for i, m in entries:
                pos = (m.channel >= 0).nonzero().flatten()
                index[pos] = offsets[i] + m.channel[pos]
            self.register_buffer(f"index_{k}", index)
            self.consumers.append(Consumer(mod_name, dim, gate_ids, f"index_{k}"))

    # ---- gate values ------------------------------------------------------------------
    def prunable(self, i: int) -> torch.Tensor:
        return getattr(self, f"prunable_{i}")

    def active(self, i: int) -> torch.Tensor:
        return getattr(self, f"active_{i}")

    def open_probs(self) -> list[torch.Tensor]:
        """P(open) per channel: sigmoid(theta) while active, 0 once masked, 1 if not prunable."""
        return [torch.where(self.prunable(i), self.active(i) * torch.sigmoid(t.detach()), torch.ones_like(t))
                for i, t in enumerate(self.logits)]

    def hard_open(self) -> list[torch.Tensor]:
        """Deterministic gates: the frozen masks, else active and theta >= 0 (fixed channels open)."""
        if self.frozen is not None:  # on the logits' device: the set may have moved since freeze
            return [f.to(self.logits[i].device, copy=True) for i, f in enumerate(self.frozen)]
        return [~self.prunable(i) | (self.active(i) & (t.detach() >= 0)) for i, t in enumerate(self.logits)]

    def sample(self, i: int, batch: int) -> torch.Tensor:
        """(batch, C) hard gates with straight-through gradients, shared within one forward."""
        got = self.samples.get(i)
        if got is not None and got.shape[0] == batch:
            return got
        theta = self.logits[i]
        u = torch.rand(batch, theta.numel(), device=theta.device).clamp_(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((theta + torch.log(u) - torch.log1p(-u)) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        gate = hard + (soft - soft.detach())  # exactly `hard` forward, gradient of `soft`
        gate = torch.where(self.prunable(i), gate * self.active(i), torch.ones_like(gate))
        self.samples[i] = gate
        return gate

    def freeze(self, masks: list[torch.Tensor]) -> None:
        """Fix the gates to `masks` (bool per channel) in both modes: the model to convert."""
        self.frozen = [m.to(self.logits[i].device, torch.bool) for i, m in enumerate(masks)]

    # ---- hooks --------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Install the gates on `model` (a forward pre-hook per consumer, one on the root)."""
        self.detach()
        self._handles.append(model.register_forward_pre_hook(lambda mod, args: self._new_forward()))
        for c in self.consumers:
            hook = lambda mod, args, kwargs, c=c: self._gate_input(mod, args, kwargs, c)
            self._handles.append(model.get_submodule(c.module).register_forward_pre_hook(hook, with_kwargs=True))

    @property
    def attached(self) -> bool:
        """Whether the gates are installed on a model."""
        return bool(self._handles)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._new_forward()

    def _new_forward(self) -> None:
        self.samples.clear()
        self._opens = None

    def _gate_input(self, module: nn.Module, args: tuple, kwargs: dict, c: Consumer) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs["input"]  # conv/linear forward(input): positional or by keyword
        stochastic = module.training and self.frozen is None
        if stochastic:
            parts = [self.sample(i, x.shape[0]) for i in c.gate_ids]
        else:
            if self._opens is None:
                self._opens = self.hard_open()
            parts = [self._opens[i].to(x.dtype).unsqueeze(0) for i in c.gate_ids]
        rows = parts[0].shape[0]
        table = torch.cat([torch.ones(rows, 1, device=x.device, dtype=parts[0].dtype)] + parts, dim=1)
        mult = table[:, getattr(self, c.key)].to(x.dtype)  # (B or 1, positions)
        shape = [rows] + [1] * (x.dim() - 1)
        shape[c.dim] = mult.shape[1]
        gated = x * mult.view(shape)
        return ((gated,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": gated})

    def extra_repr(self) -> str:
        return f"groups={len(self.names)}, channels={sum(self.sizes)}, consumers={len(self.consumers)}"


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))
