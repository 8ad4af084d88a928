"""Channel rules for shape and slicing ops: view/reshape/permute/cat/... replayed on the id
tensors themselves, and slicing (indexing, narrow, split, chunk, pad) that fixes the channels
whose positions the code hard-codes.

Conventions as in rules_tensor.py: ids are compressed; a dim "carries channels" when its ids vary.
"""
from __future__ import annotations

import torch

from .ids import OPAQUE, along, compress, varying_dims
from .rules import register_rule
from .rules_tensor import _tensor_outs, join_aligned
from .trace import _ints

SHAPE = """view reshape flatten unflatten permute transpose swapaxes swapdims t property.T property.mT
movedim moveaxis squeeze unsqueeze expand expand_as broadcast_to cat concat concatenate stack flip
repeat tile view_as reshape_as""".split()  # roll: own rule; in-place reshapes (unsqueeze_, ...): trace.py

# ops that only reorder or insert dims: they give the same answer on compressed ids (a dim of
# size 1 stands for any size), so they skip the expansion to the full shape
REORDER = {"permute", "transpose", "swapaxes", "swapdims", "t", "property.T", "property.mT", "movedim",
           "moveaxis", "flip", "unsqueeze"}


def replay(tr, call):
    """Shape ops: run the same op on the id tensors themselves."""
    if call.name in REORDER:
        args, kwargs = (tr.ids(call.args[0]), *call.args[1:]), call.kwargs
    elif call.name in JOINED:
        _join_operands(tr, call)
        if call.name != "stack" and _compact_cat(tr, call):
            return
        args, kwargs = _swap_data(tr, call)
    else:
        args, kwargs = _swap_data(tr, call)
    res = call.func(*args, **kwargs)
    outs, idouts = _tensor_outs(call), _tensor_outs(type(call)(call.name, call.func, (), {}, res, ""))
    for o, i in zip(outs, idouts):
        if call.name in ("view", "reshape", "unflatten", "view_as", "reshape_as"):
            _join_split(tr, _full(tr.ids(call.args[0]), call.args[0].shape), i)
        if call.name in SHAPED_LIKE:
            _pair_with_shape_source(tr, call, compress(i))
        tr.set_ids(o, i)
        sized = _sized_channel_dims(call, tr.ids(o)) if call.name in ("view", "reshape", "unflatten") else []
        if sized:
            tr.unproven_ids.append(tr.ids(o))
            tr.unproven_ids.extend(ids for n in sized for ids in tr.read_sizes.get(n, ()))


SHAPED_LIKE = {"view_as", "reshape_as", "expand_as"}  # the result takes the shape of a second tensor


def _pair_with_shape_source(tr, call, ids: torch.Tensor) -> None:
    """x.view_as(y), x.reshape_as(y), x.expand_as(y): the result has y's shape, which loses a
    position along a dim where y loses a channel. Along every dim the result really fills (not one
    that x broadcasts), its channels and y's go together, position by position; where only one
    side carries channels, the other side's size cannot follow, so those channels are kept."""
    x, y = call.args[0], call.arg(1, "other")
    if not isinstance(y, torch.Tensor):
        return
    theirs, lead = tr.ids(y), y.dim() - x.dim()
    for d in range(y.dim()):
        if y.shape[d] == 1 or (call.name == "expand_as" and (d < lead or x.shape[d - lead] == 1)):
            continue
        mine_vary, theirs_vary = ids.shape[d] > 1, theirs.shape[d] > 1
        if mine_vary and theirs_vary:
            tr.uf.union_pairs(along(ids, d, y.shape[d], tr.uf), along(theirs, d, y.shape[d], tr.uf))
        elif mine_vary or theirs_vary:
            tr.uf.mark_fixed(ids if mine_vary else theirs)


def _sized_channel_dims(call, ids: torch.Tensor) -> list[int]:
    """The sizes (not -1) the code gives for dims that carry channels after the view.

    `view(B, -1, 4, H, W)`, a channel shuffle in groups of 4 channels, holds a channel count: it
    no longer fits once channels go. trace.unproven lets such a size through when it happens to
    equal a size that carries no channel (4 == H), so the dims it lands on are checked here.
    """
    x = call.args[0]
    if call.name == "unflatten":
        start = call.arg(1, "dim")
        if not isinstance(start, int):
            return [int(call.out.shape[d]) for d in varying_dims(ids)]  # a named dim: not followed, probed
        sizes = dict(enumerate(_ints((call.arg(2, "sizes"),)), start % x.dim()))
    else:
        sizes = dict(enumerate(_ints(call.args[1:] + tuple(call.kwargs.values()))))
    return [sizes[d] for d in varying_dims(ids) if sizes.get(d, -1) != -1]


