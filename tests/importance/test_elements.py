"""Per-weight scores against hand computations, exact selection, masks that survive training."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError, PruningError
from prunekit.graph import build_graph
from prunekit.importance.elements import (apply_element_masks, channel_scores_from_elements, grasp_scores,
                                          magnitude_scores, random_scores, select_element_masks, snip_scores,
                                          synflow_scores)


def _net(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).double()


def _batches(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g))
            for _ in range(n)]


def _numpy_grads(w1, b1, w2, b2, batches, temperature=1.0):
    """dL/dW1, dL/dW2 of L = sum over batches of mean cross-entropy(logits / T), written out by hand."""
    g1, g2 = np.zeros_like(w1), np.zeros_like(w2)
    for x, y in batches:
        x, y = x.numpy(), y.numpy()
        h = np.tanh(x @ w1.T + b1)                      # (N, 4)
        z = (h @ w2.T + b2) / temperature               # (N, 2)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - np.eye(2)[y]) / len(y) / temperature  # dL/dlogits, (N, 2)
        g2 += dz.T @ h
        dh = (dz @ w2) * (1 - h ** 2)
        g1 += dh.T @ x
    return g1, g2


def _params(m):
    return [t.detach().numpy().copy() for t in (m[0].weight, m[0].bias, m[2].weight, m[2].bias)]


def test_snip_equals_hand_computation():
    m, batches = _net(), _batches()
    w1, b1, w2, b2 = _params(m)
    g1, g2 = _numpy_grads(w1, b1, w2, b2, batches)
    s = snip_scores(m, batches)
    np.testing.assert_allclose(s["0.weight"].numpy(), np.abs(w1 * g1), rtol=1e-10)
    np.testing.assert_allclose(s["2.weight"].numpy(), np.abs(w2 * g2), rtol=1e-10)
    assert m.training  # the model's mode is restored


@pytest.mark.parametrize("frozen", [("0.weight",), ("0.weight", "0.bias", "2.weight", "2.bias")])
def test_gradient_scores_of_frozen_weights_equal_the_hand_computation(frozen):
    """A frozen weight (requires_grad=False, e.g. a fine-tuned backbone) still has a loss gradient:
    SNIP and GraSP score it as if it were trainable, and the flags are left as they were."""
    m, batches = _net(), _batches()
    w1, b1, w2, b2 = _params(m)
    g1, g2 = _numpy_grads(w1, b1, w2, b2, batches)
    want_grasp = grasp_scores(m, batches, temperature=1.0)
    for name, p in m.named_parameters():
        p.requires_grad_(name not in frozen)
    s = snip_scores(m, batches)
    np.testing.assert_allclose(s["0.weight"].numpy(), np.abs(w1 * g1), rtol=1e-10)
    np.testing.assert_allclose(s["2.weight"].numpy(), np.abs(w2 * g2), rtol=1e-10)
    got_grasp = grasp_scores(m, batches, temperature=1.0)
    for k in want_grasp:
        torch.testing.assert_close(got_grasp[k], want_grasp[k], rtol=1e-10, atol=0)
    assert all(p.requires_grad == (n not in frozen) for n, p in m.named_parameters())
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_grasp_equals_finite_difference_of_hand_gradient_and_full_hessian(temperature):
    m, batches = _net(1), _batches(1)
    w1, b1, w2, b2 = _params(m)
    g1, g2 = _numpy_grads(w1, b1, w2, b2, batches, temperature)
    eps = 1e-5  # central difference of the gradient along g: H g (biases fixed, as GraSP differentiates weights)
    p1, p2 = _numpy_grads(w1 + eps * g1, b1, w2 + eps * g2, b2, batches, temperature)
    q1, q2 = _numpy_grads(w1 - eps * g1, b1, w2 - eps * g2, b2, batches, temperature)
    hg1, hg2 = (p1 - q1) / (2 * eps), (p2 - q2) / (2 * eps)
    s = grasp_scores(m, batches, temperature=temperature)
    np.testing.assert_allclose(s["0.weight"].numpy(), w1 * hg1, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s["2.weight"].numpy(), w2 * hg2, rtol=1e-5, atol=1e-12)

    def loss(a, b):  # the same loss as a function of the two weights only, for the full Hessian
        tot = 0
        for x, y in batches:
            h = torch.tanh(x @ a.T + m[0].bias.detach())
            tot = tot + nn.functional.cross_entropy((h @ b.T + m[2].bias.detach()) / temperature, y)
        return tot
    W = (m[0].weight.detach(), m[2].weight.detach())
    H = torch.autograd.functional.hessian(loss, W)
    n1, n2 = W[0].numel(), W[1].numel()
    full = torch.cat([torch.cat([H[i][j].reshape(W[i].numel(), W[j].numel()) for j in range(2)], 1) for i in range(2)])
    g = torch.from_numpy(np.concatenate([g1.ravel(), g2.ravel()]))
    hg = full @ g
    torch.testing.assert_close(s["0.weight"].flatten(), W[0].flatten() * hg[:n1])
    torch.testing.assert_close(s["2.weight"].flatten(), W[1].flatten() * hg[n1:n1 + n2])


@pytest.mark.parametrize("score", [grasp_scores, snip_scores])
def test_gradient_scores_of_a_float16_model_equal_the_float32_ones(score):
    """GraSP's w * H g at temperature 200 is about 1e-10 here: float16 holds nothing below 6e-8, so
    the scores of a float16 model were zero for nearly every weight and its masks were chosen by
    ties. A float16 model is scored in float32: the scores equal those of its float32 twin."""
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).half().float()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=g).half().float(), torch.randint(0, 4, (8,), generator=g))]
    half = copy.deepcopy(wide).half()
    want = score(wide, batches)
    got = score(half, [(x.half(), y) for x, y in batches])
    assert all(p.dtype == torch.float16 for p in half.parameters())  # the model itself stays float16
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k])
    masks = select_element_masks(got, 0.5)
    assert all(torch.equal(masks[k], select_element_masks(want, 0.5)[k]) for k in want)


def _synflow_closed_form(w1, b1, w2, b2, m1=None, m2=None):
    """Scores of the linearised net |W2| (|W1| 1 + |b1|) + |b2| with masks, by hand."""
    a1, a2 = np.abs(w1) * (1 if m1 is None else m1), np.abs(w2) * (1 if m2 is None else m2)
    h = a1.sum(1) + np.abs(b1)                  # (4,): positive, so the ReLU passes it
    dr_dw2 = np.broadcast_to(h, a2.shape)      # dR/dW2[k, i] = h_i
    dr_dw1 = np.broadcast_to(a2.sum(0)[:, None], a1.shape)  # dR/dW1[i, j] = sum_k |W2[k, i]| * 1
    return a1 * dr_dw1, a2 * dr_dw2


def test_synflow_single_round_equals_closed_form_and_leaves_model_unchanged():
    m = _net(2, nn.ReLU)
    state = copy.deepcopy(m.state_dict())
    s = synflow_scores(m, example_inputs=torch.randn(7, 3))
    e1, e2 = _synflow_closed_form(*_params(m))
    np.testing.assert_allclose(s["0.weight"].numpy(), e1, rtol=1e-12)
    np.testing.assert_allclose(s["2.weight"].numpy(), e2, rtol=1e-12)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("frozen", [("0.weight",), ("0.weight", "0.bias", "2.weight", "2.bias")])
def test_synflow_of_frozen_weights_and_without_autograd_equals_closed_form(frozen):
    """SynFlow is data-free and reads no training flag: a frozen weight, or a call inside
    torch.no_grad(), scores as the closed form says, and the flags are left as they were."""
    m = _net(2, nn.ReLU)
    e1, e2 = _synflow_closed_form(*_params(m))
    for name, p in m.named_parameters():
        p.requires_grad_(name not in frozen)
    s = synflow_scores(m, input_shape=(3,))
    np.testing.assert_allclose(s["0.weight"].numpy(), e1, rtol=1e-12)
    np.testing.assert_allclose(s["2.weight"].numpy(), e2, rtol=1e-12)
    with torch.no_grad():
        s = synflow_scores(m, input_shape=(3,), sparsity=0.5, iterations=2)
    assert int(sum(v.sum() for v in select_element_masks(s, 0.5).values())) == (12 + 8) // 2
    assert all(p.requires_grad == (n not in frozen) for n, p in m.named_parameters())
    assert all(p.grad is None for p in m.parameters())


def test_iterative_synflow_equals_hand_rolled_schedule():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).double()
    w1, b1, w2, b2 = _params(m)
    sparsity, rounds = 0.8, 4
    m1, m2 = np.ones_like(w1), np.ones_like(w2)
    total = w1.size + w2.size
    for k in range(1, rounds + 1):
        s1, s2 = _synflow_closed_form(w1, b1, w2, b2, m1, m2)
        s1, s2 = np.where(m1 > 0, s1, -np.inf), np.where(m2 > 0, s2, -np.inf)
        keep_n = total - int(np.floor((1 - (1 - sparsity) ** (k / rounds)) * total + 0.5))
        flat = np.concatenate([s1.ravel(), s2.ravel()])
        keep = np.zeros(total, bool)
        keep[np.argsort(-flat, kind="stable")[:keep_n]] = True
        m1, m2 = keep[: w1.size].reshape(w1.shape) * 1.0, keep[w1.size:].reshape(w2.shape) * 1.0
    scores = synflow_scores(m, input_shape=(6,), sparsity=sparsity, iterations=rounds)
    masks = select_element_masks(scores, sparsity)
    assert np.array_equal(masks["0.weight"].numpy(), m1 > 0) and np.array_equal(masks["2.weight"].numpy(), m2 > 0)
    assert int(sum(v.sum() for v in masks.values())) == total - int(np.floor(sparsity * total + 0.5))


def test_synflow_with_batchnorm_is_finite_and_needs_a_shape():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    s = synflow_scores(m, [(torch.randn(2, 3, 6, 6), torch.zeros(2))], sparsity=0.5, iterations=3)
    assert set(s) == {"0.weight", "3.weight"} and m.training
    assert int(sum(v.sum() for v in select_element_masks(s, 0.5).values())) == (108 + 8) // 2
    with pytest.raises(ConfigError, match="input shape"):
        synflow_scores(m)
    # batches of inputs alone (no labels) give the same shape: the batch, not its first sample
    bare = synflow_scores(m, [torch.randn(2, 3, 6, 6)], sparsity=0.5, iterations=3)
    assert all(torch.equal(bare[k], s[k]) for k in s)


def test_magnitude_and_random_scores():
    m = _net()
    assert torch.equal(magnitude_scores(m)["2.weight"], m[2].weight.detach().abs())
    a, b = random_scores(m, seed=4), random_scores(m, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["0.weight"], random_scores(m)["0.weight"])


def test_global_selection_is_exact_and_never_empties_a_tensor():
    scores = {"a": torch.arange(10.0), "b": torch.full((3,), -1.0), "c": torch.tensor([5.0, 5.0, 5.0, 5.0])}
    masks = select_element_masks(scores, 0.5)  # 17 weights, 9 removed (8.5 rounds up), 8 kept
    assert sum(int(v.sum()) for v in masks.values()) == 8
    assert masks["b"].tolist() == [True, False, False]  # its best (first of the ties) is kept
    # the rest by rank, ties by position: a's 8, 7, 6, 5, then c's second 5.0
    assert masks["a"].tolist() == [False] * 5 + [True] * 5
    assert masks["c"].tolist() == [True, True, False, False]
    with pytest.raises(PruningError, match="fewer than one for each"):
        select_element_masks(scores, 0.95)


def test_iterative_synflow_names_the_sparsity_asked_when_it_cannot_keep_a_weight_per_tensor():
    m = nn.Sequential(nn.Conv2d(3, 1, 3), nn.ReLU(), nn.Conv2d(1, 4, 3))  # 27 + 36 weights
    with pytest.raises(PruningError, match=r"sparsity 0\.99 keeps 1 of 63 weights, fewer than one for each of the 2 "
                                           r"tensors; use a sparsity of at most 0\.9761"):
        synflow_scores(m, example_inputs=torch.randn(1, 3, 8, 8), sparsity=0.99, iterations=10)


def test_global_selection_ranks_mixed_dtypes_at_the_widest():
    """A float64 tensor after a float32 one is ranked in float64: no overflow to inf, no ties
    made by rounding (hand-ranked: each tensor's best first, then the highest of the rest)."""
    a = torch.tensor([1.0, 2.0])
    huge = torch.tensor([1e300, 3e300, 2e300], dtype=torch.float64)
    close = 1.0 + torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64) * 1e-12
    for b, want_b, want_a in ((huge, [False, True, True], [False, True]),
                              (close, [True, False, True], [False, True])):
        masks = select_element_masks({"a": a, "b": b}, 0.4)  # 5 weights, 2 removed, 3 kept
        assert masks["b"].tolist() == want_b and masks["a"].tolist() == want_a


