"""Channel rule for nn.MultiheadAttention (`F.multi_head_attention_forward`): whole heads.

The module ties three widths to one number, `embed_dim`: the query's features, the inner
q/k/v width (num_heads x head_dim) and the output. Removing a head therefore removes head_dim
inner channels *and* head_dim channels of the stream the query comes from (the out-projection
writes back into that stream). The rule couples inner channel j with query channel j and joins
each head's channels into one class, so one pruned channel of the group is one head together
with a block of head_dim stream channels; head_dim stays as it was, so the softmax scale does
not change and removal equals zeroing the head's q/k/v rows, the stream channels' columns and
the out-projection's rows and columns.

Key and value share that coupling when the projection is packed (kdim == vdim == embed_dim);
with separate projections their own widths (kdim, vdim) are free channels of their streams.
Heads stay fixed when an input names them: a 3-D attention mask (one row per batch x head) or
per-head attention weights returned (`average_attn_weights=False`). Weights averaged over the heads
change when a head goes (a zeroed head attends uniformly, and the mean has one term less); the
rule cannot see whether the model reads them, so those heads are left to probing.
"""
from __future__ import annotations

import torch

from .ids import along
from .rules import register_rule
from .rules_tensor import _fix_all


def multi_head_attention(tr, call):
    query, key, value = call.args[0], call.args[1], call.args[2]
    E, H = int(call.arg(3, "embed_dim_to_check")), int(call.arg(4, "num_heads"))
    in_w, in_b = call.arg(5, "in_proj_weight"), call.arg(6, "in_proj_bias")
    bias_k, bias_v = call.arg(7, "bias_k"), call.arg(8, "bias_v")
    out_w, out_b = call.arg(11, "out_proj_weight"), call.arg(12, "out_proj_bias")
    attn_mask = call.arg(16, "attn_mask")
    separate = bool(call.arg(17, "use_separate_proj_weight", False))
    q_w, k_w, v_w = call.arg(18, "q_proj_weight"), call.arg(19, "k_proj_weight"), call.arg(20, "v_proj_weight")
    need_weights, average = bool(call.arg(15, "need_weights", True)), bool(call.arg(23, "average_attn_weights", True))
    static = call.arg(21, "static_k") is not None or call.arg(22, "static_v") is not None
    weights = [q_w, k_w, v_w] if separate else [in_w]
    named = [tr.tensor_name(t) for t in weights + [out_w]]
    out = call.out[0]
    L, S = query.shape[0], key.shape[0]
    B = query.shape[1] if query.dim() == 3 else 1
    if tr.sequence_shape is None:  # the functional form always takes (L, B, E)
        tr.sequence_shape = (int(L), int(B))
    kdim, vdim = key.shape[-1], value.shape[-1]
    # q/out projections L*E*E each, k/v projections S*E*kdim and S*E*vdim, QK^T and AV L*keys*E each
    parts = [B * L * E * E, B * S * E * kdim, B * S * E * vdim, B * L * E * out_w.shape[0],
             2 * B * L * _keys_attended(call, S) * E]
    if any(n is None for n in named) or static or E % H:
        _fix_all(tr, call)  # computed (masked) projections or precomputed keys: keep everything, count the MACs
        return tr.add_node(call, macs=sum(parts))

    inner = tr.new_space(f"{named[0][0]}.{named[0][1]}", E)  # q/k/v channel j of the heads
    q_ids = along(tr.ids(query), -1, E, tr.uf)
    k_ids = along(tr.ids(key), -1, kdim, tr.uf)
    v_ids = along(tr.ids(value), -1, vdim, tr.uf)
    tr.uf.union_pairs(inner, q_ids)
    if not separate:
        tr.uf.union_pairs(inner, k_ids)
        tr.uf.union_pairs(inner, v_ids)
    for h in range(H):  # a head goes as a whole: head_dim (and the softmax scale) are kept
        tr.uf.union_all(inner[h * (E // H):(h + 1) * (E // H)])
    if (attn_mask is not None and attn_mask.dim() == 3) or (need_weights and not average):
        tr.uf.mark_fixed(inner)
    elif need_weights:  # the map averaged over the heads changes when one goes: probed if read
        tr.unproven_ids.append(inner)

    if separate:
        for (mod, name), cols in zip(named[:3], (q_ids, k_ids, v_ids)):
            tr.add_member(mod, name, 0, inner, "out")
            tr.add_member(mod, name, 1, cols, "in")
    else:
        tr.add_member(*named[0], 0, inner.repeat(3), "out")
        tr.add_member(*named[0], 1, q_ids, "in")
    if in_b is not None and tr.tensor_name(in_b) is not None:
        tr.add_member(*tr.tensor_name(in_b), 0, inner.repeat(3), "out")
    for b in (bias_k, bias_v):
        if b is not None and tr.tensor_name(b) is not None:
            tr.add_member(*tr.tensor_name(b), b.dim() - 1, inner, "out")
    produced = tr.new_space(f"{named[-1][0]}.{named[-1][1]}", out_w.shape[0])
    tr.add_member(*named[-1], 0, produced, "out")
    tr.add_member(*named[-1], 1, inner, "in")
    if out_b is not None and tr.tensor_name(out_b) is not None:
        tr.add_member(*tr.tensor_name(out_b), 0, produced, "out")
    shape = [1] * out.dim()
    shape[-1] = out_w.shape[0]
    tr.set_ids(out, produced.reshape(shape))
    if isinstance(call.out[1], torch.Tensor):  # attention weights: no channel dim (or fixed heads)
        tr.set_opaque(call.out[1])

    # every term shrinks with the kept fraction of the channels it runs over
    terms = list(zip(parts, [[inner, q_ids], [inner, k_ids], [inner, v_ids], [inner, produced], [inner]]))
    tr.add_node(call, macs=sum(m for m, _ in terms), terms=terms)


def _keys_attended(call, S: int) -> int:
    """Keys each query attends over: the S keys given (or the precomputed static ones), plus one
    key that bias_k appends and one that add_zero_attn appends."""
    static_k = call.arg(21, "static_k")
    keys = static_k.shape[1] if static_k is not None else S + (call.arg(7, "bias_k") is not None)
    return keys + bool(call.arg(9, "add_zero_attn", False))


register_rule("multi_head_attention_forward", multi_head_attention)
