"""GatorHook: the auxiliary loss, the logits' own SGD step and the controller, inside `train`.

Per optimizer step of the network (engine/train.py order):

    extra_loss      lambda * sum_c cost_c / C_total * mean_b(g_bc)  over this forward's gate samples
    after_backward  grad(theta_c) *= gamma / (cost_c / C_total)   (cheap channels learn faster)
    on_step_end     SGD step of the logits at lr(step) (the network's schedule), then every
                    `update_every` steps: permanent masks, adaptive costs, lambda control

With a target, the run *settles* once the switched-off channels alone bring the fraction within
half a tolerance of it: lambda drops to 0, the logits' momentum is cleared and the surviving
logits are shifted up (order kept) so that the lowest is back at its initial value. The rest of
gated training then trains the network it will become. Without this, short runs end in a cliff:
the auxiliary push accelerates tenfold as logits approach 0 (E[ds/dtheta] is 0.017 at 5.3 and
0.17 at 0), so a lambda large enough to start the descent sends every logit below 0 within a
few steps, and the network would be trained with all gates closed.

The per-channel cost is recomputed at the current expected open widths (`adaptive`), so the
weight of a channel falls as the layers it connects to shrink. The logits are not parameters of
the model (the network's optimizer never sees them); `state_dict` makes them resumable.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> from .config import GatorConfig
>>> from prunekit.layers.gates import GateSet
>>> from prunekit.cost.differentiable import build_cost
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)); x = torch.randn(2, 1, 6, 6)
>>> graph = build_graph(m, x); gates = GateSet.from_graph(m, graph); gates.attach(m)
>>> cfg = GatorConfig(lam=1.0)
>>> hook = GatorHook(gates, build_cost("macs", m, graph, gates), None, cfg, total_steps=10)
>>> _ = m(x); aux = hook.extra_loss(m, 0)
>>> 0.7 < float(aux.detach()) <= 1.0  # all but ~0.5% of gates open, and one group carries all the cost
True
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ...core.errors import CheckpointError
from ...engine.hooks import Hook
from ...engine.restore import check_saved_config, config_text
from .config import GatorConfig
from .controller import LambdaController, initial_lambda, mask_within_budget, rounded_within
from ...cost.differentiable import CostModel
from ...layers.gates import GateSet


class GatorHook(Hook):
    """Drives gated training; `lr_at(step)` gives the logits' learning rate (default 0.01)."""

    def __init__(self, gates: GateSet, cost: CostModel, measure: CostModel | None, config: GatorConfig,
                 total_steps: int, lr_at: Callable[[int], float] | None = None, graph: Any = None):
        self.gates, self.cost, self.config = gates, cost, config
        self.graph = graph  # the gated groups' graph: with config.round_to, widths are rounded on settling
        self.rounding: dict[str, Any] | None = None
        self.measure = measure or cost  # what the target is stated in
        self.lr_at = lr_at or (lambda step: 0.01)
        self.total_steps = max(int(total_steps), 1)
        self.optimizer: torch.optim.Optimizer | None = None
        self.unit: list[torch.Tensor] = []  # cost_c / C_total per gated channel
        self.aux = torch.zeros(())
        self.controller = None
        self.settled_at: int | None = None
        self.steps_done = 0  # steps taken so far (the planned fraction at an epoch's end is read there)
        self.lam = float(config.lam) if config.lam is not None else 0.0
        if config.target is not None:
            ramp_steps = max(int(config.ramp * self.total_steps), 1)
            lr_sum = sum(self.lr_at(step) for step in range(ramp_steps))
            lam0 = config.lam_init or initial_lambda(config.initial_logit, lr_sum, config.gate_lr_scale,
                                                     config.gate_momentum, config.temperature)
            self.controller = LambdaController(config.target, config.tolerance, self.total_steps, lam0,
                                               config.ramp, config.controller_gain,
                                               max_move=0.69 * (1.0 - config.gate_momentum))
            self.lam = self.controller.lam
        self.refresh_costs()

    # ---- costs and fractions --------------------------------------------------------------
    def refresh_costs(self) -> None:
        """Per-channel costs at the current expected widths (or at full width if not adaptive)."""
        opens = self.gates.open_probs()
        costs = self.cost.per_channel(opens, at_full=not self.config.adaptive)
        flat = torch.cat(costs) if costs else torch.zeros(1)
        floor = 1e-3 * float(flat[flat > 0].mean()) if bool((flat > 0).any()) else 1.0
        device = self.gates.logits[0].device if len(self.gates.logits) else torch.device("cpu")
        self.unit = [(c.clamp(min=floor) / self.cost.full).to(device, torch.float32) for c in costs]

    def fraction(self, masks: list[torch.Tensor] | None = None) -> float:
        """Fraction of the target measure left if converted now (or with `masks`)."""
        return self.measure.fraction(self.gates.hard_open() if masks is None else masks)

    # ---- hook methods ---------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if not self.gates.samples or self.lam == 0.0:
            return None
        device = next(iter(self.gates.samples.values())).device
        if self.unit[0].device != device:  # the gates moved after the hook was made
            self.unit = [u.to(device) for u in self.unit]
        terms = [(self.unit[i] * g.mean(dim=0)).sum() for i, g in self.gates.samples.items()]
        aux = self.lam * torch.stack(terms).sum()
        self.aux = aux.detach()
        return aux

    def after_backward(self, model: nn.Module, step: int) -> None:
        gamma = self.config.gate_lr_scale
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for i, theta in enumerate(self.gates.logits):
            if theta.grad is None:
                continue
            if world > 1:  # the logits are outside DDP: average their gradients by hand
                dist.all_reduce(theta.grad)
                theta.grad /= world
            theta.grad.mul_(gamma / self.unit[i])

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.steps_done = step + 1
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD(self.gates.logits.parameters(), lr=self.lr_at(step),
                                             momentum=self.config.gate_momentum)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if (step + 1) % self.config.update_every == 0:
            self.update(step + 1)

    def update(self, step: int) -> None:
        """Permanent masks (within the target budget), fresh costs, lambda control."""
        g = self.gates
        n = len(g.logits)
        mask_within_budget(list(g.logits), [g.active(i) for i in range(n)], [g.prunable(i) for i in range(n)],
                           self.measure.fraction if self.controller else None,
                           self.config.target if self.controller else None)
        if self.config.adaptive:
            self.refresh_costs()
        if self.controller is None or self.settled_at is not None:
            return
        masked_only = self.measure.fraction([~g.prunable(i) | g.active(i) for i in range(n)])
        if masked_only <= self.config.target + self.config.tolerance / 2:
            self.settle(step)
            return
        blend = 0.5 * (self.fraction() + self.measure.fraction(g.open_probs()))
        self.lam = self.controller.update(step, blend, self.config.update_every)

    def settle(self, step: int) -> None:
        """Target reached by the switched-off channels: stop pushing, reopen the others (see doc)."""
        g = self.gates
        self.settled_at, self.lam = step, 0.0
        self.aux = torch.zeros(())
        self.optimizer = None  # clears the logits' momentum
        self.round_on_settling()
        with torch.no_grad():
            alive = [g.active(i) & g.prunable(i) for i in range(len(g.logits))]
            values = torch.cat([t[a] for t, a in zip(g.logits, alive)])
            if values.numel():
                shift = max(0.0, self.config.initial_logit - float(values.min()))
                for t, a in zip(g.logits, alive):
                    t[a] += shift

    def round_on_settling(self) -> None:
        """With `round_to`, round every width to a multiple within the target now (switching gates
        off, or back on, highest logit first), so that the rest of gated training trains the
        rounded network: rounding after training closes channels the network still relies on (on
        the digits CNN, 4 channels cost 8-17 points before fine-tuning). Reopened gates get their
        logits raised with the others by `settle`."""
        multiple, g = self.config.round_to, self.gates
        if not multiple or multiple <= 1 or self.graph is None or self.config.target is None:
            return
        n = len(g.logits)
        opens = [(~g.prunable(i) | g.active(i)).cpu() for i in range(n)]
        budget = self.config.target
        masks, self.rounding = rounded_within(opens, [t.detach().cpu() for t in g.logits],
                                              [g.prunable(i).cpu() for i in range(n)], self.measure.fraction, budget,
                                              multiple, self.graph, list(g.names), reopen=True)
        for i, m in enumerate(masks):
            g.active(i).copy_((m | ~g.prunable(i).cpu()).to(g.active(i).device))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        opens = self.gates.hard_open()
        metrics["gator/lambda"] = self.lam
        metrics["gator/aux"] = float(self.aux)
        metrics["gator/fraction"] = self.fraction(opens)
        metrics["gator/expected_fraction"] = self.measure.fraction(self.gates.open_probs())
        metrics["gator/open_channels"] = int(sum(int(o.sum()) for o in opens))
        metrics["gator/closed_groups"] = [self.gates.names[i] for i, o in enumerate(opens) if not bool(o.any())]
        if self.controller is not None:
            # the plan at this step (the controller's history stops once the run settles)
            metrics["gator/planned_fraction"] = self.controller.planned(self.steps_done)
            metrics["gator/settled_at"] = self.settled_at

    # ---- checkpointing --------------------------------------------------------------------
    def check_state(self, state: dict[str, Any]) -> None:
        """Before anything is restored: the state was saved by a run of this GatorConfig."""
        check_saved_config(state.get("config"), self.config)

    def state_dict(self) -> dict[str, Any]:
        return {"config": config_text(self.config), "gates": self.gates.state_dict(), "lam": self.lam,
                "settled_at": self.settled_at,
                "rounding": self.rounding,
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "controller": None if self.controller is None else self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.gates.load_state_dict(state["gates"])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"gate state does not fit these gates ({err}); resume with the same model") from None
        self.lam = float(state["lam"])
        self.settled_at = state.get("settled_at")
        self.rounding = state.get("rounding")
        if state.get("controller") is not None and self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if state.get("optimizer") is not None:
            self.optimizer = torch.optim.SGD(self.gates.logits.parameters(), lr=0.01,
                                             momentum=self.config.gate_momentum)
            self.optimizer.load_state_dict(state["optimizer"])
        self.refresh_costs()

