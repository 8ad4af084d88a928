"""From a traced model to `Group`s: the sets of channels that must be pruned together.

After tracing, every parameter slice carries a channel id and the union-find says which ids are
the same channel. A *group* is a connected set of producer spaces (a conv's filters, a residual
stream fed by many convs, a layer-scale vector...) and its channels are the union-find classes
inside it. Pruning channel i of a group deletes, from every member, the positions whose class
is that channel — conv filters, BN entries, the next conv's input slices, the H*W columns of a
Linear after flatten, and so on.

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
>>> g = build_graph(m, torch.randn(1, 3, 8, 8)).group("0")
>>> g.size, [(mb.qualname, mb.dim, int((mb.channel == 0).sum())) for mb in g.members]
(8, [('0.weight', 0, 1), ('0.bias', 0, 1), ('3.weight', 1, 36)])
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from ..core.config import check_names
from ..core.errors import ConfigError
from ..core.modes import kept_renormed_embeddings, scoring
from ..core.modules import require_module
from .ids import UnionFind
from .inputs import check_inputs_fit, samples_of, split_inputs
from .rules import builtin_rule_names, rule_table
from .trace import Member, Node, Tracer, tensor_qualname, tensors_in


@dataclass
class GroupMember:
    """A member restricted to one group: `channel[j]` is the group channel at position j, or -1."""

    module: str
    name: str
    dim: int
    channel: torch.Tensor
    role: str

    @property
    def qualname(self) -> str:
        return tensor_qualname(self.module, self.name)


@dataclass
class Group:
    name: str
    classes: torch.Tensor  # (size,) union-find root of each channel
    prunable: torch.Tensor  # (size,) bool: False where the channel reaches an input/output/fixed op
    members: list[GroupMember] = field(default_factory=list)
    note: str = ""  # why the group is not prunable, when a probe found out
    # True when every op its channels meet has an exact rule of prunekit's own: removing them then
    # provably equals zeroing them, and probing may skip the group (see surgery.verify)
    proven: bool = True

    @property
    def size(self) -> int:
        return self.classes.numel()

    def tensor_members(self) -> list[GroupMember]:
        """Members that slice a real tensor (not counted attributes)."""
        return [m for m in self.members if not m.name.startswith("#")]

    def __repr__(self) -> str:
        return f"Group({self.name!r}, size={self.size}, prunable={int(self.prunable.sum())}, members={len(self.members)})"


@dataclass
class Graph:
    """The traced model: its groups, raw members (ids = class roots) and ops."""

    groups: list[Group]
    members: list[Member]
    nodes: list[Node]
    batch: int
    input_shapes: list[list[int]]
    # whether a training-mode forward ran modules the eval-mode one did not, and was traced too
    training_traced: bool = False

    _by_name: dict[str, Group] = field(default_factory=dict, repr=False, compare=False)
    _ids: tuple | None = field(default=None, repr=False, compare=False)  # (id tensors, member_ids())

    def group(self, name: str) -> Group:
        g = self._by_name.get(name)
        if g is None or g.name != name:  # first call, or names changed since: index again
            self._by_name = {g.name: g for g in reversed(self.groups)}  # the first of a name wins
            g = self._by_name.get(name)
        if g is not None:
            return g
        raise ConfigError(f"no group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if bool(g.prunable.any())]

    def why_nothing_prunable(self) -> str:
        """Why no channel can be removed, or "" when some group is prunable."""
        if self.prunable_groups():
            return ""
        found = sorted({g.note for g in self.groups if g.note})
        return (f"none of the model's {len(self.groups)} channel groups can change width (their channels reach "
                "the input or output, ignored layers, or ops that keep their channels, such as SSC layers"
                + ("; " + "; ".join(found[:3]) if found else "") + ")")

    def member_ids(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Every member's ids end to end, and how many each member has (for one-pass lookups).
        Computed once per graph (a reused graph asks for it at every pruning); recomputed when a
        member or its id tensor was replaced since."""
        tensors = [m.ids for m in self.members]
        if self._ids is None or len(self._ids[0]) != len(tensors) or any(a is not b for a, b in zip(self._ids[0], tensors)):
            flat, sizes = _end_to_end(self.members)
            flat.flags.writeable = False  # shared by every caller
            self._ids = (tensors, (flat, tuple(sizes)))
        return self._ids[1]


