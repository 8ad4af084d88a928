"""nn.MultiheadAttention: whole heads are pruned together with a block of the query's stream."""
import copy

import torch
from torch import nn

from prunekit.cost.macs import count_cost, estimate_cost
from prunekit.graph import build_graph
from prunekit.surgery.shrink import remove_channels_
from prunekit.testing.checks import check_removal_matches_zeroing
from prunekit.testing.toy_models import AttentionHeads, TransformerMHA

X = torch.randn(2, 6, 5)


def test_heads_form_one_group_with_the_query_stream():
    torch.manual_seed(0)
    model = AttentionHeads(dim=12, heads=3, memory=7)
    graph = build_graph(model, X)
    stream = graph.group("embed")
    assert stream.size == 3 and bool(stream.prunable.all())  # one channel per head
    names = {m.qualname for m in stream.members}
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "attn.bias_k", "cross.q_proj_weight",
            "cross.k_proj_weight", "cross.out_proj.weight"} <= names
    memory = graph.group("mem")  # kdim/vdim of the cross-attention are free channels
    assert memory.size == 7 and {"cross.k_proj_weight", "cross.v_proj_weight"} <= {m.qualname for m in memory.members}


def test_removing_a_head_is_exact_and_updates_the_module():
    torch.manual_seed(0)
    model = AttentionHeads(dim=12, heads=3, memory=7).eval()
    graph = build_graph(model, X)
    removal = {"embed": [1], "mem": [0, 4]}
    check_removal_matches_zeroing(model, X, graph, removal)
    pruned = copy.deepcopy(model)
    remove_channels_(pruned, graph, removal)
    for attn in (pruned.attn, pruned.cross):
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (8, 2, 4)
    assert (pruned.attn.kdim, pruned.cross.kdim, pruned.cross.vdim) == (8, 5, 5)
    assert pruned.attn.bias_k.shape == (1, 1, 8)


def test_pruned_attention_runs_on_the_fused_inference_path():
    """Eval + no_grad lets nn.MultiheadAttention take its fused kernel, which reads the
    module's attributes: it must agree with the Python path on the pruned module."""
    torch.manual_seed(0)
    model = TransformerMHA(dim=16).eval()
    graph = build_graph(model, X)
    pruned = copy.deepcopy(model)
    remove_channels_(pruned, graph, {"embed": [0, 2]})
    h = torch.randn(2, 6, 8)
    with torch.no_grad():
        fused = pruned.attn(h, h, h, need_weights=False)[0]
    python = pruned.attn(h, h, h, need_weights=False)[0]
    assert torch.allclose(fused, python, atol=1e-5)


def test_estimated_cost_equals_recount_after_head_removal():
    torch.manual_seed(0)
    model = AttentionHeads(dim=12, heads=3, memory=7)
    graph = build_graph(model, X)
    removal = {"embed": [0], "mem": [2, 3, 6]}
    params, macs = estimate_cost(model, graph, removal)
    remove_channels_(model, graph, removal)
    after = count_cost(model, X)
    assert (params, macs) == (after.params, after.macs)


def test_mha_macs_match_a_hand_count():
    dim, heads, L, B = 8, 2, 5, 3
    model = nn.Sequential(nn.Linear(4, dim))
    attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.attn = model, attn

        def forward(self, x):
            h = self.proj(x)
            return self.attn(h, h, h)[0]

    cost = count_cost(Net(), torch.randn(B, L, 4))
    per_sample = L * 4 * dim + 4 * L * dim * dim + 2 * L * L * dim  # proj, q/k/v/out, QK^T and AV
    assert cost.macs == per_sample


def test_three_dimensional_mask_keeps_the_heads():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.attn = nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.embed(x)
            mask = torch.zeros(x.shape[0] * 2, x.shape[1], x.shape[1])
            return self.attn(h, h, h, attn_mask=mask)[0]

    graph = build_graph(Masked(), X)
    assert not bool(graph.group("embed").prunable.any())