def test_layer_selection_is_exact_per_tensor():
    torch.manual_seed(0)
    scores = {"a": torch.randn(4, 5), "b": torch.randn(7), "c": torch.randn(1)}
    masks = select_element_masks(scores, 0.3, scope="layer")
    assert [int(masks[k].sum()) for k in "abc"] == [14, 5, 1]  # 20 - 6, 7 - 2, never 0
    for k in "ab":  # the kept ones are the best ones
        assert float(scores[k][masks[k]].min()) >= float(scores[k][~masks[k]].max())
    with pytest.raises(ConfigError, match="sparsity"):
        select_element_masks(scores, 1.0)


def test_masks_persist_through_sgd_with_momentum_and_weight_decay():
    m, batches = _net(), _batches()
    masks = select_element_masks(snip_scores(m, batches), 0.6)
    assert apply_element_masks(m, masks) == 2
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for x, y in batches * 3:
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for key, keep in masks.items():
        w = m.get_submodule(key.split(".")[0]).weight
        assert bool((w[~keep] == 0).all()) and bool((w[keep] != 0).all())


def test_bad_masks_leave_the_model_alone():
    m = _net()
    with pytest.raises(PruningError, match="shape"):
        apply_element_masks(m, {"0.weight": torch.ones(4, 3, dtype=torch.bool), "2.weight": torch.ones(3)})
    assert type(m[0].weight) is nn.Parameter


