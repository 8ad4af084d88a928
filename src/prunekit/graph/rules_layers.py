"""Channel rules for ops that own parameters: conv, linear, norms, PReLU, embedding
(nn.MultiheadAttention: rules_mha.py).

Rules are keyed on the *functional* op (F.conv2d, F.batch_norm, ...), which every nn layer calls,
so a layer subclass with its own forward (timm's LayerNorm2d permutes around F.layer_norm) is
handled by what it really computes, not by its class name. Parameters are recognised by
identity, so the members name the module that owns the tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .ids import along
from .rules import register_rule
from .rules_tensor import _fix_all, _tensor_outs
from .trace import tensor_qualname


def _named(tr, t):
    """(module, name) of a parameter/buffer argument, or None for computed tensors."""
    return tr.tensor_name(t)


def _out_ids(ids: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = ids.numel()
    return ids.reshape(shape)


def _join_conv_groups(tr, p, in_ids, groups: int) -> None:
    """One class per conv group (whole groups go, so `groups` stays valid). A group whose
    input channels have no channel identity (the model input, a fresh tensor) is fixed."""
    outs, ins = p.numpy().reshape(groups, -1), in_ids.numpy().reshape(groups, -1)
    rows = np.concatenate([outs, ins], 1)  # one row per conv group; column 0 is a fresh (valid) id
    tr.uf.union_pairs(np.broadcast_to(rows[:, :1], (groups, rows.shape[1] - 1)), rows[:, 1:])
    tr.uf.mark_fixed(outs[(ins < 0).any(1)])


def _conv(tr, call, transposed: bool):
    """Conv weights are (out, in/groups, k...); transposed ones (in, out/groups, k...)."""
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    groups = int(call.arg(6, "groups", 1))
    out = _tensor_outs(call)[0]
    if _named(tr, w) is None or x.dim() != w.dim():
        _fix_all(tr, call)  # computed weights (weight standardisation) or unbatched input: counted only
        per = w.shape[1] * math.prod(w.shape[2:])
        tr.add_node(call, macs=(x.numel() if transposed else out.numel()) * per)
        return
    c_in = x.shape[1]
    c_out = w.shape[1] * groups if transposed else w.shape[0]
    in_ids = along(tr.ids(x), 1, c_in, tr.uf)
    mod, wname = _named(tr, w)
    p = tr.new_space(tensor_qualname(mod, wname), c_out)
    # dim 0 holds whole channels; dim 1 holds channels per conv group (whole channels if groups == 1)
    dim0, dim1 = ((in_ids, "in"), (p, "out")) if transposed else ((p, "out"), (in_ids, "in"))
    tr.add_member(mod, wname, 0, *dim0)
    if groups == 1:
        tr.add_member(mod, wname, 1, *dim1)
    else:
        _join_conv_groups(tr, p, in_ids, groups)
        if not isinstance(tr.model.get_submodule(mod), nn.modules.conv._ConvNd):
            # F.conv2d(x, w, groups=g) with a raw parameter: `groups` is written in the code, so
            # no whole conv group may go (surgery updates it only on nn.Conv modules)
            tr.uf.mark_fixed(p.numpy())
    if b is not None and _named(tr, b) is not None:
        tr.add_member(*_named(tr, b), 0, p, "out")
    elif isinstance(b, torch.Tensor) and tr.ids(b) is not None:
        # a computed bias (BEiT: cat(q_bias, zero buffer, v_bias)) is added along the outputs:
        # its channels and the output channels are one
        tr.uf.union_pairs(p, along(tr.ids(b), -1, c_out, tr.uf))
    tr.set_ids(out, _out_ids(p, out.dim(), 1))
    # every output element reads in/groups channels x kernel (conv); every input element writes
    # out/groups channels x kernel (transposed)
    per = w.shape[1] * math.prod(w.shape[2:])
    tr.add_node(call, macs=(x.numel() if transposed else out.numel()) * per, params=[tensor_qualname(mod, wname)])


def conv(tr, call):
    _conv(tr, call, transposed=False)


def conv_transpose(tr, call):
    _conv(tr, call, transposed=True)


def linear_like(tr, call, x, w, b, transposed: bool = False):
    """y = x @ W.T + b (F.linear) or y = x @ W (matmul with a raw 2-D parameter)."""
    out = _tensor_outs(call)[0]
    if _named(tr, w) is None:
        _fix_all(tr, call)  # a computed weight: its channels are kept, its MACs counted
        tr.add_node(call, macs=out.numel() * x.shape[-1])
        return
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    mod, wname = _named(tr, w)
    in_ids = along(tr.ids(x), -1, x.shape[-1], tr.uf)
    p = tr.new_space(tensor_qualname(mod, wname), w.shape[out_dim])
    tr.add_member(mod, wname, out_dim, p, "out")
    tr.add_member(mod, wname, in_dim, in_ids, "in")
    if b is not None and _named(tr, b) is not None:
        tr.add_member(*_named(tr, b), 0, p, "out")
    elif isinstance(b, torch.Tensor) and tr.ids(b) is not None:
        # a computed bias (BEiT: cat(q_bias, zero buffer, v_bias)) is added along the outputs:
        # its channels and the output channels are one
        tr.uf.union_pairs(p, along(tr.ids(b), -1, w.shape[out_dim], tr.uf))
    tr.set_ids(out, _out_ids(p, out.dim(), out.dim() - 1))
    tr.add_node(call, macs=out.numel() * x.shape[-1], params=[tensor_qualname(mod, wname)])


def linear(tr, call):
    linear_like(tr, call, call.args[0], call.arg(1, "weight"), call.arg(2, "bias"))


def addmm(tr, call):
    """beta * input + alpha * (mat1 @ mat2): with a stored 2-D mat2 (in, out), a Linear kept
    transposed with `input` as its bias (GPT-2's Conv1D); else every channel is kept, MACs counted."""
    bias, x, w = call.args[0], call.arg(1, "mat1"), call.arg(2, "mat2")
    if _named(tr, w) is not None and w.dim() == 2 and isinstance(bias, torch.Tensor) and bias.dim() <= 2:
        if bias.numel() == 1:  # a scalar added to every output: no channel of its own
            return linear_like(tr, call, x, w, None, transposed=True)
        along_outputs = bias.shape[-1] == w.shape[1] and (_named(tr, bias) is None or bias.dim() == 1)
        if along_outputs:  # a bias (out,), stored or computed, or a computed (N, out) term
            return linear_like(tr, call, x, w, bias, transposed=True)
    _fix_all(tr, call)
    tr.add_node(call, macs=_tensor_outs(call)[0].numel() * x.shape[-1])


def batched_product_fixed(tr, call):
    """baddbmm / addbmm: batched products with an added term; every channel is kept, MACs counted
    (out elements x the contracted width, per product in the batch)."""
    b1 = call.arg(1, "batch1")
    out = _tensor_outs(call)[0]
    per_out = b1.shape[-1] * (b1.shape[0] if call.name == "addbmm" else 1)  # addbmm also sums the batch
    _fix_all(tr, call)
    tr.add_node(call, macs=out.numel() * per_out)


def bilinear(tr, call):
    """y_k = x1 W_k x2 + b_k (nn.Bilinear): linear in each input, so an input channel of x1 (x2) is
    a slice along W's dim 1 (2) and an output channel a slice along dim 0, as for a Linear."""
    x1, x2, w, b = call.args[0], call.args[1], call.arg(2, "weight"), call.arg(3, "bias")
    out = _tensor_outs(call)[0]
    macs = out.numel() * x1.shape[-1] * x2.shape[-1]
    if _named(tr, w) is None:
        _fix_all(tr, call)
        return tr.add_node(call, macs=macs)
    mod, wname = _named(tr, w)
    p = tr.new_space(tensor_qualname(mod, wname), w.shape[0])
    tr.add_member(mod, wname, 0, p, "out")
    tr.add_member(mod, wname, 1, along(tr.ids(x1), -1, x1.shape[-1], tr.uf), "in")
    tr.add_member(mod, wname, 2, along(tr.ids(x2), -1, x2.shape[-1], tr.uf), "in")
    if b is not None and _named(tr, b) is not None:
        tr.add_member(*_named(tr, b), 0, p, "out")
    elif isinstance(b, torch.Tensor) and b.dim() >= 1 and b.shape[-1] == w.shape[0] > 1:
        tr.uf.union_pairs(p, along(tr.ids(b), -1, w.shape[0], tr.uf))  # a computed bias: its channels are the outputs
    tr.set_ids(out, _out_ids(p, out.dim(), out.dim() - 1))
    tr.add_node(call, macs=macs, params=[tensor_qualname(mod, wname)])


def _per_channel(tr, call, dim: int, tensors, join: int = 1, statistics: bool = False):
    """Norm-style op: per-channel parameters/buffers along `dim` follow the input's channels.

    `join` > 1 joins consecutive channels into one class (GroupNorm: a whole group at a time,
    so that the statistics of the groups that stay are unchanged). `statistics`: the op
    normalises over these channels (LayerNorm, RMSNorm), which a "#statistics" member records,
    whatever module makes the call (surgery.verify.group_is_exact reads it).
    """
    x = call.args[0]
    c = along(tr.ids(x), dim, x.shape[dim], tr.uf)
    if join > 1:
        for g in range(0, c.numel(), join):
            tr.uf.union_all(c[g:g + join])
    for t in tensors:
        if t is not None and _named(tr, t) is not None:
            tr.add_member(*_named(tr, t), 0, c, "through")
        elif isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == c.numel():
            # a computed scale (NFNet's (gain * scale).view(-1)) goes with the channels it scales
            tr.uf.union_pairs(c, along(tr.ids(t), 0, c.numel(), tr.uf))
    if call.module:
        tr.add_member(call.module, "#channels", 0, c, "through")
    if statistics:
        tr.add_member(call.module, "#statistics", 0, c, "through")
    for o in _tensor_outs(call):
        tr.set_ids(o, tr.ids(x))
    tr.add_node(call)


def batch_norm(tr, call):
    _per_channel(tr, call, 1, [call.arg(i, k) for i, k in
                               ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))])


