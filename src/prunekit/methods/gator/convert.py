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