def test_channel_scores_sum_members_and_reduce():
    m = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1, bias=False))
    graph = build_graph(m, torch.randn(1, 1, 4, 4))
    s = {"0.weight": torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1),
         "2.weight": torch.tensor([[1.0, 0.0, 4.0], [1.0, 0.0, 4.0]]).view(2, 3, 1, 1)}
    out = channel_scores_from_elements(graph, s, "sum")
    assert out["0"].tolist() == [1.0 + 2.0, 2.0 + 0.0, 3.0 + 8.0]
    assert channel_scores_from_elements(graph, s, "max")["0"].tolist() == [2.0, 2.0, 8.0]
    with pytest.raises(PruningError, match="not finite"):
        channel_scores_from_elements(graph, {"0.weight": torch.full((3, 1, 1, 1), float("-inf"))})


def test_synflow_channel_criterion_ranks_scores_beyond_float32():
    """Scaling every weight by c scales every SynFlow score by c ** depth and changes no ranking:
    with scores far beyond float32's range (as on a deep net) the channel criterion and a
    magnitude pruning by it must give what the unscaled net gives."""
    from prunekit.importance.context import ScoreContext
    from prunekit.importance.criteria import CRITERIA
    from prunekit.methods.magnitude import MagnitudeConfig, magnitude_prune_

    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(2, 8, 1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 3, 1, bias=False))
    big, c = copy.deepcopy(small), 1e16
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(c)
    x = torch.randn(1, 2, 3, 3)
    graph = build_graph(small, x)
    for group in graph.prunable_groups():
        want = CRITERIA.get("synflow")(group, ScoreContext(small, example_inputs=x)).double()
        got = CRITERIA.get("synflow")(group, ScoreContext(big, example_inputs=x)).double()
        assert bool(torch.isfinite(got).all()) and float(got.max()) > 1e40
        np.testing.assert_allclose(got.numpy(), want.numpy() * c ** 3, rtol=1e-6)
    cfg = MagnitudeConfig(criterion="synflow", channel_ratio=0.5, round_to=None)
    magnitude_prune_(small, cfg, x)
    magnitude_prune_(big, cfg, x)
    for a, b in zip(small.parameters(), big.parameters()):
        assert a.shape == b.shape and torch.allclose(b / c, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: scores of a CUDA model")
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_element_masks_of_cuda_scores_equal_the_cpu_ones(scope):
    from prunekit.importance.element_masks import select_element_masks

    g = torch.Generator().manual_seed(0)
    scores = {"a.weight": torch.rand(6, 3, generator=g), "b.weight": torch.rand(4, 6, generator=g)}
    on_cpu = select_element_masks(scores, 0.6, scope)
    on_cuda = select_element_masks({k: v.cuda() for k, v in scores.items()}, 0.6, scope)
    assert all(m.device.type == "cuda" and torch.equal(m.cpu(), on_cpu[k]) for k, m in on_cuda.items())


class _ReluSixSigmoid(nn.Module):
    """hardsigmoid written as relu6(x + 3) / 6, which autograd can differentiate twice."""

    def forward(self, x):
        return nn.functional.relu6(x + 3) / 6


@pytest.mark.parametrize("inplace", [False, True])
def test_grasp_scores_a_model_with_hardsigmoid(inplace):
    """MobileNetV3's and GhostNet's squeeze-excitation gates use hardsigmoid, whose backward has no
    derivative in PyTorch: GraSP's Hessian-vector product failed with a bare RuntimeError. Scored
    as relu6(x + 3) / 6 (the same function), they equal the scores of that model."""
    def net(act):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), act, nn.Linear(4, 2)).double()

    batches = [(x * 4, y) for x, y in _batches()]
    got = grasp_scores(net(nn.Hardsigmoid(inplace=inplace)), batches, temperature=1.0)
    want = grasp_scores(net(_ReluSixSigmoid()), batches, temperature=1.0)
    for k in want:  # PyTorch's hardsigmoid backward multiplies by 1/6 in float32 precision
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
    assert any(bool(s.abs().gt(0).any()) for s in got.values())


