"""Removing a whole branch when every channel of a group closed (block removal, used by gate methods).

`remove_channels_` never empties a group (a conv with 0 filters is not a valid layer). When all
channels of a group G close, e.g. the inner group (conv1 -> conv2) of a ResNet block, its
consumers only ever read zeros, so they output a constant: their bias, or 0. The branch is then
replaced, module by module, so that no FLOP of it remains and the forward keeps its shapes:

- producers of G (conv/linear writing only G)  -> `EmptyOutput`: a tensor with 0 channels and
  the output size the layer would have had;
- channel-wise layers of G (BatchNorm, GroupNorm, PReLU) -> `nn.Identity` (0 channels pass);
- consumers of G (conv/linear reading only G)    -> `ConstantOutput`: their bias (or zeros)
  broadcast to the output shape.

In a CIFAR ResNet block this leaves out = relu(shortcut(x) + bn2(0)), exactly what the gated
model computes (bn2 of an all-zero input is a per-channel constant in eval mode). Groups that do
not have this shape (a consumer that also reads other groups through a concat) keep one
channel whose consumer slices are zeroed instead (what Gator's convert.py does).

A plan records the cuts in meta["replay"]["cut_branches"] (two composed plans list the cuts of both);
replaying it (`apply_plan_`) checks every listed branch against the one `find_branch` derives on
the fresh model, then cuts.

>>> conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
>>> EmptyOutput(conv)(torch.randn(2, 4, 8, 8)).shape
torch.Size([2, 0, 4, 4])
>>> ConstantOutput(nn.Conv2d(4, 6, 3, padding=1, bias=False))(torch.randn(2, 0, 4, 4)).abs().sum().item()
0.0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..graph import Graph, Group

CHANNELWISE = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.PReLU)


def _layer_ok(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return (isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.modules.conv._ConvTransposeNd)
            and mod.groups == 1)


class _Geometry(nn.Module):
    """Output size of the conv (or linear) a stand-in replaces, from its input's size."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = isinstance(layer, nn.modules.conv._ConvNd)
        if self.conv:
            self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
            self.dilation, self.padding = tuple(layer.dilation), layer.padding

    def out_size(self, x: torch.Tensor) -> tuple[int, ...]:
        if not self.conv:
            return tuple(x.shape[:-1])
        spatial = x.shape[2:]
        if self.padding == "same":
            return (x.shape[0], *spatial)
        pad = (0,) * len(spatial) if self.padding == "valid" else tuple(self.padding)
        return (x.shape[0], *[(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
                              zip(spatial, pad, self.dilation, self.kernel_size, self.stride)])


class EmptyOutput(_Geometry):
    """Replaces a conv/linear whose every output channel closed: returns 0 channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.out_size(x)
        shape = (size[0], 0, *size[1:]) if self.conv else (*size, 0)
        return torch.zeros(shape, dtype=x.dtype, device=x.device)


class ConstantOutput(_Geometry):
    """Replaces a conv/linear whose every input channel closed: returns its bias (or zeros).

    The bias stays a parameter (counted, and trained by a fine-tuning as the layer's bias was);
    the zeros of a layer without bias are a buffer."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            self.value = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_buffer("value", torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.out_size(x)
        v = self.value.to(x.dtype)
        if self.conv:
            return v.view(1, -1, *[1] * (len(size) - 1)).expand(size[0], -1, *size[1:]).contiguous()
        return v.expand(*size, -1).contiguous()


@dataclass
class Branch:
    """Modules to replace when group `group` closes entirely (by qualified module name)."""

    group: str
    empty: list[str] = field(default_factory=list)
    identity: list[str] = field(default_factory=list)
    constant: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"group": self.group, "empty": self.empty, "identity": self.identity, "constant": self.constant}


def find_branch(model: nn.Module, graph: Graph, group: Group) -> Branch | None:
    """The branch of a fully closed `group`, or None if it cannot be cut out cleanly."""
    if not bool(group.prunable.all()):
        return None
    roles: dict[str, set[str]] = {}
    for m in group.members:
        roles.setdefault(m.module, set()).add(m.role)
    others: dict[str, set[str]] = {}  # module -> roles it has in *other* groups
    for g in graph.groups:
        if g is not group:
            for m in g.members:
                if m.module in roles:
                    others.setdefault(m.module, set()).add(m.role)
    branch = Branch(group.name)
    for name, r in roles.items():
        mod = model.get_submodule(name)
        elsewhere = others.get(name, set())
        if r == {"out"} and _layer_ok(mod) and elsewhere <= {"in"} and _covers(group, name, "out", 0):
            branch.empty.append(name)
        elif r == {"through"} and isinstance(mod, CHANNELWISE) and not elsewhere:
            branch.identity.append(name)
        elif r == {"in"} and _layer_ok(mod) and elsewhere <= {"out"} and _covers(group, name, "in", 1):
            branch.constant.append(name)
        else:
            return None
    return branch if branch.empty and branch.constant else None


def _covers(group: Group, module: str, role: str, dim: int) -> bool:
    """Every position of the module's weight along `dim` belongs to `group`."""
    hits = [m for m in group.members if m.module == module and m.role == role and m.name == "weight" and m.dim == dim]
    return bool(hits) and all(bool((m.channel >= 0).all()) for m in hits)


def cut_branches_(model: nn.Module, branches: list[Branch]) -> None:
    """Replace the branches' modules in place (a module that a branch empties is never made constant)."""
    decision: dict[str, str] = {}
    for kind in ("constant", "identity", "empty"):  # later kinds win across branches: empty > identity > constant
        for b in branches:
            for name in getattr(b, kind):
                decision[name] = kind
    made = {"empty": EmptyOutput, "identity": lambda mod: nn.Identity(), "constant": ConstantOutput}
    for name, kind in decision.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, made[kind](model.get_submodule(name)))