def _end_to_end(members: list[Member]) -> tuple[np.ndarray, list[int]]:
    sizes = [m.ids.numel() for m in members]
    if not sizes:
        return np.zeros(0, dtype=np.int64), sizes
    return np.concatenate([m.ids.numpy().reshape(-1) for m in members]), sizes


def check_ignore(model: nn.Module, ignore: Iterable[str]) -> dict[str, nn.Module]:
    """ConfigError unless every name in `ignore` is a module of `model`; returns the model's
    modules by name."""
    names = dict(model.named_modules())
    missing = [n for n in ignore if n not in names]
    if missing:
        raise ConfigError(f"ignore names modules that do not exist: {missing}; "
                          f"use names from model.named_modules(), e.g. {list(names)[1:4]}")
    return names


def build_graph(model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> Graph:
    """Trace `model` on `example_inputs` (a tensor, a tuple of tensors, or a dict of kwargs)."""
    require_module(model)
    # any iterable of names, but not a bare name: 'conv1' would be the names 'c', 'o', 'n', ...
    check_names("ignore", ignore if isinstance(ignore, str) else list(ignore))
    ignore = list(ignore)
    names = check_ignore(model, ignore)
    args, kwargs = split_inputs(example_inputs)
    tracer = Tracer(model, rule_table(), ignore, names)
    tracer.builtin_rules = builtin_rule_names()
    training = [mod for mod in names.values() if mod.training]
    entered: set[str] = set()  # the modules the eval-mode forward runs
    handles = _name_scopes(tracer, {id(mod): name for name, mod in names.items()}, entered)
    for mod in training:  # eval mode while tracing; each module's own mode is restored after
        mod.training = False
    failure: Exception | None = None
    try:
        inputs = tensors_in((args, kwargs))
        try:
            with torch.no_grad(), kept_renormed_embeddings(model):  # max_norm rescales rows in place
                out = _traced_forward(tracer, model, args, kwargs, inputs)
        except Exception as err:
            failure = err
            raise
        _fix_outputs(tracer, out)
        if _idle_layers(names, entered) and _runs_more_in_training(model, args, kwargs, entered):
            _trace_training_pass(tracer, model, args, kwargs, inputs)
    finally:
        for h in handles:
            h.remove()
        try:  # still in eval mode, without the tracer's hooks: a plain forward tells wrong inputs apart
            if failure is not None:
                check_inputs_fit(model, args, kwargs, failure)
        finally:
            for mod in training:
                mod.training = True
    batch = samples_of(inputs, tracer.sequence_shape)
    return _finish(tracer, batch, [list(t.shape) for t in inputs])


def _idle_layers(modules: dict[str, nn.Module], entered: set[str]) -> bool:
    """Whether a module holding parameters or buffers did not run in the eval-mode forward: only
    then can a training-mode forward run a layer the trace has not seen (it costs a forward to look)."""
    return any(name not in entered and (mod._parameters or mod._buffers) for name, mod in modules.items())


def _runs_more_in_training(model: nn.Module, args: tuple, kwargs: dict, entered: set[str]) -> bool:
    """Whether a training-mode forward runs modules the eval-mode one did not (an auxiliary head,
    as GoogLeNet's): one plain forward, whose modules the scope hooks add to `entered`; BatchNorm
    statistics, random state and modes are left as they were. A model that cannot run in training
    mode on these inputs (BatchNorm on one sample, a detector wanting targets) is taken as not."""
    before = len(entered)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), scoring(model, "train"):
            model(*args, **kwargs)
    except Exception:  # noqa: BLE001 - no training-mode forward to compare with
        return False
    return len(entered) > before