def test_grasp_on_an_op_without_second_derivative_says_which_criteria_work():
    class _AtenHardsigmoid(nn.Module):
        def forward(self, x):
            return torch.ops.aten.hardsigmoid(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _AtenHardsigmoid(), nn.Linear(4, 2)).double()
    with pytest.raises(PruningError, match="second derivatives .*hardsigmoid_backward.* snip or synflow"):
        grasp_scores(model, _batches(), temperature=1.0)


def _bn_net(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    with torch.no_grad():  # non-trivial affine and running statistics, so the two modes differ
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m


def _bn_loss(m, batches, train: bool, temperature=1.0):
    """The summed loss as a function of the two Linear weights, BatchNorm written out: on the
    batch's mean and biased variance (training mode) or on the running statistics (eval mode);
    dropout off in both."""
    bn = m[1]
    b1, b2 = m[0].bias.detach(), m[4].bias.detach()

    def loss(w1, w2):
        total = 0
        for x, y in batches:
            a = x @ w1.T + b1
            mean, var = ((a.mean(0), a.var(0, unbiased=False)) if train
                         else (bn.running_mean, bn.running_var))
            h = torch.tanh((a - mean) / torch.sqrt(var + bn.eps) * bn.weight.detach() + bn.bias.detach())
            total = total + nn.functional.cross_entropy((h @ w2.T + b2) / temperature, y)
        return total
    return loss


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_snip_and_grasp_with_batchnorm_equal_the_written_out_loss_in_either_mode(mode):
    """score_mode="train" (as the GraSP reference code scores) normalises with the batch's
    statistics; eval with the running ones; dropout is off in both (GraSP's gradient and
    Hessian-vector passes must see one function). Either way the model's buffers and flags are
    left as they were, and the global random state is not drawn from."""
    m, batches = _bn_net(), _batches(2, n=2)
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    loss = _bn_loss(m, batches, train=mode == "train", temperature=2.0)
    w = (m[0].weight.detach().clone(), m[4].weight.detach().clone())
    a, b = w[0].clone().requires_grad_(), w[1].clone().requires_grad_()
    g = torch.autograd.grad(loss(a, b), (a, b))
    _, hg = torch.autograd.functional.hvp(loss, w, tuple(t.detach() for t in g))
    grads_t1 = [t.detach() for t in torch.autograd.grad(_bn_loss(m, batches, mode == "train")(a, b), (a, b))]

    rng = torch.get_rng_state()
    snip = snip_scores(m, batches, mode=mode)
    torch.testing.assert_close(snip["0.weight"], (w[0] * grads_t1[0]).abs(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(snip["4.weight"], (w[1] * grads_t1[1]).abs(), rtol=1e-10, atol=1e-14)
    grasp = grasp_scores(m, batches, temperature=2.0, mode=mode)
    torch.testing.assert_close(grasp["0.weight"], w[0] * hg[0], rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(grasp["4.weight"], w[1] * hg[1], rtol=1e-8, atol=1e-14)
    assert m.training and all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for n, buf in m.named_buffers():
        torch.testing.assert_close(buf, buffers[n], rtol=0, atol=0)


def test_training_mode_scoring_puts_back_a_buffer_the_forward_replaced():
    from prunekit.core.modes import scoring

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls = self.calls + 1  # a new tensor, not an in-place update
            return x

    m = Counter()
    held = m.calls
    with scoring(m, "train"):
        m(torch.ones(1))
        assert float(m.calls) == 1
    assert m.calls is held and float(m.calls) == 0


def test_the_score_mode_changes_the_scores_and_is_checked():
    m, batches = _bn_net(), _batches(2, n=1)
    assert not torch.allclose(snip_scores(m, batches, mode="train")["0.weight"],
                              snip_scores(m, batches, mode="eval")["0.weight"])
    with pytest.raises(ConfigError, match="mode='training'"):
        snip_scores(m, batches, mode="training")


def test_targets_take_a_class_a_list_of_classes_and_names_or_a_tuple():
    """docs/criteria.md: `targets=` takes module classes or names; a list holding a class was
    refused with a message asking for a class, and a bare class was a TypeError."""
    from prunekit.importance.elements import magnitude_scores
    from prunekit.importance.targets import target_weights
    from prunekit.models import create_model

    model = create_model("small_cnn", num_classes=10)
    for targets in (nn.Linear, [nn.Linear], (nn.Linear,)):
        assert list(target_weights(model, targets)) == ["fc.weight"]
    assert list(target_weights(model, [nn.Linear, "conv2.weight"])) == ["fc.weight", "conv2.weight"]
    assert list(magnitude_scores(model, targets=[nn.Linear])) == ["fc.weight"]
    for bad, match in ((5, "targets=5; give module classes"), ([5], "targets holds 5; give module classes")):
        with pytest.raises(ConfigError, match=match):
            target_weights(model, bad)
