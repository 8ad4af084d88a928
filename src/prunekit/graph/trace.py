"""Trace a model into a `Graph`: which parameter slices belong to which channels.

Technique: the model runs *eagerly* on example inputs under a `TorchFunctionMode`, which sees
every torch function call (F.conv2d, torch.cat, Tensor.view, ...) with its real arguments.
Because the model really runs, Python control flow in `forward` (loops, ifs on shapes or
flags, early exits) just works: we record the path taken for these inputs. Each tensor gets a
channel-id tensor (see `ids.py`); a per-op rule (see `rules.py`) says how ids flow from inputs to
outputs and which parameter slices they touch. docs/tracing.md explains why this beats
torch.fx (fails on data-dependent control flow) and the autograd walk (loses op arguments).

>>> import torch.nn as nn
>>> from prunekit.graph import build_graph
>>> g = build_graph(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)),
...                 torch.randn(1, 3, 8, 8))
>>> [(grp.name, grp.size) for grp in g.groups]
[('0', 8), ('2', 4)]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.errors import UnsupportedOpError
from .ids import NO_ID, OPAQUE, UnionFind, along, compress, has_ids


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors inside nested tuples (named ones too), lists and dicts, in order. Called on
    every op's arguments while tracing, where torch's general pytree walk is several times slower."""
    found: list[torch.Tensor] = []
    _collect(obj, found)
    return found


def _collect(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (tuple, list, dict)):
                _collect(item, found)
    elif isinstance(obj, dict):
        _collect(tuple(obj.values()), found)


@dataclass
class Member:
    """A slice of a parameter/buffer (or a counted module attribute) that follows channels.

    `ids[j]` is the channel id of position j along `dim` of `module.<name>`; role is "out"
    (producer filters), "in" (a consumer's input slices) or "through" (norm/scale parameters).
    A member whose name starts with "#" is an attribute with no tensor (e.g. an affine-free
    GroupNorm's num_channels): nothing is sliced, the count is kept in step.
    """

    module: str
    name: str
    dim: int
    ids: torch.Tensor
    role: str

    @property
    def qualname(self) -> str:
        return tensor_qualname(self.module, self.name)


def tensor_qualname(module: str, name: str) -> str:
    """"<module>.<name>", or `name` for a tensor of the model itself (module "")."""
    return f"{module}.{name}" if module else name


@dataclass
class Node:
    """One traced operation, kept for cost counting and debugging."""

    op: str
    module: str
    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    macs: int = 0
    params: list[str] = field(default_factory=list)
    # parameter-free products: (macs, [id tensors]); each term scales by the kept fraction of
    # every id tensor in it (used by cost.macs.estimate_cost, ids are class roots after tracing)
    terms: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)