# ---- replay: plan.meta["replay"]["cut_branches"] = {"branches": [Branch.to_dict(), ...]} ----------
_BRANCH_KEYS = ("group", "empty", "identity", "constant")


def check_branch_entry(model: nn.Module, graph: Graph, plan: Any, entry: Any,
                       allowed: tuple[str, ...] = ("branches",)) -> list[Branch]:
    """The branches an entry lists, each equal to the one `find_branch` derives on this model.

    A plan can thus only cut modules that the graph places in the branch of a group that can
    close entirely; anything else (a foreign module name, a wrong type) is a CheckpointError.
    """
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"plan's branch cuts are invalid: {what}; re-export the plan with prunekit")

    if not isinstance(entry, dict) or not set(entry) <= set(allowed):
        raise fail(f"the entry must be a mapping with keys among {list(allowed)}")
    raw = entry.get("branches", [])
    if not isinstance(raw, list):
        raise fail(f"'branches' must be a list, got {type(raw).__name__}")
    groups = {g.name: g for g in graph.groups}
    out = []
    for b in raw:
        if not isinstance(b, dict) or set(b) != set(_BRANCH_KEYS) or not isinstance(b["group"], str) or \
                not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for k, v in b.items() if k != "group"):
            raise fail(f"each branch must be {{'group': str, 'empty'/'identity'/'constant': [module names]}}, got {b!r:.120}")
        group = groups.get(b["group"])
        if group is None:
            raise fail(f"group {b['group']!r} is not a group of this model")
        if b["group"] in plan.groups:
            raise fail(f"group {b['group']!r} is both cut out and partly kept")
        want = find_branch(model, graph, group)
        if want is None or any(sorted(b[k]) != sorted(getattr(want, k)) for k in _BRANCH_KEYS[1:]):
            raise fail(f"the modules listed for group {b['group']!r} are not the branch this model's graph gives it")
        out.append(want)
    return out


def _check_legacy(model: nn.Module, graph: Graph, plan: Any, entry: Any) -> list[Branch]:
    # Plans written before meta["replay"] kept {"branches": [...], "silent": [...]} under meta["gator"].
    if isinstance(entry, dict):
        silent = entry.get("silent", [])
        if not isinstance(silent, list) or not all(isinstance(s, str) for s in silent):
            raise CheckpointError("plan's meta 'gator' entry has a malformed 'silent' list; re-export the plan")
    return check_branch_entry(model, graph, plan, entry, allowed=("branches", "silent"))


def _merge_cuts(earlier: Any, later: Any) -> dict[str, list]:
    """The entry of two composed plans that both cut branches: the earlier cuts, then the later."""
    lists = [entry.get("branches") if isinstance(entry, dict) else None for entry in (earlier, later)]
    if not all(isinstance(b, list) for b in lists):
        raise CheckpointError("plan's branch cuts are invalid: each entry must be {'branches': [...]}; "
                              "re-export the plan with prunekit")
    return {"branches": lists[0] + lists[1]}


def _register() -> None:
    from .plan import register_replay_step

    register_replay_step("cut_branches", cut_branches_, check_branch_entry, merge=_merge_cuts)
    register_replay_step("gator", cut_branches_, _check_legacy)


_register()
