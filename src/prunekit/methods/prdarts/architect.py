"""The architect: one alpha step on a validation batch, first order or unrolled (second order).

First order: grad_alpha L_val(w, alpha), then Adam.
Second order (DARTS): with w' = w - eta (momentum * buf + grad_w L_train(w, alpha) + wd * w), the
one-SGD-step lookahead the weight optimizer would take,
    grad = grad_alpha L_val(w', alpha) - H u,   u = eta * v,   v = grad_w' L_val(w', alpha),
    H u  = (grad_alpha L_train(w + R u, alpha) - grad_alpha L_train(w - R u, alpha)) / (2R),
with eta each weight's parameter-group lr and R = r / |u| (a central finite difference for the
mixed second derivative; with one lr this is DARTS's eta * H v, R = r / |v|). Both losses are
those of the *masked* network: `w` are the parameters the weight optimizer trains in the current
phase (weights, or scores while the scores train), so the lookahead moves them and the masks
follow. Parameters are moved in place and restored by copy (bit-exact).

>>> import torch
>>> from prunekit.methods.prdarts.supernet import SuperNet
>>> net = SuperNet(channels=2, num_classes=3, layers=3, steps=1, multiplier=1)
>>> arch = Architect(net)
>>> xv, yv = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
>>> before = net.alpha_normal.clone(); _ = arch.step(None, (xv, yv)); bool((net.alpha_normal != before).any())
True
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import ConfigError


@contextmanager
def alphas_trainable(alphas: Sequence[nn.Parameter]) -> Iterator[None]:
    """Let autograd see the alphas inside the block (they are requires_grad=False outside)."""
    before = [a.requires_grad for a in alphas]
    for a in alphas:
        a.requires_grad_(True)
    try:
        yield
    finally:
        for a, b in zip(alphas, before):
            a.requires_grad_(b)


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    got = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]


class Architect:
    """Steps `net.alphas()` with Adam(lr, betas, weight_decay) on validation batches."""

    def __init__(self, net: nn.Module, lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.999),
                 weight_decay: float = 1e-3, unrolled: bool = False, hvp_r: float = 1e-2):
        self.net, self.unrolled, self.hvp_r = net, unrolled, hvp_r
        self.alphas = list(net.alphas())
        self.optimizer = torch.optim.Adam(self.alphas, lr=lr, betas=betas, weight_decay=weight_decay)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def step(self, train_batch: tuple[Tensor, Tensor] | None, val_batch: tuple[Tensor, Tensor],
             weight_optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """One Adam step of the alphas; returns {"arch_loss": validation loss before the step}."""
        grads, val_loss = self.gradient(train_batch, val_batch, weight_optimizer)
        for a, g in zip(self.alphas, grads):
            a.grad = g
        self.optimizer.step()
        for a in self.alphas:
            a.grad = None
        return {"arch_loss": val_loss}

    def gradient(self, train_batch: Any, val_batch: Any,
                 weight_optimizer: torch.optim.Optimizer | None = None) -> tuple[list[Tensor], float]:
        """The alpha gradient (first order, or unrolled when `self.unrolled`) and L_val."""
        if not self.unrolled:
            with alphas_trainable(self.alphas):
                loss = self.loss(val_batch)
                return _grads(loss, self.alphas), float(loss.detach())
        if train_batch is None or weight_optimizer is None:
            raise ConfigError("the unrolled (second-order) architect needs the train batch and the weight "
                              "optimizer; use unrolled=false or an engine that passes them")
        return self._unrolled_gradient(train_batch, val_batch, weight_optimizer)

    def _trained(self, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, dict]]:
        ids = {id(a) for a in self.alphas}
        return [(p, group) for group in optimizer.param_groups for p in group["params"]
                if id(p) not in ids and p.requires_grad]

    def _unrolled_gradient(self, train_batch, val_batch, optimizer) -> tuple[list[Tensor], float]:
        trained = self._trained(optimizer)
        params = [p for p, _ in trained]
        original = [p.detach().clone() for p in params]
        g_train = _grads(self.loss(train_batch), params)
        with torch.no_grad():  # w' = w - eta (momentum * buf + g + wd * w): the SGD step to come
            for (p, group), g in zip(trained, g_train):
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                d_p = g + group.get("weight_decay", 0.0) * p
                if buf is not None:
                    d_p = d_p + group.get("momentum", 0.0) * buf
                p.sub_(group["lr"] * d_p)
        try:
            with alphas_trainable(self.alphas):
                val_loss = self.loss(val_batch)
                got = _grads(val_loss, self.alphas + params)
            d_alpha, v = got[: len(self.alphas)], got[len(self.alphas):]
        finally:
            _restore(params, original)
        implicit = self._hessian_vector([group["lr"] * d for (_, group), d in zip(trained, v)], params, original,
                                        train_batch)
        return [d - h for d, h in zip(d_alpha, implicit)], float(val_loss.detach())

    def _hessian_vector(self, v: list[Tensor], params: list[nn.Parameter], original: list[Tensor],
                        train_batch: Any) -> list[Tensor]:
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in v))
        if float(norm) == 0.0:
            return [torch.zeros_like(a) for a in self.alphas]
        radius = self.hvp_r / float(norm)
        sides = []
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, w, d in zip(params, original, v):
                        p.copy_(w + sign * radius * d)
                with alphas_trainable(self.alphas):
                    sides.append(_grads(self.loss(train_batch), self.alphas))
        finally:
            _restore(params, original)
        return [(gp - gn) / (2 * radius) for gp, gn in zip(*sides)]


def _restore(params: list[nn.Parameter], original: list[Tensor]) -> None:
    with torch.no_grad():
        for p, w in zip(params, original):
            p.copy_(w)