# Norm modules whose channel counts (normalized_shape, num_groups) surgery keeps in step with
# the channels (subclasses included, such as timm's LayerNorm2d)
COUNTED_NORMS = tuple(c for c in (torch.nn.LayerNorm, torch.nn.GroupNorm, getattr(torch.nn, "RMSNorm", None)) if c)


def _count_in_call(tr, call, dim: int) -> None:
    """A functional norm is given its channel count as Python ints (normalized_shape, num_groups).
    Called from a module surgery does not update (a model's own `LayerNorm(nn.Module)` holding
    `self.normalized_shape`, as the official ConvNeXt does), that count stays after a channel
    goes: the channels are left to probing."""
    module = tr.model.get_submodule(call.module) if call.module else None
    if not isinstance(module, COUNTED_NORMS):
        x = call.args[0]
        tr.unproven_ids.append(along(tr.ids(x), dim, x.shape[dim], tr.uf))


def group_norm(tr, call):
    x, groups = call.args[0], int(call.arg(1, "num_groups"))
    _count_in_call(tr, call, 1)
    _per_channel(tr, call, 1, [call.arg(2, "weight"), call.arg(3, "bias")], join=x.shape[1] // groups)


def layer_norm(tr, call):
    shape = call.arg(1, "normalized_shape")
    if len(shape) != 1:
        return _fix_all(tr, call)
    _count_in_call(tr, call, call.args[0].dim() - 1)
    _per_channel(tr, call, call.args[0].dim() - 1, [call.arg(2, "weight"), call.arg(3, "bias")], statistics=True)


def rms_norm(tr, call):
    shape = call.arg(1, "normalized_shape")
    if len(shape) != 1:
        return _fix_all(tr, call)
    _count_in_call(tr, call, call.args[0].dim() - 1)
    _per_channel(tr, call, call.args[0].dim() - 1, [call.arg(2, "weight")], statistics=True)


def prelu(tr, call):
    w = call.arg(1, "weight")
    _per_channel(tr, call, 1, [w] if w.numel() > 1 else [])


def embedding(tr, call):
    w = call.arg(1, "weight")
    if _named(tr, w) is None:
        return _fix_all(tr, call)
    out = _tensor_outs(call)[0]
    mod, wname = _named(tr, w)
    p = tr.new_space(tensor_qualname(mod, wname), w.shape[1])
    tr.add_member(mod, wname, 1, p, "out")
    tr.set_ids(out, _out_ids(p, out.dim(), out.dim() - 1))
    tr.add_node(call)


for _n in ("conv1d", "conv2d", "conv3d"):
    register_rule(_n, conv)
for _n in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
    register_rule(_n, conv_transpose)
register_rule("linear", linear)
register_rule("addmm", addmm)
register_rule("bilinear", bilinear)
for _n in ("baddbmm", "addbmm"):
    register_rule(_n, batched_product_fixed)
register_rule("batch_norm", batch_norm)
register_rule("instance_norm", batch_norm)
register_rule("group_norm", group_norm)
register_rule("layer_norm", layer_norm)
register_rule("rms_norm", rms_norm)
register_rule("prelu", prelu)
register_rule("embedding", embedding)
