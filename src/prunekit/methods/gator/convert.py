"""Hard gates -> a physically smaller model that computes exactly what the gated model computes.

`convert_` reads the frozen gates (`GateSet.freeze`), then on a copy of the model:

1. groups with some channels closed: those channels are removed (`remove_channels_`);
2. groups with every channel closed: their branch is cut out (surgery/branches.py); where the group has
   no clean branch shape, or where removing the closed channels would leave a layer with none
   (the group's other channels cannot be pruned), one channel stays, with its consumer input slices
   zeroed, so it contributes nothing (exactly like its closed gate);
3. the copy's output is compared with the gated model's (eval mode) on the example inputs.
   If cutting branches broke the equality or the forward (an op the branch test did not
   foresee, e.g. a max pooling that cannot take 0 channels), the conversion is redone keeping
   one silent channel per closed group; if it still differs, PruningError. Only then does the
   caller's model change.

The returned Plan keeps channels per group (replayable with `apply_plan_`) and lists the cut
branches in plan.meta["replay"]["cut_branches"]; `apply_plan_` / `load_pruned` replay both (the
branch cuts are the core's replay step, surgery/branches.py). plan.meta["gator"]["silent"] names
the groups kept at one silent channel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ...core.errors import PruningError
from ...graph import Graph, Group
from ...layers.gates import GateSet
from ...surgery.branches import Branch, cut_branches_, find_branch
from ...surgery.copying import adopt_, share_copy
from ...surgery.plan import Plan, make_plan
from ...surgery.shrink import remove_channels_
from ...surgery.verify import first_tensor, run_model, zero_contributions_

KEPT_ALONE = "every gate closed, but the output would no longer depend on the input"
KEPT_TOGETHER = ("every gate closed, and together with the other closed groups ({}) the output would no longer "
                 "depend on the input")
KEPT_WITH_PARTLY_CLOSED = ("every gate closed, and with the channels closed in the other groups the output would no "
                           "longer depend on the input")


@dataclass
class Conversion:
    plan: Plan
    branches: list[Branch] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # closed groups kept at one zero-contribution channel
    max_abs_diff: float = 0.0
    removed: dict[str, int] = field(default_factory=dict)  # group -> channels removed

    def summary(self) -> dict[str, Any]:
        return {"branches": [b.to_dict() for b in self.branches], "silent": self.silent,
                "max_abs_diff": self.max_abs_diff, "removed": self.removed}


def convert_(model: nn.Module, gates: GateSet, graph: Graph, example_inputs: Any, ignore: Sequence[str] = (),
             atol: float = 1e-5) -> Conversion:
    """Remove every channel whose frozen gate is closed from `model` (in place); see module doc."""
    if gates.frozen is None:
        gates.freeze(gates.hard_open())
    gates.attach(model)
    try:
        reference = first_tensor(run_model(model, example_inputs))
    finally:
        gates.detach()
    scale = max(1.0, float(reference.abs().max()))
    for allow_branches in (True, False):
        work = share_copy(model)  # conversion only assigns new tensors: sharing the rest is safe
        result = _convert(work, gates, graph, example_inputs, ignore, allow_branches)
        try:
            out = first_tensor(run_model(work, example_inputs))
        except (RuntimeError, ValueError, TypeError):
            if not result.branches:
                raise
            out = None  # an op that cannot take the 0 channels of a cut branch (e.g. max pooling)
        fits = out is not None and out.shape == reference.shape
        diff = float((out - reference).abs().max()) if fits else float("inf")
        result.max_abs_diff = diff
        if diff <= atol * scale:
            result.plan.stamp(dense=model, pruned=work)
            adopt_(model, work)
            return result
        if not result.branches:
            break
    raise PruningError(f"the converted model differs from the gated one by {diff:.3g} on the example inputs; "
                       "keep the offending modules out with ignore=[...]")


def _convert(work: nn.Module, gates: GateSet, graph: Graph, example_inputs: Any, ignore: Sequence[str],
             allow_branches: bool) -> Conversion:
    opens = [f.cpu() for f in gates.frozen]
    by_name = {g.name: g for g in graph.groups}
    removal: dict[str, list[int]] = {}
    branches, silent = [], []
    for i, name in enumerate(gates.names):
        group = by_name[name]
        closed = (~opens[i]).nonzero().flatten().tolist()
        if not closed:
            continue
        if len(closed) < group.size and not _empties_a_tensor(group, closed):
            removal[name] = closed
            continue
        branch = find_branch(work, graph, group) if allow_branches and len(closed) == group.size else None
        if branch is not None:
            branches.append(branch)
            continue
        logits = gates.logits[i].detach().cpu()
        keep = max(closed, key=lambda c: float(logits[c]))
        zero_contributions_(work, group, [keep])
        removal[name] = [c for c in closed if c != keep]
        silent.append(name)
    plan = make_plan(graph, removal, example_inputs, ignore)
    remove_channels_(work, graph, removal)
    cut_branches_(work, branches)
    plan.meta["replay"] = {"cut_branches": {"branches": [b.to_dict() for b in branches]}}
    plan.meta["gator"] = {"silent": silent}
    removed = {n: len(v) for n, v in removal.items()}
    removed.update({b.group: by_name[b.group].size for b in branches})
    return Conversion(plan, branches, silent, removed=removed)


def keep_output_connected(model: nn.Module, gates: GateSet, masks: list[torch.Tensor], example_inputs: Any,
                          seed: int = 0) -> tuple[list[torch.Tensor], dict[str, str]]:
    """`masks` in which no fully closed group cuts the output off the input, and why each group
    that had to stay open did (group -> reason).

    A fully closed group is cut out as a branch (or kept silent): right for a ResNet block's inner
    group, whose shortcut still carries the input, but on a chain (or a stage's residual stream)
    every path from the input runs through it, and the pruned network computes a constant. Such a
    group keeps its strongest channel (highest logit), in the masks the gated model is frozen on,
    so that the conversion stays exact.

    The test is functional, on the gated model itself (attached here if it is not): with hard gates, a closed channel is
    multiplied by exactly 0 at every consumer, so a disconnected output is bit-for-bit the same
    for any two inputs, while a connected one differs. Two random inputs shaped like the example
    (integer inputs drawn within the example's range) decide it in two forwards, exactly for the
    gates' semantics whatever ops the tracer's groups leave implicit (adds, concats, functional
    calls), which a reachability walk over the traced graph would have to model op by op (a
    relative 1e-6 absorbs kernels that are not bit-for-bit deterministic on an accelerator). Each
    fully closed group is first tested alone (every other gate open); closures that disconnect
    only together (the two branches of a concat) are then broken by reopening, highest logit
    first, the group whose reopening restores the dependence. Nothing changes when the dense
    model's output does not vary with those inputs.
    """
    closed = [i for i, m in enumerate(masks) if not bool(m.any())]
    if not closed:
        return masks, {}
    pair = [_random_like(example_inputs, seed + k) for k in range(2)]
    frozen, attached = gates.frozen, gates.attached
    if not attached:
        gates.attach(model)
    try:
        return _reopen_disconnecting(model, gates, masks, closed, pair)
    finally:
        gates.frozen = frozen
        if not attached:
            gates.detach()


def _reopen_disconnecting(model: nn.Module, gates: GateSet, masks: list[torch.Tensor], closed: list[int],
                          pair: list[Any]) -> tuple[list[torch.Tensor], dict[str, str]]:
    full = [torch.ones_like(m) for m in masks]
    varies = lambda ms: _output_varies(model, gates, ms, pair)
    if not varies(full):
        return masks, {}
    masks, kept = [m.clone() for m in masks], {}
    strongest = lambda i: float(gates.logits[i].detach().max())
    for i in closed:
        if not varies([torch.zeros_like(m) if j == i else m for j, m in enumerate(full)]):
            masks[i] = _with_strongest_open(gates, i, masks[i])
            kept[gates.names[i]] = KEPT_ALONE
    rest = sorted((i for i in closed if not bool(masks[i].any())), key=strongest, reverse=True)
    while rest and not varies(masks):
        reopened = lambda i: [_with_strongest_open(gates, i, m) if j == i else m for j, m in enumerate(masks)]
        pick = next((i for i in rest if varies(reopened(i))), rest[0])
        rest.remove(pick)
        masks = reopened(pick)
        others = [gates.names[i] for i in closed if i != pick and not bool(masks[i].any())]
        kept[gates.names[pick]] = KEPT_TOGETHER.format(", ".join(others)) if others else KEPT_WITH_PARTLY_CLOSED
    return masks, kept


def _with_strongest_open(gates: GateSet, i: int, mask: torch.Tensor) -> torch.Tensor:
    logits = gates.logits[i].detach().cpu().masked_fill(~gates.prunable(i).cpu(), -float("inf"))
    out = mask.clone()
    out[int(logits.argmax())] = True
    return out


def _output_varies(model: nn.Module, gates: GateSet, masks: list[torch.Tensor], pair: list[Any]) -> bool:
    """Whether the gated model (gates frozen on `masks`, attached) gives different outputs for the pair."""
    gates.freeze(masks)
    a, b = (first_tensor(run_model(model, x)) for x in pair)
    if a.shape != b.shape:
        return True
    if not a.numel():
        return False
    a, b = a.double(), b.double()
    return bool(((a - b).abs() > 1e-6 * max(1.0, float(a.abs().max()))).any())


def _random_like(inputs: Any, seed: int) -> Any:
    """Inputs of the example's shapes, dtypes and devices: normal floats, integers within the
    example's range; other values (and boolean masks) as they are."""
    gen = torch.Generator().manual_seed(seed)

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or not t.numel():
            return t
        if t.is_floating_point() or t.is_complex():
            return torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
        lo, hi = int(t.min()), int(t.max())
        return torch.randint(lo, hi + 1, t.shape, generator=gen).to(t.device, t.dtype)

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(one(t) for t in inputs)
    return one(inputs)


def _empties_a_tensor(group: Group, closed: list[int]) -> bool:
    """Whether removing `closed` would leave a member tensor of `group` without any channel (every
    prunable channel closed in a group that also holds fixed ones, e.g. zero-padded shortcuts)."""
    gone = torch.zeros(group.size, dtype=torch.bool)
    gone[closed] = True
    return any(bool((m.channel >= 0).all()) and bool(gone[m.channel].all()) for m in group.tensor_members())


def closed_fraction(opens: list[torch.Tensor]) -> float:
    """Share of gated channels closed (for reports)."""
    total = sum(o.numel() for o in opens)
    return sum(int((~o).sum()) for o in opens) / max(total, 1)
