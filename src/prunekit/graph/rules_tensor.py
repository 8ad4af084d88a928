"""Channel rules for parameter-free tensor ops: elementwise, reduction, matmul, attention
(shape and slicing ops: rules_shape.py).

Conventions (see ids.py): ids are compressed; a dim "carries channels" when its ids vary.
Whenever code hard-codes positions along a channel dim (x[:, :16], split([8, 8])), those
channels are marked fixed: pruning would shift what the constant points at.
"""
from __future__ import annotations

import math

import torch

from .ids import NO_ID, OPAQUE, along, varying_dims
from .rules import register_rule

PASSTHROUGH = """relu relu_ relu6 gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_
hardsigmoid hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish softplus softsign
logsigmoid dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout abs
neg __neg__ __pos__ exp log sqrt rsqrt square sign erf sin
cos reciprocal floor ceil round contiguous clone detach to float half double bfloat16 type
type_as requires_grad_ cpu cuda nan_to_num threshold threshold_ property.data
zero_ fill_ __invert__ logical_not""".split()
BINARY = """add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub mul mul_
__mul__ __rmul__ __imul__ div div_ __truediv__ __rtruediv__ __itruediv__ true_divide maximum
minimum fmax fmin eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __and__ __or__
logical_and logical_or where lerp addcmul
clamp clamp_ clip clip_ clamp_min clamp_min_ clamp_max clamp_max_ masked_fill masked_fill_""".split()
# the clamps and masked_fill take tensor bounds / masks that meet x element by element, so they
# are binary ops: a bound or mask with channels of its own is joined to x's channels
SPATIAL = """max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
max_pool3d_with_indices _max_pool1d _max_pool2d _max_pool3d avg_pool1d avg_pool2d avg_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices
_adaptive_max_pool2d interpolate upsample upsample_nearest upsample_bilinear lp_pool2d""".split()
SUM_LIKE = {"sum", "nansum"}  # reductions that stay exact when a channel is zeroed
# A sum over channels (a reduction, or the contraction of a product) has no weight slice to clear:
# removing a channel equals zeroing it only where the zeroed channel's value is zero there, which
# the rules cannot see (sigmoid(0) = 0.5, an affine-free BatchNorm). Such channels are probed.
REDUCE = "mean sum nansum nanmean amax amin max min std var norm logsumexp prod argmax argmin".split()


def passthrough(tr, call):
    """Output ids = ids of the first tensor argument (unary elementwise, dtype casts)."""
    src = next(a for a in (call.args + tuple(call.kwargs.values())) if isinstance(a, torch.Tensor))
    for out in _tensor_outs(call):
        tr.set_ids(out, _fit(tr, tr.ids(src), out))


def elementwise(tr, call):
    """Broadcasting ops: channels that meet at the same element are joined."""
    tensors = [a for a in call.args + tuple(call.kwargs.values()) if isinstance(a, torch.Tensor)]
    out = _tensor_outs(call)[0]
    # where's condition (and masked_fill's mask) picks per element, so a condition with channels
    # of its own is joined like any operand: pruning it apart from x would pair each kept
    # channel of x with the condition of another channel
    ids = [_spread_single(tr, t, _fit(tr, tr.ids(t), out), out) for t in tensors]
    _fix_against_fixed_widths(tr, tensors, ids, out)
    ids = list(torch.broadcast_tensors(*ids)) if ids else []
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            if set(_dims(tr, tensors[i], ids[i], out)) & set(_dims(tr, tensors[j], ids[j], out)):
                tr.uf.union_pairs(ids[i], ids[j])
    result = torch.full_like(ids[0], NO_ID) if ids else torch.full([1] * out.dim(), NO_ID)
    for t in ids:
        result = torch.where(result >= 0, result, t)
    for o in _tensor_outs(call):
        tr.set_ids(o, _fit(tr, result, o))


