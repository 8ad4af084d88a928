"""The core's channel criteria against an independent NumPy port.

The network is conv(2->4, 3x3) -> BatchNorm2d -> ReLU -> flatten -> Linear(36 -> 3) on 3x3 inputs,
with signed random norm scales and random running statistics. The group of the conv's 4 output
channels has five parameter members: the conv's filters (dim 0) and bias, the norm's scale and
shift, and the Linear's 9 input columns per channel (dim 1). The port writes every score, and the
loss gradients that Taylor reads, out by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.importance.context import ScoreContext
from prunekit.importance.criteria import CRITERIA

EPS = 1e-5  # BatchNorm2d's default


def _net() -> nn.Sequential:
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.7, -1.3, 0.2, -0.4]))  # signed: |gamma| must be taken
        m[1].bias.copy_(torch.randn(4) * 0.3)
        m[1].running_mean.copy_(torch.randn(4) * 0.2)
        m[1].running_var.copy_(torch.rand(4) + 0.5)
    return m.eval()


def _batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 2, 3, 3, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (6, 3)]


def _numpy(m):
    p = {k: v.detach().double().numpy().copy() for k, v in m.state_dict().items()}
    return p["0.weight"], p["0.bias"], p["1.weight"], p["1.bias"], p["1.running_mean"], p["1.running_var"], \
        p["4.weight"], p["4.bias"]


def _conv(x, w, b):
    """3x3 conv, padding 1, stride 1, written out: (N, C, H, W) -> (N, O, H, W)."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = np.einsum("nckl,ockl->no", xp[:, :, i:i + 3, j:j + 3], w) + b
    return out, xp


def _forward_backward(m, batches):
    """Hand-written gradients of the summed per-batch mean cross-entropy, eval-mode norm."""
    w0, b0, gam, beta, mu, var, w4, b4 = _numpy(m)
    grads = {k: np.zeros_like(v) for k, v in zip(("0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"),
                                                 (w0, b0, gam, beta, w4, b4))}
    means = []
    for x, y in batches:
        x, y = x.double().numpy(), y.numpy()
        n = len(y)
        a, xp = _conv(x, w0, b0)
        means.append(np.abs(a).mean((0, 2, 3)))
        xhat = (a - mu[:, None, None]) / np.sqrt(var + EPS)[:, None, None]
        z = xhat * gam[:, None, None] + beta[:, None, None]
        h = np.maximum(z, 0)
        f = h.reshape(n, 36)
        logits = f @ w4.T + b4
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dl = (p - np.eye(3)[y]) / n
        grads["4.weight"] += dl.T @ f
        grads["4.bias"] += dl.sum(0)
        dz = (dl @ w4).reshape(h.shape) * (z > 0)
        grads["1.weight"] += (dz * xhat).sum((0, 2, 3))
        grads["1.bias"] += dz.sum((0, 2, 3))
        da = dz * (gam / np.sqrt(var + EPS))[:, None, None]
        grads["0.bias"] += da.sum((0, 2, 3))
        for kh in range(3):
            for kw in range(3):
                grads["0.weight"][:, :, kh, kw] += np.einsum("nohw,nchw->oc", da, xp[:, :, kh:kh + 3, kw:kw + 3])
    return grads, np.mean(means, 0)


def _per_member(values):
    """One row per member of the conv's group: the five parameter tensors reduced to 4 channels."""
    w0, b0, gam, beta, w4 = values
    return np.stack([w0.sum((1, 2, 3)), b0, gam, beta, w4.reshape(3, 4, 9).sum((0, 2))])


def _reduce(rows, how):
    return {"mean": rows.mean(0), "sum": rows.sum(0), "max": rows.max(0)}[how]