@dataclass
class Call:
    """What a rule sees: the op name, its arguments, result and the calling module."""

    name: str
    func: Callable
    args: tuple
    kwargs: dict
    out: Any
    module: str
    inputs: list[torch.Tensor] = field(default_factory=list)  # tensors among args and kwargs

    def arg(self, i: int, key: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        if key not in self.kwargs and _ALIASES.get(key) in self.kwargs:  # x.softmax(axis=1)
            return self.kwargs[_ALIASES[key]]
        return self.kwargs.get(key, default)


# torch takes numpy's names too: x.sum(axis=1, keepdims=True) is x.sum(dim=1, keepdim=True)
_ALIASES = {"dim": "axis", "keepdim": "keepdims"}


class Tracer(TorchFunctionMode):
    """Runs the model and applies channel rules; see `build_graph` for the public entry."""

    def __init__(self, model: nn.Module, rules: dict[str, Callable], ignore: Iterable[str] = (),
                 modules: dict[str, nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.rules = rules
        self.uf = UnionFind()
        self.members: list[Member] = []
        self.nodes: list[Node] = []
        self.spaces: list[tuple[str, torch.Tensor]] = []  # (owner name, ids) in allocation order
        self.ignore = tuple(ignore)
        self._ids: dict[int, torch.Tensor] = {}
        self._alive: list[torch.Tensor] = []  # keeps traced tensors alive so id() is not reused
        self._stack: list[str] = [""]
        self._ignored_depth = 0  # how many modules on the stack are ignored
        self._types: dict[str, str] = {}
        self._torch_layers: set[str] = set()  # modules whose class is torch.nn's own
        self._tensor_names: dict[int, tuple[str, str]] = {}
        for mod_name, mod in (modules if modules is not None else dict(model.named_modules())).items():
            self._types[mod_name] = type(mod).__name__
            if type(mod).__module__.startswith("torch.nn.") and not isinstance(mod, nn.ModuleList | nn.ModuleDict
                                                                               | nn.Sequential):
                self._torch_layers.add(mod_name)
            for pname, p in [*mod._parameters.items(), *mod._buffers.items()]:
                if p is not None:
                    self._tensor_names.setdefault(id(p), (mod_name, pname))
        self._raw: dict[int, torch.Tensor] = {}
        self._opaque_shapes: dict[int, tuple[int, ...]] = {}
        self.busy = False  # true while our own bookkeeping runs torch ops: do not trace those
        self.queue: list[tuple[Call, list[torch.Tensor], int]] = []  # calls whose rules have not run
        # ids of channels that met an op whose effect the rules cannot vouch for (see `unproven`)
        self.unproven_ids: list[torch.Tensor] = []
        self.read_sizes: dict[int, list[torch.Tensor]] = {}  # size -> ids of channel dims read with it
        self.builtin_rules: set[str] = set()  # names whose rule is prunekit's own (set by build_graph)
        # (length, batch) of the first sequence op (attention, RNN): it tells a sequence-first
        # input (L, N, ...) from a batch-first one (`graph.inputs.samples_of`)
        self.sequence_shape: tuple[int, int] | None = None
        self.training_pass_start: int | None = None  # members from here on came from the training-mode pass

    # ---- ids of tensors -------------------------------------------------------------------
    def ids(self, t: Any) -> torch.Tensor | None:
        """Id tensor of `t` (compressed), or None for non-tensors."""
        if not isinstance(t, torch.Tensor):
            return None
        got = self._ids.get(id(t))
        if got is not None:
            return got
        if id(t) in self._tensor_names:
            return self._raw_param_ids(t)
        if t.numel() <= 1:  # a scalar broadcasts everywhere: it couples nothing
            return torch.full([1] * t.dim(), NO_ID, dtype=torch.long)
        # a tensor made inside forward with a shape fixed in code: its channels cannot move
        self.set_opaque(t)
        return self._ids[id(t)]

    def set_opaque(self, t: torch.Tensor) -> None:
        self._ids[id(t)] = torch.full([1] * t.dim(), OPAQUE, dtype=torch.long)
        self._opaque_shapes[id(t)] = tuple(t.shape)
        self._alive.append(t)

    def opaque_shape(self, t: torch.Tensor) -> tuple[int, ...] | None:
        """Shape of `t` if its ids are OPAQUE (fixed, compressed to one value), else None."""
        return self._opaque_shapes.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_ids(self, t: torch.Tensor, ids: torch.Tensor) -> None:
        if ids.dim() != t.dim():
            raise AssertionError(f"id tensor rank {ids.dim()} != tensor rank {t.dim()}")
        ids = compress(ids)
        if ids.numel() == 1 and int(ids.reshape(-1)[0]) == OPAQUE:
            return self.set_opaque(t)
        self._opaque_shapes.pop(id(t), None)
        self._ids[id(t)] = ids
        self._alive.append(t)

    def new_space(self, owner: str, n: int, fixed: bool = False) -> torch.Tensor:
        ids = self.uf.allocate(n, fixed=fixed)
        self.spaces.append((owner, ids))
        return ids

    def tensor_name(self, t: Any) -> tuple[str, str] | None:
        return self._tensor_names.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _raw_param_ids(self, p: torch.Tensor) -> torch.Tensor:
        """A parameter used directly in forward (layer scale, position embedding, class token).

        Its channel dim is its only dim of size > 1, or its last dim; it becomes a "through"
        member whose ids join whatever it is combined with elementwise.
        """
        if id(p) not in self._raw:
            mod, name = self._tensor_names[id(p)]
            big = [d for d in range(p.dim()) if p.shape[d] > 1]
            if not big:
                return torch.full([1] * p.dim(), NO_ID, dtype=torch.long)
            dim = big[0] if len(big) == 1 else p.dim() - 1
            # an integer or bool tensor holds values (positions, token ids), not channels: its
            # entries are never removed (torchvision's relative_position_index buffers)
            vec = self.new_space(tensor_qualname(mod, name), p.shape[dim], fixed=not p.is_floating_point())
            self.add_member(mod, name, dim, vec, "through")
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            self._raw[id(p)] = vec.reshape(shape)
        return self._raw[id(p)]

    def add_member(self, module: str, name: str, dim: int, ids: torch.Tensor, role: str) -> None:
        self.members.append(Member(module, name, dim, ids.reshape(-1), role))  # id tensors are never written to

    def add_node(self, call: Call, macs: int = 0, params: Iterable[str] = (),
                 terms: Iterable[tuple[int, list[torch.Tensor]]] = ()) -> None:
        self.nodes.append(Node(call.name, call.module, [tuple(x.shape) for x in call.inputs],
                               [tuple(x.shape) for x in tensors_in(call.out)], int(macs), list(params),
                               [(int(m), [t.clone() for t in ids]) for m, ids in terms]))

    # ---- the mode ----------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        name = op_name(func)
        if name in RESHAPE_IN_PLACE:
            self.flush()  # the queued calls must see their tensors' shapes before this op changes them
            return self._reshape_in_place(func, name, args, kwargs)
        out = func(*args, **kwargs)
        outs = [args[0]] if name == "__setitem__" else tensors_in(out)
        if outs or name in SIZE_READS:
            args, kwargs = _positional(_frozen(args), _frozen(kwargs))  # lists the model appends to later (DenseNet)
            self.queue.append((Call(name, func, args, kwargs, out, self._stack[-1], tensors_in((args, kwargs))),
                               outs, self._ignored_depth))
        return out

    def _reshape_in_place(self, func, name: str, args: tuple, kwargs: dict) -> Any:
        """x.unsqueeze_(0) & co: the ids follow by the same op on a full-size copy, made before
        the tensor changes shape; resize_/set_/as_strided_ make it opaque and fix its channels."""
        x = args[0]
        ids = self.ids(x) if isinstance(x, torch.Tensor) else None
        if ids is not None and name in REPLAYED_IN_PLACE:
            ids = ids.expand(x.shape).clone()  # own memory: the op rewrites it
            func(ids, *args[1:], **kwargs)
        out = func(*args, **kwargs)
        if ids is None:
            return out
        if name in REPLAYED_IN_PLACE and not self._ignored_depth:
            self.set_ids(x, ids)
        else:
            self.uf.mark_fixed(self.ids(x))
            self.set_opaque(x)
        return out

    def flush(self) -> None:
        """Apply the rules of the queued calls, in order. Rules run after the forward (or before an
        op that reshapes a tensor in place): away from the model's own kernels, the bookkeeping
        runs about twice as fast."""
        busy, self.busy = self.busy, True
        try:
            for call, outs, ignored in self.queue:
                self._apply_rule(call, outs, ignored)
        finally:
            self.queue.clear()
            self.busy = busy

    def _apply_rule(self, call: Call, outs: list[torch.Tensor], ignored: int = 0) -> None:
        inputs = call.inputs
        if call.name in SIZE_READS:
            return self._note_sizes(call)
        if ignored:
            return self._apply_ignored(call, outs)
        rule = self.rules.get(call.name)
        if rule is not None:
            odd = unproven(call, self)
            if call.name not in self.builtin_rules or odd:
                self.unproven_ids.extend(ids for ids in map(self.ids, inputs) if has_ids(ids))
                # a size read off another tensor's channels (`B, C, H, W = x.shape`, then
                # `y.reshape(B, C, H, W)`) no longer fits y once x loses a channel
                self.unproven_ids.extend(ids for n in odd for ids in self.read_sizes.get(n, ()))
            rule(self, call)
            return
        if any(has_ids(self.ids(t)) for t in inputs):
            kind = self._types.get(call.module, "model")
            where = call.module or "(top level)"
            way = (f"keep that module unpruned with ignore=['{call.module}']" if call.module else
                   f"keep the layers that feed it unpruned with ignore={self._feeders(inputs)}")
            raise UnsupportedOpError(
                f"prunekit has no channel rule for `{call.name}`, called in module '{where}' ({kind}). "
                f"Either {way}, or teach prunekit the op with "
                f"prunekit.graph.register_rule('{call.name}', rule)."
            )

    def _note_sizes(self, call: Call) -> None:
        """x.shape, x.size(), x.size(d), x.numel(), len(x): the channel dims read, by size (see
        `unproven`). Their groups are unproven: the size may end up anywhere as a Python number
        (`x * x.shape[1] ** -0.5`, `x / x.numel()`), where no rule sees it, and removing a channel
        then changes what it scales; the probe tests such groups."""
        x = call.args[0]
        ids = self._ids.get(id(x))  # never made here: a parameter's shape read is no use of it
        if ids is None or not has_ids(ids):
            return
        dim = 0 if call.name == "__len__" else call.arg(1, "dim")
        # torch.nn's own layers read sizes to check their inputs (InstanceNorm) or inside ops whose
        # rules know them; the model's code may use them anywhere
        own_code = call.module not in self._torch_layers
        for d in range(x.dim()) if dim is None else [dim % x.dim()]:
            if ids.shape[d] > 1:
                self.read_sizes.setdefault(int(x.shape[d]), []).append(ids)
                if own_code:
                    self.unproven_ids.append(along(ids, d, x.shape[d], self.uf))

    def _apply_ignored(self, call: Call, outs: list[torch.Tensor]) -> None:
        """An op inside an ignored module: its rule still runs, so that its MACs are counted,
        then every channel it touched is fixed and its outputs are opaque. An op without a rule
        (or whose rule fails) is only fixed: ignoring a module is the way around missing rules."""
        n_members, n_spaces, n_nodes = len(self.members), len(self.spaces), len(self.nodes)
        rule = self.rules.get(call.name)
        if rule is not None:
            try:
                rule(self, call)
            except Exception:  # noqa: BLE001 - counting is best effort here; the channels are fixed below
                del self.members[n_members:], self.nodes[n_nodes:]
        for m in self.members[n_members:]:
            self.uf.mark_fixed(m.ids)
        for _, ids in self.spaces[n_spaces:]:
            self.uf.mark_fixed(ids)
        for t in call.inputs:
            self.uf.mark_fixed(self.ids(t))
        for t in outs:  # opaque, fixed: nothing downstream may reshape what it returns
            self.set_opaque(t)

    def _feeders(self, inputs) -> list[str]:
        """Modules whose output channels reach `inputs` (for error messages)."""
        roots = set()
        for t in inputs:
            ids = self.ids(t)
            roots.update(self.uf.find(ids[ids >= 0].unique()).tolist())
        names = [name.rsplit(".", 1)[0] for name, ids in self.spaces
                 if roots & set(self.uf.find(ids).tolist())]
        return sorted(set(names))

    @property
    def current(self) -> str:
        """Name of the module whose forward is running."""
        return self._stack[-1]

    def push(self, name: str) -> None:
        self._stack.append(name)
        self._ignored_depth += _is_under(name, self.ignore)

    def pop(self) -> None:
        self._ignored_depth -= _is_under(self._stack.pop(), self.ignore)


# queued like ops, so that the ids read are the current ones
SIZE_READS = {"property.shape", "size", "numel", "__len__"}
REPLAYED_IN_PLACE = {"unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_", "swapaxes_"}
RESHAPE_IN_PLACE = REPLAYED_IN_PLACE | {"resize_", "resize_as_", "as_strided_", "set_"}


def _frozen(obj: Any) -> Any:
    """`obj` with its lists (and the lists inside) copied, as they are at this call."""
    if isinstance(obj, list):
        return [_frozen(o) for o in obj]
    if isinstance(obj, tuple) and any(isinstance(o, (list, tuple, dict)) for o in obj):
        return type(obj)(*[_frozen(o) for o in obj]) if hasattr(obj, "_fields") else tuple(_frozen(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _frozen(v) for k, v in obj.items()}
    return obj


# Leading parameters that a call may name (F.conv2d(input=x, weight=w), torch.cat(tensors=xs, dim=1),
# F.scaled_dot_product_attention(query=q, key=k, value=v)): the rules read them by position.
_LEADING = (("input", "tensors", "query"), ("other", "key"), ("value",))


def _positional(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args, kwargs` with the leading parameters given by name moved, in order, to the front."""
    if args or not kwargs:
        return args, kwargs
    kwargs = dict(kwargs)
    for names in _LEADING:
        name = next((n for n in names if n in kwargs), None)
        if name is None:
            break
        args += (kwargs.pop(name),)
    return args, kwargs


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a tensor property such as .T or .mT
        owner = getattr(func, "__self__", None)
        name = "property." + getattr(owner, "__name__", "?")
    return name or repr(func)


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# Ops that take sizes as Python ints: the model's code may have written a channel count there
# (`x.reshape(B, N, 3, 8, C // 8)` with 8 heads hard-coded), which no op-level rule can tell from
# a size read off a tensor. A call is trusted only when every size it is given is -1 (inferred),
# 1, or the size of a dim that carries no channel (batch, height, width...). Another size may also
# have been read off the channels of another tensor, whose channels are then not trusted either.
SIZED_OPS = {"view", "reshape", "unflatten", "expand", "broadcast_to", "repeat", "tile"}


def unproven(call: Call, tr: "Tracer") -> list[int]:
    """The sizes `call` is given that may be channel counts (see SIZED_OPS); empty when trusted."""
    if call.name not in SIZED_OPS or not call.inputs:
        return []
    x = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else call.inputs[0]
    ids = tr.ids(x)
    if ids is None:
        return []
    sizes = [a for a in _ints(call.args[1:]) + _ints(tuple(call.kwargs.values()))]
    channel = {int(n) for d, n in enumerate(x.shape) if d < ids.dim() and ids.shape[d] > 1}
    plain = ({-1, 1} | {int(n) for n in x.shape}) - channel
    return [n for n in sizes if n not in plain]


def _ints(args: tuple) -> list[int]:
    out = []
    for a in args:
        if isinstance(a, bool):
            continue
        if isinstance(a, int):
            out.append(a)
        elif isinstance(a, (tuple, list, torch.Size)):
            out.extend(_ints(tuple(a)))
    return out
