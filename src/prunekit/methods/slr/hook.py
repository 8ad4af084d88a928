"""SLRHook: SLR / ADMM plugged into the training loop through `engine.hooks.Hook`.

extra_loss adds Σ(ρ/2)||W - Z + U||² every step; on_epoch_end (every `admm_every` epochs) runs
the Z/multiplier update and writes "slr/..." entries into the epoch's metrics:
w_z_rel = ||W - Z||/||W|| after the update, w_proj_rel = ||W - Π_S(W)||/||W|| (what hard
pruning would remove now), penalty, k, and for SLR s, alpha, accepted_w, accepted_z.

SLR's checks need the task loss f(W). With `check_batches` (a fixed list of (x, y) batches) f
is their mean loss in eval mode, computed at each update: the same batches for both sides of
every comparison. Without them f is read from `metrics[loss_metric]` (the epoch's mean training
loss, as in the reference code; the loop must report the task loss there, without the penalty).

>>> import torch
>>> from torch import nn
>>> from prunekit.methods.slr import SLRConfig
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))
>>> hook = SLRHook(net, SLRConfig(sparsity=0.5, optimization="admm"))
>>> list(hook.targets)
['1.weight']
>>> bool(hook.extra_loss(net, 0) > 0)
True
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.errors import CheckpointError, ConfigError
from ...core.modes import evaluating
from ...engine.hooks import Hook
from ...engine.restore import check_saved_config, config_text
from .config import ProjectionSpec, SLRConfig, resolve_targets
from .state import admm_update, init_state, penalty, relative_residual, slr_update

__all__ = ["SLRHook"]


class SLRHook(Hook):
    """Drives SLR or ADMM for the layers `config` selects in `model` (see module doc)."""

    def __init__(
        self,
        model: nn.Module,
        config: SLRConfig,
        check_batches: Iterable | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        loss_metric: str = "train_loss",
    ):
        if not isinstance(config, SLRConfig):
            raise ConfigError(f"SLRHook needs an SLRConfig, got {type(config).__name__}")
        self.config = config
        self.targets = resolve_targets(model, config)
        self.spec = ProjectionSpec.from_config(config, self.targets, model)
        # Module references, not names: the loop may hand us a wrapper (DDP, compile) of `model`.
        self._modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in self.targets}
        self.state = init_state(self.weights(), self.spec, config.initial_s, config.clone_previous)
        self.check_batches = None if check_batches is None else list(check_batches)
        if self.check_batches is not None and not self.check_batches:
            raise ConfigError("check_batches is empty; give at least one (inputs, targets) batch or None")
        self.loss_fn = loss_fn or F.cross_entropy
        self.loss_metric = loss_metric
        self.epochs_seen = 0

    def weights(self) -> dict:
        """The live pruned weights {param name: tensor} (they carry gradients)."""
        return {n: mod.weight for n, mod in self._modules.items()}

    def _sync_device(self, device: torch.device) -> None:
        if next(iter(self.state.Z.values())).device != device:
            self.state.to(device)

    def extra_loss(self, model: nn.Module, step: int) -> Tensor:
        W = self.weights()
        self._sync_device(next(iter(W.values())).device)
        return penalty(W, self.state.Z, self.state.U, self.config.rho)

    def task_loss(self, model: nn.Module, metrics: dict[str, Any]) -> float:
        """f(W): mean loss on `check_batches` in eval mode, else metrics[loss_metric]."""
        if self.check_batches is None:
            if self.loss_metric not in metrics:
                raise ConfigError(
                    f"SLR needs the task loss: metrics has no {self.loss_metric!r} (keys: "
                    f"{sorted(metrics)}); pass check_batches to SLRHook or set loss_metric"
                )
            return float(metrics[self.loss_metric])
        device = next(iter(self.weights().values())).device
        total, count = 0.0, 0
        with evaluating(model):
            with torch.no_grad():
                for x, y in self.check_batches:
                    x, y = x.to(device), y.to(device)
                    total += float(self.loss_fn(model(x), y)) * len(y)
                    count += len(y)
        return total / count

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        self.epochs_seen += 1
        if self.epochs_seen % self.config.admm_every:
            return
        cfg, state = self.config, self.state
        W = {n: w.detach() for n, w in self.weights().items()}
        self._sync_device(next(iter(W.values())).device)
        if state.aliased:  # W_prev *is* the live weights; moving the model (to a GPU) gave them new storage
            state.W_prev = dict(W)
        if cfg.optimization == "admm":
            info = admm_update(state, W)
        else:
            info = slr_update(state, W, self.task_loss(model, metrics), cfg.rho, cfg.M, cfg.r)
        info["epoch"] = epoch
        info["w_z_rel"] = relative_residual(W, state.Z)
        info["w_proj_rel"] = relative_residual(W, self.spec.project(W))
        info["penalty"] = float(penalty(W, state.Z, state.U, cfg.rho))
        state.history[-1] = dict(info)
        metrics.update({f"slr/{k}": v for k, v in info.items() if k != "epoch"})

    def check_state(self, state: dict[str, Any]) -> None:
        """Before anything is restored: the state was saved by a run of this SLRConfig."""
        check_saved_config(state.get("config"), self.config)

    def state_dict(self) -> dict[str, Any]:
        """Plain content (tensors, numbers, lists, dicts) for the engine's resumable checkpoints."""
        st = self.state
        return {
            "config": config_text(self.config),
            "Z": dict(st.Z), "U": dict(st.U), "Z_prev": dict(st.Z_prev),
            "W_prev": {} if st.aliased else dict(st.W_prev),
            "s": st.s, "k": st.k, "f_prev": st.f_prev, "f_last": st.f_last,
            "epochs_seen": self.epochs_seen, "history": [dict(h) for h in st.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; the hook must select the same layers."""
        try:
            tensors = {d: dict(state[d]) for d in ("Z", "U", "Z_prev", "W_prev")}
            scalars = (float(state["s"]), int(state["k"]), int(state["epochs_seen"]), list(state["history"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"SLRHook state is incomplete or corrupt ({err})") from None
        expected = set(self.targets)
        for d, group in tensors.items():
            if d == "W_prev" and self.state.aliased:
                continue
            if set(group) != expected or any(group[n].shape != self.state.Z[n].shape for n in expected):
                raise CheckpointError(f"SLRHook state {d} does not match the pruned layers {sorted(expected)}")
        device = next(iter(self.state.Z.values())).device
        st = self.state
        st.Z, st.U, st.Z_prev = ({n: t.to(device) for n, t in tensors[d].items()} for d in ("Z", "U", "Z_prev"))
        if st.aliased:
            st.W_prev = {n: w.detach() for n, w in self.weights().items()}
        else:
            st.W_prev = {n: t.to(device) for n, t in tensors["W_prev"].items()}
        st.s, st.k, self.epochs_seen, st.history = scalars
        st.f_prev, st.f_last = state.get("f_prev"), state.get("f_last")