def _score(name, m, how="mean"):
    graph = build_graph(m, torch.zeros(1, 2, 3, 3))
    group = graph.group("0")
    members = {(t.qualname, t.role, t.dim) for t in group.tensor_members() if "running" not in t.qualname}
    assert members == {("0.weight", "out", 0), ("0.bias", "out", 0), ("1.weight", "through", 0),
                       ("1.bias", "through", 0), ("4.weight", "in", 1)}  # the members the port reduces
    ctx = ScoreContext(m, batches=_batches(), reduction=how, graph=graph)
    return CRITERIA.get(name)(group, ctx).double().numpy()


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_l1_l2_equal_numpy(how):
    m = _net()
    w0, b0, gam, beta, _, _, w4, _ = _numpy(m)
    params = (w0, b0, gam, beta, w4)
    np.testing.assert_allclose(_score("l1", m, how), _reduce(_per_member([np.abs(v) for v in params]), how), rtol=1e-5)
    np.testing.assert_allclose(_score("l2", m, how), np.sqrt(_reduce(_per_member([v ** 2 for v in params]), how)),
                               rtol=1e-5)


def test_bn_scale_is_the_absolute_norm_scale():
    m = _net()
    np.testing.assert_allclose(_score("bn_scale", m), [0.7, 1.3, 0.2, 0.4], rtol=1e-6)


def test_fpgm_is_the_summed_distance_between_producer_filters():
    m = _net()
    rows = _numpy(m)[0].reshape(4, 18)
    dist = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(_score("fpgm", m), dist.sum(1), rtol=1e-5)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_taylor_is_the_absolute_channel_sum_of_weight_times_gradient(how):
    m = _net()
    w0, b0, gam, beta, _, _, w4, _ = _numpy(m)
    g, _ = _forward_backward(m, _batches())
    prods = [w0 * g["0.weight"], b0 * g["0.bias"], gam * g["1.weight"], beta * g["1.bias"], w4 * g["4.weight"]]
    expected = _reduce(np.abs(_per_member(prods)), how)  # |sum over a channel| per member, then reduced
    np.testing.assert_allclose(_score("taylor", m, how), expected, rtol=1e-4, atol=1e-9)
    assert not m.training


def test_activation_is_the_mean_absolute_conv_output():
    m = _net()
    _, mean_abs = _forward_backward(m, _batches())  # per batch: mean over samples and positions; then over batches
    np.testing.assert_allclose(_score("activation", m), mean_abs, rtol=1e-5)


def test_fpgm_and_activation_score_a_float64_model():
    m = _net().double()
    batches = [(x.double(), y) for x, y in _batches()]
    graph = build_graph(m, torch.zeros(1, 2, 3, 3, dtype=torch.float64))
    ctx = ScoreContext(m, batches=batches, graph=graph)
    rows = _numpy(m)[0].reshape(4, 18)
    dist = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(CRITERIA.get("fpgm")(graph.group("0"), ctx).numpy(), dist.sum(1), rtol=1e-10)
    _, mean_abs = _forward_backward(m, batches)
    np.testing.assert_allclose(CRITERIA.get("activation")(graph.group("0"), ctx).numpy(), mean_abs, rtol=1e-10)


def test_fpgm_concatenates_the_filters_of_a_channel_spanning_a_conv_group():
    """A grouped conv makes each of its conv groups one channel: the 2 filters of the first conv and
    the 2 of the grouped conv that a channel holds are laid side by side, not added up."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(2, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(),
                      nn.Flatten(), nn.Linear(72, 3)).eval()
    graph = build_graph(m, torch.zeros(1, 2, 3, 3))
    group = graph.group("0")
    assert group.size == 4
    w0, w2 = m[0].weight.detach().double().numpy(), m[2].weight.detach().double().numpy()
    rows = np.concatenate([w0.reshape(4, 2 * 2), w2.reshape(4, 2 * 2 * 9)], 1)  # filters 2c, 2c+1 of each conv
    dist = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
    got = CRITERIA.get("fpgm")(group, ScoreContext(m, graph=graph)).double().numpy()
    np.testing.assert_allclose(got, dist.sum(1), rtol=1e-5)
