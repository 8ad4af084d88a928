"""The architect against finite differences, on a tiny float64 supernet at 50% density."""
import torch
import torch.nn.functional as F

from prunekit.layers.sparse import set_density_, sparse_layers
from prunekit.methods.prdarts.architect import Architect
from prunekit.methods.prdarts.supernet import SuperNet


def _setup(seed=0):
    torch.manual_seed(seed)
    net = SuperNet(channels=2, num_classes=3, layers=3, steps=1, multiplier=1).double()
    set_density_(net, 0.5)  # masked network: top-k of fixed scores
    for _, m in sparse_layers(net):
        m.scores.requires_grad_(False)
    with torch.no_grad():
        for a in net.alphas():
            a.normal_(0, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    batch = lambda: (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    weights = [p for p in net.weight_parameters() if p.requires_grad]
    opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=3e-3)
    for p in weights:  # a momentum buffer, as after some weight steps
        opt.state[p]["momentum_buffer"] = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return net, opt, weights, batch(), batch()


def _unrolled_objective(net, opt, weights, train, val):
    """L_val(w', alpha) with w' = w - lr (m buf + grad L_train + wd w), computed directly."""
    group = opt.param_groups[0]
    original = [w.detach().clone() for w in weights]
    g = torch.autograd.grad(F.cross_entropy(net(train[0]), train[1]), weights, allow_unused=True)
    with torch.no_grad():
        for w, gi in zip(weights, g):
            gi = torch.zeros_like(w) if gi is None else gi
            w.sub_(group["lr"] * (gi + group["weight_decay"] * w + group["momentum"] * opt.state[w]["momentum_buffer"]))
        value = float(F.cross_entropy(net(val[0]), val[1]))
        for w, o in zip(weights, original):
            w.copy_(o)
    return value


def _finite_difference(net, opt, weights, train, val, eps=1e-7):
    grads = []
    for a in net.alphas():
        grad = torch.zeros_like(a)
        for i in range(a.numel()):
            with torch.no_grad():
                a.view(-1)[i] += eps
            up = _unrolled_objective(net, opt, weights, train, val)
            with torch.no_grad():
                a.view(-1)[i] -= 2 * eps
            down = _unrolled_objective(net, opt, weights, train, val)
            with torch.no_grad():
                a.view(-1)[i] += eps
            grad.view(-1)[i] = (up - down) / (2 * eps)
        grads.append(grad)
    return grads


def test_unrolled_alpha_gradient_matches_finite_differences():
    net, opt, weights, train, val = _setup()
    state = {k: v.detach().clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    # float64 allows a tiny finite-difference radius for the Hessian-vector product; DARTS's
    # r = 1e-2 is far too coarse for this 4-sample batch (BN statistics make it very curved)
    arch = Architect(net, unrolled=True, hvp_r=1e-6)
    got, _ = arch.gradient(train, val, opt)
    # the architect put every weight back exactly
    now = net.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    expect = _finite_difference(net, opt, weights, train, val)
    for g, e in zip(got, expect):
        assert e.abs().max() > 1e-4  # the check has signal
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_first_order_gradient_matches_finite_differences():
    net, opt, weights, train, val = _setup(3)
    got, _ = Architect(net, unrolled=False).gradient(None, val)
    eps = 1e-6
    for a, g in zip(net.alphas(), got):
        for i in range(0, a.numel(), 3):
            with torch.no_grad():
                a.view(-1)[i] += eps
                up = float(F.cross_entropy(net(val[0]), val[1]))
                a.view(-1)[i] -= 2 * eps
                down = float(F.cross_entropy(net(val[0]), val[1]))
                a.view(-1)[i] += eps
            assert abs((up - down) / (2 * eps) - float(g.view(-1)[i])) < 1e-6


def test_second_order_differs_from_first_order():
    net, opt, weights, train, val = _setup(1)
    first, _ = Architect(net, unrolled=False).gradient(train, val, opt)
    second, _ = Architect(net, unrolled=True).gradient(train, val, opt)
    assert any(not torch.allclose(f, s) for f, s in zip(first, second))


def test_unrolled_gradient_uses_each_parameter_groups_learning_rate():
    """Two weight groups with different learning rates: the lookahead moves each group by its own
    lr, so the implicit term weighs each group's share of the Hessian-vector product by it too."""
    net, opt, weights, train, val = _setup(2)
    half = len(weights) // 2
    grouped = torch.optim.SGD([{"params": weights[:half], "lr": 0.1}, {"params": weights[half:], "lr": 0.02}],
                              lr=0.1, momentum=0.9, weight_decay=3e-3)
    for p in weights:
        grouped.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"]
    got, _ = Architect(net, unrolled=True, hvp_r=1e-6).gradient(train, val, grouped)
    lrs = [grouped.param_groups[0]["lr"]] * half + [grouped.param_groups[1]["lr"]] * (len(weights) - half)

    def objective():
        original = [w.detach().clone() for w in weights]
        g = torch.autograd.grad(F.cross_entropy(net(train[0]), train[1]), weights, allow_unused=True)
        with torch.no_grad():
            for w, gi, lr in zip(weights, g, lrs):
                gi = torch.zeros_like(w) if gi is None else gi
                w.sub_(lr * (gi + 3e-3 * w + 0.9 * grouped.state[w]["momentum_buffer"]))
            value = float(F.cross_entropy(net(val[0]), val[1]))
            for w, o in zip(weights, original):
                w.copy_(o)
        return value

    eps = 1e-7
    for a, g in zip(net.alphas(), got):
        expect = torch.zeros_like(a)
        for i in range(a.numel()):
            with torch.no_grad():
                a.view(-1)[i] += eps
            up = objective()
            with torch.no_grad():
                a.view(-1)[i] -= 2 * eps
            down = objective()
            with torch.no_grad():
                a.view(-1)[i] += eps
            expect.view(-1)[i] = (up - down) / (2 * eps)
        assert expect.abs().max() > 1e-4
        torch.testing.assert_close(g, expect, rtol=1e-4, atol=1e-7)