def _aligned_shape(t: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    """`t`'s shape as broadcasting lines it up with `out`'s dims (1 where it has none)."""
    return (1,) * (out.dim() - t.dim()) + tuple(t.shape[max(t.dim() - out.dim(), 0):])


def _spread_single(tr, t: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An operand holding one channel, of size 1 along a dim where the output is wider (a CBAM-style
    spatial attention map, N x 1 x H x W, times an N x C x H x W stream), multiplies every output
    channel by that one channel: out[:, c] = x[:, c] * a[:, 0]. Removing channel c of the output
    leaves `a` whole, so it couples none of them; its own channel is kept (fixed), and the operand
    counts as channel-free here. Broadcasting its id across the dim instead would join all the
    stream's channels into one."""
    if tr.opaque_shape(t) is not None or varying_dims(ids) or not bool((ids >= 0).any()):
        return ids
    shape = _aligned_shape(t, out)
    if not any(s == 1 < o for s, o in zip(shape, out.shape)):
        return ids
    tr.uf.mark_fixed(ids)
    return torch.full_like(ids, NO_ID)


def _fix_against_fixed_widths(tr, tensors: list, ids: list, out: torch.Tensor) -> None:
    """An operand that really spans a dim but holds no channel ids along it (an einsum over a
    weight's rows, a single value expanded to a hard-coded width) keeps its size there when
    channels go: channels of another operand that meet its positions along that dim are fixed
    (pruned, the shapes would no longer broadcast)."""
    for j, t in enumerate(tensors):
        if tr.opaque_shape(t) is not None:
            continue  # joined with OPAQUE below, which fixes what it meets
        shape = _aligned_shape(t, out)
        for i, mine in enumerate(ids):
            if i != j and any(shape[d] > 1 for d in varying_dims(mine)):
                a, b = torch.broadcast_tensors(mine, ids[j])
                tr.uf.mark_fixed(a[(a >= 0) & (b == NO_ID)])


def join_aligned(tr, vecs: list[torch.Tensor]) -> None:
    """Join position j of every vector (one dim of several operands, of one size). An operand
    with no channel id at a position (an einsum over a weight's rows) keeps its size there, so
    the channels that meet it are fixed."""
    for v in vecs[1:]:
        tr.uf.union_pairs(vecs[0], v)
    if len({v.numel() for v in vecs}) == 1:
        grid = torch.stack([v.reshape(-1) for v in vecs])
        tr.uf.mark_fixed(grid[:, (grid == NO_ID).any(0)])


def _dims(tr, t, ids, out) -> list[int]:
    """Dims (of `out`) along which operand `t` varies: its id dims, or for an OPAQUE operand
    every dim where the tensor itself is bigger than 1 (its values are fixed there)."""
    shape = tr.opaque_shape(t)
    if shape is None:
        return varying_dims(ids)
    offset = out.dim() - len(shape)
    return [d + offset for d, s in enumerate(shape) if s > 1]


def max_or_min(tr, call):
    """`max`/`min` are elementwise with a tensor second argument, reductions otherwise."""
    second = call.arg(1, "other")
    (elementwise if isinstance(second, torch.Tensor) else reduction)(tr, call)


def power(tr, call):
    tensors = [a for a in call.args if isinstance(a, torch.Tensor)]
    (elementwise if len(tensors) > 1 else passthrough)(tr, call)


def spatial(tr, call):
    """Pooling/resizing: channel dims keep their size, other dims may change. The op works on the
    last 1, 2 or 3 dims (its name says; interpolate: every dim after N, C): channels there would be
    mixed with their neighbours (a pool over a channels-last tensor), so they are fixed."""
    x = call.args[0]
    ids = tr.ids(x)
    out = _tensor_outs(call)[0]
    pooled = next((int(n) for n in "123" if f"{n}d" in call.name), x.dim() - 2)
    if out.dim() == x.dim() and all(d < x.dim() - pooled and out.shape[d] == x.shape[d] for d in varying_dims(ids)):
        for o in _tensor_outs(call):
            tr.set_ids(o, ids)
    else:
        _fix_all(tr, call)


def reduction(tr, call):
    x = call.args[0]
    ids = tr.ids(x)
    dims = call.arg(1, "dim", None)
    keep = bool(call.arg(2, "keepdim", False))
    if call.name == "norm":
        dims, keep = call.arg(2, "dim", None), bool(call.arg(3, "keepdim", False))
    if dims is None or isinstance(dims, str):
        dims = list(range(x.dim()))
    dims = [d % x.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if any(ids.shape[d] > 1 for d in dims):
        if call.name not in SUM_LIKE:
            tr.uf.mark_fixed(ids)  # mean/max over channels changes when a channel goes
        else:
            tr.unproven_ids.append(ids)  # a sum over channels (see SUM_LIKE)
    out = ids
    for d in sorted(dims, reverse=True):
        out = out.narrow(d, 0, 1)
        if not keep:
            out = out.squeeze(d)
    for o in _tensor_outs(call):
        tr.set_ids(o, _fit(tr, out, o))


def softmax(tr, call):
    x = call.args[0]
    ids = tr.ids(x)
    dim = call.arg(1, "dim")
    if dim is None and call.name in ("softmax", "log_softmax", "softmin") and x.dim():
        dim = 0 if x.dim() in (1, 3) else 1  # F.softmax(x) and nn.Softmax(): torch's implicit dim
    if dim is not None and ids.shape[dim % x.dim()] > 1:
        tr.uf.mark_fixed(ids)
    passthrough(tr, call)


def matmul(tr, call):
    """a @ b contracts a's last dim with b's second-to-last. Channel positions there must match
    on both sides (joined) or stay fixed when only one side carries them; an output position
    only keeps the ids of an operand whose ids do not vary along the contracted dim."""
    a, b = call.args[0], call.args[1]
    if tr.tensor_name(b) is not None and b.dim() == 2:
        from .rules_layers import linear_like
        return linear_like(tr, call, a, b, None, transposed=True)
    out = _tensor_outs(call)[0]
    if a.dim() < 2 or b.dim() < 2:
        return _fix_all(tr, call)
    ia, ib = tr.ids(a), tr.ids(b)
    k = a.shape[-1]
    if k == 1 and ((ia >= 0).any() or (ib >= 0).any()):
        return _fix_all(tr, call)  # an outer product: cannot tell a lone channel from broadcasting
    ka, kb = _varies(ia, -1), _varies(ib, -2)
    ca = along(ia, -1, k, tr.uf) if ka else None
    cb = along(ib, -2, k, tr.uf) if kb else None
    if ka and kb:
        tr.uf.union_pairs(ca, cb)
        tr.unproven_ids.append(ca)  # a sum over channels (see SUM_LIKE)
    elif ka or kb:  # the other operand cannot lose those positions
        tr.uf.mark_fixed(ca if ka else cb)
    rows = torch.full_like(ia.narrow(-1, 0, 1), NO_ID) if ka else ia.narrow(-1, 0, 1)
    cols = torch.full_like(ib.narrow(-2, 0, 1), NO_ID) if kb else ib.narrow(-2, 0, 1)
    if (rows >= 0).any() and (cols >= 0).any() and varying_dims(cols) and varying_dims(rows):
        return _fix_all(tr, call)
    src = rows if (rows >= 0).any() else cols
    tr.set_ids(out, _fit(tr, src, out))
    macs = out.numel() * k
    contracted = [ca if ka else cb] if (ka or kb) else []
    tr.add_node(call, macs=macs, terms=[(macs, contracted + [tr.ids(out)])])


def _varies(ids: torch.Tensor, dim: int) -> bool:
    d = dim % ids.dim()
    return ids.shape[d] > 1 and not bool((ids == ids.narrow(d, 0, 1)).all())


def sdpa(tr, call):
    """q.k contracts the head dim: q and k positions are joined. With the default scale
    1/sqrt(head_dim), pruning head dims would change the scale, so q/k are then kept whole."""
    q, k, v = call.args[:3]
    qk = along(tr.ids(q), -1, q.shape[-1], tr.uf), along(tr.ids(k), -1, k.shape[-1], tr.uf)
    join_aligned(tr, list(qk))
    if call.kwargs.get("scale") is None and (len(call.args) < 7 or call.args[6] is None):
        tr.uf.mark_fixed(qk[0])
    else:
        tr.unproven_ids.append(qk[0])  # q.k sums over the head dim (see SUM_LIKE)
    mask = call.arg(3, "attn_mask")
    if isinstance(mask, torch.Tensor) and tr.ids(mask) is not None:
        # an additive mask (BEiT's relative position bias, (1, heads, L, S)) is added per head and
        # position; nothing here removes heads or positions, so the mask keeps all of its own
        tr.uf.mark_fixed(tr.ids(mask))
    out = _tensor_outs(call)[0]
    iv = tr.ids(v)
    if iv.shape[-2] > 1 and v.numel():  # an empty v (a cut branch) has ids that cannot be compressed
        return _fix_all(tr, call)
    tr.set_ids(out, _fit(tr, iv, out))
    L, S = q.shape[-2], k.shape[-2]
    rows = q.numel() // q.shape[-1] * S if L else 0
    tr.add_node(call, macs=rows * (q.shape[-1] + v.shape[-1]),
                terms=[(rows * q.shape[-1], [qk[0]]), (rows * v.shape[-1], [tr.ids(out)])])


def setitem(tr, call):
    target, index, value = call.args[:3]
    it, iv = tr.ids(target), tr.ids(value) if isinstance(value, torch.Tensor) else None
    for ids in (it, iv):
        if ids is not None and (ids >= 0).any():
            tr.uf.mark_fixed(ids)


# ---- helpers ---------------------------------------------------------------------------------
def _tensor_outs(call):
    out = call.out
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


def _fit(tr, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Left-pad (broadcasting rules) or left-trim size-1 dims so that ids has out's rank.

    If that is impossible the output is made opaque (fixed): never silently lose channels.
    """
    while ids.dim() < out.dim():
        ids = ids.unsqueeze(0)
    while ids.dim() > out.dim() and ids.shape[0] == 1:
        ids = ids.squeeze(0)
    if ids.dim() != out.dim() or any(s not in (1, o) for s, o in zip(ids.shape, out.shape)):
        tr.uf.mark_fixed(ids)
        return torch.full([1] * out.dim(), OPAQUE, dtype=torch.long)
    return ids


def _fix_all(tr, call):
    """Keep every channel this op touches, and make its outputs opaque."""
    for a in call.args + tuple(call.kwargs.values()):
        if isinstance(a, torch.Tensor) and (tr.tensor_name(a) is None or id(a) in tr._raw):
            tr.uf.mark_fixed(tr.ids(a))
    for o in _tensor_outs(call):
        tr.set_opaque(o)


for _n in PASSTHROUGH:
    register_rule(_n, passthrough)
for _n in BINARY:
    register_rule(_n, elementwise)
for _n in SPATIAL:
    register_rule(_n, spatial)
for _n in REDUCE:
    register_rule(_n, max_or_min if _n in ("max", "min") else reduction)
for _n in ("pow", "__pow__", "__rpow__", "float_power"):
    register_rule(_n, power)
for _n in ("softmax", "log_softmax", "softmin", "cumsum", "cumprod"):
    register_rule(_n, softmax)
for _n in ("matmul", "__matmul__", "bmm", "mm"):
    register_rule(_n, matmul)
register_rule("scaled_dot_product_attention", sdpa)
register_rule("__setitem__", setitem)


def fresh(tr, call):
    """Tensors created with an explicit shape (x.new_zeros(...)): left opaque, decided on use."""


def like(tr, call):
    """zeros_like(x) & co: the shape follows x at run time, so the ids do too."""
    passthrough(tr, call)


def normalize_rule(tr, call):
    x = call.args[0]
    dim = call.arg(2, "dim", 1)
    if tr.ids(x).shape[dim % x.dim()] > 1:
        tr.uf.mark_fixed(tr.ids(x))  # an L2 norm over channels changes when one goes
    passthrough(tr, call)


def _einsum_macs(eq: str, ops: list, out: torch.Tensor) -> int:
    """Multiply-accumulates of a two-operand einsum, as for matmul: every output element sums
    products over the contracted letters (those not in the output). Other operand counts: 0."""
    if len(ops) != 2 or not all(isinstance(t, torch.Tensor) for t in ops):
        return 0
    lhs, _, rhs = eq.partition("->")
    if "->" not in eq:  # implicit output: the letters that appear once
        rhs = "".join(c for c in lhs if c.isalpha() and lhs.count(c) == 1)
    size: dict[str, int] = {}
    for sub, t in zip(lhs.split(","), ops):
        head, _, tail = sub.partition("...")
        dims = list(enumerate(head)) + [(t.dim() - len(tail) + i, c) for i, c in enumerate(tail)]
        for d, letter in dims:
            size[letter] = max(size.get(letter, 1), int(t.shape[d]))
    return out.numel() * math.prod(n for letter, n in size.items() if letter not in rhs)


def einsum(tr, call):
    """Join ids of letters shared by operands; the output takes the ids of the one operand
    that carries channels (several such operands make everything fixed). Two-operand einsums
    count their MACs like matmul."""
    eq = call.args[0].replace(" ", "")
    ops = list(call.args[1]) if len(call.args) == 2 and isinstance(call.args[1], (list, tuple)) else list(call.args[1:])
    out = _tensor_outs(call)[0]
    macs = _einsum_macs(eq, ops, out)
    if "..." in eq or "->" not in eq:
        _fix_all(tr, call)
        return tr.add_node(call, macs=macs)
    lhs, rhs = eq.split("->")
    subs = lhs.split(",")
    where: dict[str, list[tuple[int, int]]] = {}
    for k, s in enumerate(subs):
        for d, letter in enumerate(s):
            where.setdefault(letter, []).append((k, d))
    ids = [tr.ids(t) for t in ops]
    contracted = []  # one id vector per summed letter: the MACs shrink with its kept share
    for letter, places in where.items():
        vecs = [along(ids[k], d, ops[k].shape[d], tr.uf) for k, d in places]
        join_aligned(tr, vecs)
        if letter not in rhs:
            tr.unproven_ids.extend(vecs)  # a sum over this letter (see SUM_LIKE)
            contracted.append(vecs[0])
    carriers = [k for k, s in enumerate(subs) if any(ids[k].shape[d] > 1 and letter in rhs for d, letter in enumerate(s))]
    if len(carriers) > 1:
        _fix_all(tr, call)
        return tr.add_node(call, macs=macs)
    if not carriers:
        tr.set_ids(out, torch.full([1] * out.dim(), NO_ID, dtype=torch.long))
        return tr.add_node(call, macs=macs, terms=[(macs, contracted + [tr.ids(out)])] if macs else [])
    k = carriers[0]
    src = ids[k]
    for d, letter in reversed(list(enumerate(subs[k]))):
        if letter not in rhs:
            src = src.narrow(d, 0, 1).squeeze(d)
    kept = [l for l in subs[k] if l in rhs]  # letters of src, in operand order
    order = [l for l in rhs if l in kept]
    src = src.permute([kept.index(l) for l in order]) if order else src
    shape = [src.shape[order.index(l)] if l in order else 1 for l in rhs]
    tr.set_ids(out, src.reshape(shape))
    tr.add_node(call, macs=macs, terms=[(macs, contracted + [tr.ids(out)])] if macs else [])


for _n in ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "arange", "zeros", "ones", "full", "empty",
           "rand", "randn", "randint", "tensor", "linspace", "meshgrid"):
    register_rule(_n, fresh)
for _n in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"):
    register_rule(_n, like)
register_rule("normalize", normalize_rule)
register_rule("einsum", einsum)