def test_head_pruned_model_saves_and_reloads_on_a_fresh_module(tmp_path):
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.surgery.persist import load_pruned, save_pruned

    torch.manual_seed(0)
    model = AttentionHeads(dim=12, heads=3, memory=7).eval()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.4), X)
    assert model.attn.num_heads < 3
    path = save_pruned(model, result.plan, tmp_path / "heads.safetensors")
    torch.manual_seed(1)
    again = load_pruned(AttentionHeads(dim=12, heads=3, memory=7), path).eval()
    assert (again.attn.num_heads, again.cross.kdim) == (model.attn.num_heads, model.cross.kdim)
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_probing_a_single_head_layer_does_not_empty_it():
    """With one head, a layer feeding only that head is wholly one channel of the group: probing
    must try another channel instead of reporting the group as broken."""
    from prunekit.surgery.verify import probe_groups

    class OneHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 7, 1), nn.Conv2d(7, 10, 1)
            self.attn = nn.MultiheadAttention(7, 1, batch_first=True)
            self.out, self.head = nn.Conv2d(17, 17, 1, groups=17), nn.Linear(17, 5)

        def forward(self, x):
            h = self.a(x)
            t = h.flatten(2).transpose(1, 2)
            t = t + self.attn(t, t, t)[0]
            y = torch.cat([t.transpose(1, 2).reshape_as(h), self.b(h)], 1)
            return self.head(self.out(y).mean((2, 3)))

    torch.manual_seed(0)
    model, x = OneHead().eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    assert bool(graph.group("a").prunable.all())
    assert probe_groups(model, x, graph) == {}


def test_pruned_transformer_encoder_agrees_with_its_fused_kernel():
    """nn.TransformerEncoderLayer runs a fused kernel in eval + no_grad that reads embed_dim and
    num_heads; after head pruning it must agree with the Python path."""
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(5, 16), nn.Linear(16, 3)
            layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.head(self.enc(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    prune_(model, MagnitudeConfig(channel_ratio=0.5), X)
    assert model.enc.layers[0].self_attn.num_heads == 2
    with torch.no_grad():
        fused = model(X)
    assert torch.allclose(fused, model(X).detach(), atol=1e-5)


class UsesAttentionWeights(nn.Module):
    """The attention map (averaged over the heads) is read downstream, as in attention pooling."""

    def __init__(self, need_weights: bool = True):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)
        self.need_weights = need_weights

    def forward(self, x):
        h = self.embed(x)
        out, weights = self.attn(h, h, h, need_weights=self.need_weights)
        pooled = self.head(out).mean(1)
        return pooled if weights is None else pooled + weights.sum(1)[:, :2]


def test_attention_weights_averaged_over_the_heads_leave_the_heads_to_probing():
    """Averaged weights change when a head goes (its uniform map when zeroed, and the divisor):
    the heads cannot be vouched for by the trace, and probing keeps them."""
    from prunekit.surgery.verify import build_safe_graph

    torch.manual_seed(0)
    model = UsesAttentionWeights().eval()
    graph = build_graph(model, X)
    assert not graph.group("embed").proven
    assert not build_safe_graph(model, X).group("embed").prunable.any()


def test_heads_without_returned_weights_are_vouched_for():
    torch.manual_seed(0)
    model = UsesAttentionWeights(need_weights=False).eval()
    graph = build_graph(model, X)
    assert graph.group("embed").prunable.all() and graph.group("embed").proven
    check_removal_matches_zeroing(model, X, graph, {"embed": [1]})


class WholeTransformer(nn.Module):
    """nn.Transformer checks its inputs' width against its d_model attribute (it holds no tensor)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.t = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.t(h, h)).mean(1)


def test_nn_transformer_d_model_follows_its_pruned_layers(tmp_path):
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.surgery.persist import load_pruned, save_pruned

    torch.manual_seed(0)
    model, x = WholeTransformer().eval(), torch.randn(2, 5, 8)
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)
    assert model.t.d_model == model.emb.out_features == 16
    assert result.cost_after.params < result.cost_before.params
    path = save_pruned(model, result.plan, tmp_path / "t.safetensors")
    torch.manual_seed(1)
    fresh = load_pruned(WholeTransformer(), path).eval()
    assert fresh.t.d_model == 16
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
