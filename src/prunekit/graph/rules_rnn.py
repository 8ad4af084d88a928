"""Channel rule for nn.LSTM / nn.GRU / nn.RNN (`lstm`, `gru`, `rnn_tanh`, `rnn_relu`).

The recurrent layer *reads* the input's features through the first layer's input weights
(`weight_ih_l0`, and `weight_ih_l0_reverse` when bidirectional), so those features are pruned like
a Linear's inputs: removing one deletes a column of each. The hidden size is kept: the hidden
state feeds itself through `weight_hh` and the gates, and the outputs (sequence, h_n, c_n) are
opaque. Both the padded call and the packed-sequence call are handled.
"""
from __future__ import annotations

import torch

from .ids import along
from .rules import register_rule
from .rules_tensor import _fix_all
from .trace import tensors_in


def recurrent(tr, call):
    args, x = call.args, call.args[0]
    is_params = lambda a: isinstance(a, list) and a and all(isinstance(p, torch.Tensor) for p in a)
    # (input, hx, params, ...) or, for a packed sequence, (data, batch_sizes, hx, params, ...)
    at = next((i for i in (2, 3) if len(args) > i and is_params(args[i])), None)
    steps = x.numel() // x.shape[-1]
    if tr.sequence_shape is None and at is not None:
        tr.sequence_shape = _rnn_shape(args, at)
    if at is None or any(tr.tensor_name(p) is None for p in args[at]):
        _fix_all(tr, call)  # weights computed in forward (masked): keep everything, count the MACs
        if at is not None:  # every step multiplies each weight matrix once
            tr.add_node(call, macs=steps * sum(p.numel() for p in args[at] if p.dim() == 2))
        return
    params = args[at]
    num_layers, bidirectional = int(args[at + 2]), bool(args[at + 5])
    directions = 2 if bidirectional else 1
    per = len(params) // (num_layers * directions)  # w_ih, w_hh[, b_ih, b_hh][, w_hr]
    in_ids = along(tr.ids(x), -1, x.shape[-1], tr.uf)
    terms = []
    for k in range(0, len(params), per):
        w_ih, rest = params[k], [p for p in params[k + 1:k + per] if p.dim() == 2]
        if k < per * directions:  # the first layer reads the input's features
            tr.add_member(*tr.tensor_name(w_ih), 1, in_ids, "in")
            terms.append((steps * w_ih.numel(), [in_ids]))
        else:
            terms.append((steps * w_ih.numel(), []))
        terms += [(steps * p.numel(), []) for p in rest]
    skip = {id(x)} | {id(p) for p in params}
    for t in call.inputs:  # an initial state has the hidden size, which stays: fix whatever made it
        if id(t) not in skip:
            tr.uf.mark_fixed(tr.ids(t))
    for t in tensors_in(call.out):
        tr.set_opaque(t)
    tr.add_node(call, macs=sum(m for m, _ in terms), terms=terms)


def _rnn_shape(args, at: int) -> tuple[int, int]:
    """(length, batch) of a recurrent op's call: (input, hx, params, has_biases, layers, dropout,
    train, bidirectional, batch_first), or for a packed sequence (data, batch_sizes, hx, params, ...)
    where there is a step per batch_sizes entry and the first holds every sequence; an unbatched
    (2-D) input is one sample."""
    x = args[0]
    if at == 3:
        return int(args[1].numel()), int(args[1][0])
    if x.dim() < 3:
        return int(x.shape[0]), 1
    return (int(x.shape[1]), int(x.shape[0])) if bool(args[at + 6]) else (int(x.shape[0]), int(x.shape[1]))


def _features_last(tr, src: torch.Tensor, dst: torch.Tensor) -> None:
    """`dst` carries `src`'s last-dim features, laid out along its own last dim."""
    feats = along(tr.ids(src), -1, src.shape[-1], tr.uf)
    tr.set_ids(dst, feats.reshape([1] * (dst.dim() - 1) + [-1]))


def pack(tr, call):
    """pack_padded_sequence: (B, T, C) or (T, B, C) -> (sum of lengths, C); features stay last."""
    data, *rest = tensors_in(call.out)
    _features_last(tr, call.args[0], data)
    for t in rest:  # batch sizes, sort indices: no channels
        tr.set_opaque(t)
    tr.add_node(call)


def unpack(tr, call):
    """pad_packed_sequence: (sum of lengths, C) -> (B, T, C) or (T, B, C); features stay last."""
    padded, *rest = tensors_in(call.out)
    _features_last(tr, call.args[0], padded)
    for t in rest:
        tr.set_opaque(t)
    tr.add_node(call)


register_rule("_pack_padded_sequence", pack)
register_rule("_pad_packed_sequence", unpack)
for _name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
    register_rule(_name, recurrent)