def _trace_training_pass(tracer: Tracer, model: nn.Module, args: tuple, kwargs: dict, inputs: list) -> None:
    """Trace the training-mode forward into the same tracer: every parameter it uses again joins
    its eval-mode positions (as a layer called twice), so the layers only training runs are
    pruned with the channels they read. Its MACs are left out: they are no part of inference."""
    n_nodes, tracer.training_pass_start = len(tracer.nodes), len(tracer.members)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), scoring(model, "train"):
        out = _traced_forward(tracer, model, args, kwargs, inputs)
    _fix_outputs(tracer, out)
    del tracer.nodes[n_nodes:]


def _traced_forward(tracer: Tracer, model: nn.Module, args: tuple, kwargs: dict, inputs: list) -> Any:
    """The model's output, its forward run under `tracer`; model inputs are opaque (their channels fixed)."""
    with tracer:
        tracer.busy = True  # setting up: nothing here is the model's own call
        for t in inputs:
            tracer.set_opaque(t)
        tracer.busy = False
        out = model(*args, **kwargs)
        tracer.busy = True
    return out


def _fix_outputs(tracer: Tracer, out: Any) -> None:
    """Apply the queued rules (outside the mode: their own torch calls are not intercepted), then
    fix the channels of the model's outputs."""
    tracer.flush()
    for t in tensors_in(out):
        tracer.uf.mark_fixed(tracer.ids(t))


def _name_scopes(tracer: Tracer, name_of: dict[int, str], entered: set[str] | None = None) -> list:
    """Keep `tracer`'s module stack in step with the forward: two process-wide hooks (cheaper than
    two per module) that act only on this thread. A module outside the model (built in forward)
    takes the name of the module that calls it. `entered` collects the names of the modules run."""
    thread = threading.get_ident()

    def enter(mod, args):
        if threading.get_ident() == thread:
            tracer.push(name_of.get(id(mod), tracer.current))
            if entered is not None and id(mod) in name_of:
                entered.add(name_of[id(mod)])

    def leave(mod, args, out):
        if threading.get_ident() == thread:
            tracer.pop()
    return [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]


def _finish(tr: Tracer, batch: int, input_shapes: list[list[int]]) -> Graph:
    uf = tr.uf
    _join_shared(tr)
    start = tr.training_pass_start
    if start is not None:  # joined above: a tensor the eval pass also used is listed once, as there
        first = {(m.module, m.name, m.dim, m.role) for m in tr.members[:start]}
        tr.members[start:] = [m for m in tr.members[start:] if (m.module, m.name, m.dim, m.role) not in first]
    table = uf.roots() if len(uf) else np.zeros(1, np.int64)  # id -> class root; ids < 0 stay as they are
    root = lambda a: np.where(a >= 0, table[np.maximum(a, 0)], a)
    ids, sizes = _end_to_end(tr.members)
    flat = root(ids)
    for m, part in zip(tr.members, torch.from_numpy(flat).split(sizes)):
        m.ids = part  # member ids are flat (Tracer.add_member)
    for node in tr.nodes:
        node.terms = [(macs, [torch.from_numpy(root(ids.numpy())) for ids in idss]) for macs, idss in node.terms]
    # groups: connected components of producer spaces that share a class (space ids are all valid)
    space_roots = [table[ids.numpy()] for _, ids in tr.spaces]
    specs = []
    nonempty = [r for r in space_roots if r.size]
    if nonempty:
        comp = UnionFind()
        comp.allocate(len(uf))
        roots = np.concatenate(space_roots)
        comp.union_pairs(np.repeat([r[0] for r in nonempty], [r.size for r in nonempty]), roots)
        comps = comp.roots()[roots]
        space_of = np.repeat(np.arange(len(space_roots)), [r.size for r in space_roots])
        # component -> its classes in order of first appearance, named after its first space
        _, first = np.unique(roots, return_index=True)
        first.sort()
        cls_comp = comps[first]
        comp_ids, comp_first, comp_of = np.unique(cls_comp, return_index=True, return_inverse=True)
        rank = np.empty(comp_ids.size, dtype=np.int64)
        rank[np.argsort(comp_first)] = np.arange(comp_ids.size)  # components in order of appearance
        order = np.argsort(rank[comp_of], kind="stable")
        bounds = np.cumsum(np.bincount(rank[comp_of], minlength=comp_ids.size))[:-1]
        for classes in np.split(first[order], bounds):
            specs.append((tr.spaces[space_of[classes[0]]][0], roots[classes]))
    groups = _make_groups(specs, uf, tr.members, flat, sizes)
    if tr.unproven_ids:  # classes that met an op the rules cannot vouch for
        seen = np.concatenate([ids.numpy().reshape(-1) for ids in tr.unproven_ids])
        unproven = np.unique(root(seen[seen >= 0]))
        for g in groups:
            g.proven = not bool(np.isin(g.classes.numpy(), unproven).any())
    _unique_names(groups)
    return Graph(groups, tr.members, tr.nodes, batch, input_shapes, tr.training_pass_start is not None)