JOINED = {"cat", "concat", "concatenate", "stack"}


def _join_operands(tr, call) -> None:
    """cat and stack need their operands of one size in every dim they do not join along: channels
    there are pruned together, position by position (torch.stack([a, b]).sum(0) adds a and b)."""
    parts, dim = call.arg(0, "tensors"), call.arg(1, "dim", 0)
    if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
        return
    parts = [t for t in parts if isinstance(t, torch.Tensor)]
    if len(parts) < 2 or len({t.shape if call.name == "stack" else t.dim() for t in parts}) > 1:
        return  # a legacy empty operand of cat, or a call that torch rejects anyway
    cut = None if call.name == "stack" else dim % parts[0].dim()
    ids = [tr.ids(t) for t in parts]
    for d in range(parts[0].dim()):
        if d != cut and any(i.shape[d] > 1 for i in ids):
            join_aligned(tr, [along(i, d, t.shape[d], tr.uf) for t, i in zip(parts, ids)])


def _compact_cat(tr, call) -> bool:
    """cat on compressed ids: each operand is expanded along the cat dim only (and where another
    operand varies). False, with nothing done, for the forms this does not cover."""
    parts, dim = call.args[0], call.arg(1, "dim", 0)
    if set(call.kwargs) - {"dim"} or not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
        return False
    ranks = {t.dim() for t in parts if isinstance(t, torch.Tensor)}
    if len(parts) == 0 or ranks != {parts[0].dim()} or not all(isinstance(t, torch.Tensor) for t in parts):
        return False
    ids = [tr.ids(t) for t in parts]
    d = dim % parts[0].dim()
    shape = [max(i.shape[k] for i in ids) for k in range(parts[0].dim())]
    grown = []
    for t, i in zip(parts, ids):
        shape[d] = t.shape[d]
        grown.append(i.expand(shape))
    tr.set_ids(_tensor_outs(call)[0], torch.cat(grown, d))
    return True


def getitem(tr, call):
    x, index = call.args[0], call.args[1]
    ids = tr.ids(x)
    index = index if isinstance(index, tuple) else (index,)
    dim = 0
    for pos, item in enumerate(index):
        if item is None:
            continue
        if item is Ellipsis:
            dim = x.dim() - sum(1 for it in index[pos + 1:] if it is not None)
            continue
        full = isinstance(item, slice) and item == slice(None)
        # a bool mask indexes as many dims as it has
        width = item.dim() if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8) else 1
        if not full and any(ids.shape[d] > 1 for d in range(dim, min(dim + width, ids.dim()))):
            tr.uf.mark_fixed(ids)  # a hard-coded position along a channel dim
        dim += 0 if isinstance(item, bool) else width
    # the index keeps its values (a mask or positions computed in forward), only x's ids are indexed
    tr.set_ids(_tensor_outs(call)[0], call.func(_full(ids, x.shape), _on_cpu(call.args[1])))


def _on_cpu(index):
    """An index with its tensors on the CPU, where the id tensors live."""
    if isinstance(index, torch.Tensor):
        return index.cpu()
    return type(index)(_on_cpu(i) for i in index) if isinstance(index, (tuple, list)) else index


def cut_along(tr, call):
    """narrow/select/split/unbind/tensor_split: hard-coded pieces of a channel dim are fixed."""
    x = call.args[0]
    # narrow(x, dim, start, length), select(x, dim, index), unbind(x, dim=0);
    # split(x, sizes, dim=0), split_with_sizes(x, sizes, dim=0), tensor_split(x, sections, dim=0)
    dim = call.arg(1 if call.name in ("narrow", "select", "unbind") else 2, "dim", 0)
    ids = tr.ids(x)
    if ids.shape[dim % x.dim()] > 1:
        tr.uf.mark_fixed(ids)
    replay(tr, call)


