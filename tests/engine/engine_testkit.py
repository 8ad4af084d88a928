"""Tiny data, models, loaders and hooks shared by the engine tests (no prunekit.data needed)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prunekit.engine import Hook


class TinyLoader:
    """Batches of (x, y) from two tensors, with len(); optional shuffling.

    shuffle="epoch": a permutation seeded by `seed + epoch` (set through `set_epoch`), the
    same on every rank; shuffle="global": a permutation drawn from torch's global RNG, which
    makes a resumed run depend on the checkpoint restoring that RNG.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: str | None = None,
                 seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle, self.seed = x, y, batch_size, shuffle, seed
        self.epoch = 0
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        if self.shuffle == "epoch":
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        elif self.shuffle == "global":
            order = torch.randperm(n)
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def blobs(n: int, dim: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters: class c is centred on a random mean; separable enough to learn."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)
    return x, y


def mlp(dim: int = 6, hidden: int = 16, classes: int = 3, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


class L2Penalty(Hook):
    """extra_loss = lam/2 * ||W||^2 over the weights of `module`: adds lam * W to its gradient."""

    def __init__(self, module: nn.Module, lam: float):
        self.module, self.lam = module, lam

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor:
        return 0.5 * self.lam * self.module.weight.pow(2).sum()


class GradRecorder(Hook):
    """Copies every parameter's gradient in after_backward."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})


class CountingHook(Hook):
    """A hook with state that changes training: its extra loss depends on how many steps it saw.

    Saved and restored through state_dict/load_state_dict; can raise at a given step to
    simulate a crash mid-epoch.
    """

    def __init__(self, crash_at: int | None = None):
        self.steps = 0
        self.scale = torch.tensor(0.0)
        self.crash_at = crash_at

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor:
        if self.crash_at is not None and step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        first = next(model.parameters())
        return self.scale * 1e-3 * (self.steps % 3) * first.pow(2).sum()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.steps += 1

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        self.scale = self.scale + 1.0
        metrics["hook_steps"] = self.steps

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "scale": self.scale.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.scale = int(state["steps"]), state["scale"].clone()


def without_timings(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from prunekit.engine import TIMING_KEYS
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]