def _join_shared(tr: Tracer) -> None:
    """A tensor used twice (shared weights) has one set of positions: join its ids pairwise."""
    first: dict[tuple[str, str, int], torch.Tensor] = {}
    for m in tr.members:
        key = (m.module, m.name, m.dim)
        if key in first and first[key].numel() == m.ids.numel():
            tr.uf.union_pairs(first[key], m.ids)
        first.setdefault(key, m.ids)


def _make_groups(specs: list[tuple[str, np.ndarray]], uf: UnionFind, members: list[Member],
                 roots: np.ndarray, sizes: list[int]) -> list[Group]:
    """One Group per (owner name, classes); each member is split among the groups its ids reach.
    `roots` holds every member's class roots end to end (`sizes[i]` of them for member i)."""
    group_of = np.full(max(len(uf), 1), -1, dtype=np.int64)  # class -> group index (never empty:
    position = np.full(max(len(uf), 1), -1, dtype=np.int64)  # members may hold only -1/-2 ids)
    groups = []
    for gi, (name, classes) in enumerate(specs):
        group_of[classes], position[classes] = gi, np.arange(len(classes))
    all_classes = torch.from_numpy(np.concatenate([c for _, c in specs])) if specs else torch.zeros(0, dtype=torch.long)
    prunable = ~uf.is_fixed(all_classes)
    at = 0
    for name, classes in specs:
        n = len(classes)
        groups.append(Group(name.removesuffix(".weight"), all_classes[at:at + n], prunable[at:at + n]))
        at += n
    if not members:
        return groups
    # look every member's ids up in one pass, then cut the result back into members
    safe = np.maximum(roots, 0)
    gis = np.where(roots >= 0, group_of[safe], -1)
    pos = np.where(roots >= 0, position[safe], -1)
    starts = np.cumsum([0] + sizes[:-1])
    nonempty = np.array(sizes) > 0
    lo, hi = np.full(len(members), -1), np.full(len(members), -1)
    if nonempty.any():  # per-member min/max group index, in one pass
        lo[nonempty] = np.minimum.reduceat(gis, starts[nonempty])
        hi[nonempty] = np.maximum.reduceat(gis, starts[nonempty])
    chans = torch.from_numpy(pos).split(sizes)
    for m, g_lo, g_hi, start, size, chan in zip(members, lo.tolist(), hi.tolist(), starts.tolist(), sizes, chans):
        if g_hi < 0:
            continue  # reaches no group
        if g_lo == g_hi:  # the common case: one group, no gaps
            groups[g_lo].members.append(GroupMember(m.module, m.name, m.dim, chan, m.role))
            continue
        # a member spanning several groups (a conv reading a concatenation): one row per group
        g, p = gis[start:start + size], pos[start:start + size]
        at = np.flatnonzero(g >= 0)
        gi_of, row_of = np.unique(g[at], return_inverse=True)
        rows = np.full((gi_of.size, size), -1, dtype=np.int64)
        rows[row_of, at] = p[at]
        for gi, row in zip(gi_of.tolist(), torch.from_numpy(rows).unbind(0)):
            groups[gi].members.append(GroupMember(m.module, m.name, m.dim, row, m.role))
    return groups


def _unique_names(groups: list[Group]) -> None:
    count: dict[str, int] = {}
    for g in groups:
        count[g.name] = count.get(g.name, 0) + 1
        if count[g.name] > 1:
            g.name = f"{g.name}#{count[g.name]}"