def roll(tr, call):
    """A roll along a channel dim fixes its channels: it is not a reorder that survives pruning.

    roll(x, 1, dims=1) on 4 channels puts channel 3 first: [3, 0, 1, 2]. With channel 3 removed
    the same code rolls [0, 1, 2] into [2, 0, 1], so channel 2 lands where channel 0 was read
    (a plain replay of the ids would promise [0, 1, 2]). Flip, by contrast, reverses any subset
    consistently and stays a replay. A roll without dims shifts the flattened tensor, so any
    dim that carries channels is affected.
    """
    x, dims = call.args[0], call.arg(2, "dims", None)
    ids = tr.ids(x)
    dims = range(ids.dim()) if dims is None else ([dims] if isinstance(dims, int) else dims)
    if any(ids.shape[d % x.dim()] > 1 for d in dims):
        tr.uf.mark_fixed(ids)
    replay(tr, call)


def chunk(tr, call):
    """chunk(n) splits by the *current* size, so each chunk must lose the same positions."""
    x, n = call.args[0], call.arg(1, "chunks")
    dim = call.arg(2, "dim", 0) % x.dim()
    ids = tr.ids(x)
    if ids.shape[dim] > 1:
        if x.shape[dim] % n:
            tr.uf.mark_fixed(ids)
        else:
            parts = _full(ids, x.shape).movedim(dim, 0).reshape(n, x.shape[dim] // n, -1)
            for k in range(1, n):
                tr.uf.union_pairs(parts[0], parts[k])
    replay(tr, call)


def pad(tr, call):
    """Constant padding: padded channels have a count fixed in code. Reflect, replicate and
    circular padding copy channels from the ends, which move when a channel goes: fixed."""
    x, pads = call.args[0], list(call.arg(1, "pad"))
    ids = tr.ids(x)
    if call.arg(2, "mode", "constant") != "constant" and any(
            ids.shape[x.dim() - 1 - k] > 1 and (pads[2 * k] or pads[2 * k + 1]) for k in range(len(pads) // 2)):
        tr.uf.mark_fixed(ids)
    for k in range(len(pads) // 2):
        d = x.dim() - 1 - k
        before, after = pads[2 * k], pads[2 * k + 1]
        if ids.shape[d] == 1 or (before == 0 and after == 0):
            continue
        if before < 0 or after < 0:
            tr.uf.mark_fixed(ids)
            ids = ids.narrow(d, max(-before, 0), ids.shape[d] - max(-before, 0) - max(-after, 0))
            before, after = max(before, 0), max(after, 0)
        parts = [_fresh_fixed(tr, ids, d, before), ids, _fresh_fixed(tr, ids, d, after)]
        ids = torch.cat([p for p in parts if p.shape[d]], d)
    tr.set_ids(_tensor_outs(call)[0], ids)

def _full(ids: torch.Tensor, shape) -> torch.Tensor:
    return ids.expand(tuple(shape)).contiguous()  # a tuple: a 0-dim tensor's shape is empty


def _fresh_fixed(tr, like: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Fixed ids shaped like `like` but with n positions along `dim` (padding channels)."""
    shape = list(like.shape)
    shape[dim] = n
    return torch.full(shape, OPAQUE, dtype=torch.long)


def _swap_data(tr, call):
    """Replace every data tensor in the call by its (full-size) id tensor."""
    def swap(a):
        if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex() or id(a) in tr._ids):
            return _full(tr.ids(a), a.shape)
        if isinstance(a, (list, tuple)):
            return type(a)(swap(x) for x in a)
        return a
    return swap(call.args), {k: swap(v) for k, v in call.kwargs.items()}


def _join_split(tr, before: torch.Tensor, after: torch.Tensor) -> None:
    """A view that splits a channel dim into several (channel shuffle, heads) couples positions.

    (B, g*c, H, W) -> (B, g, c, H, W): after pruning, the code still views with the *current*
    size, so each of the g slices must lose the same positions; join position j of all slices.
    """
    vb, va = varying_dims(compress(before)), varying_dims(compress(after))
    if len(va) <= len(vb):
        return
    last = va[-1]
    rows = after.movedim(last, 0).reshape(after.shape[last], -1)
    if rows.numel() == 0:  # 0 channels (a cut branch): nothing to join
        return
    rep = rows.max(dim=1).values
    tr.uf.union_pairs(rep.unsqueeze(1).expand_as(rows), rows)


for _n in SHAPE:
    register_rule(_n, replay)
for _n in ("narrow", "select", "split", "split_with_sizes", "unbind", "tensor_split"):
    register_rule(_n, cut_along)
register_rule("__getitem__", getitem)
register_rule("chunk", chunk)
register_rule("roll", roll)
register_rule("pad", pad)
