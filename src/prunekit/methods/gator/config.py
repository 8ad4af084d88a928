"""GatorConfig: what Gator optimises (cost model, lambda or a target) and how it trains gates.

Defaults follow the authors' code: gates start open with probability
0.995, logistic noise at temperature 1, gate learning rate scaled by gamma = 0.2 / (cost of the
channel), SGD momentum 0.9. What differs is written next to the field.

>>> cfg = GatorConfig(target=0.5)
>>> cfg.cost, cfg.target_measure, round(cfg.initial_logit, 3)
('macs', 'macs', 5.293)
"""
from __future__ import annotations

import dataclasses
import math

from ...core.config import Config, check_choice, check_range, check_unused
from ...core.errors import ConfigError
from ...cost.latency import LatencyConfig, timing_device

COSTS = ("params", "macs", "latency")


def _default_latency() -> LatencyConfig:
    return LatencyConfig(device="auto", warmup=3, repeats=10)


@dataclasses.dataclass
class GatorConfig(Config):
    """Gated channel pruning (Gator, arXiv 2205.15404) on the groups of `prunekit.graph`.

    cost:           "params", "macs" or "latency": the auxiliary loss's per-channel cost.
                    "latency" reads per-layer latency lookup tables measured on `latency`.
    lam:            fixed weight lambda of the auxiliary loss (the authors' `criteria_weight`).
    target:         fraction of `target_metric` that must remain, in (0, 1); a controller moves
                    lambda during gated training and a final threshold search lands within
                    `tolerance` (absolute, e.g. 0.5 +- 0.03). Give exactly one of lam / target.
    target_metric:  what `target` measures ("params", "macs", "latency"); None = `cost`.
                    "macs" with cost="latency" asks for the fastest net at a MACs budget.
    epochs:         gated-training epochs; finetune_epochs: plain training after conversion.
    gate_init_prob: P(gate open) at the start; logit = log(p / (1 - p)) = 5.293 for 0.995.
    init_noise:     relative uniform noise on the initial logits (the authors' random_init: 0.1).
    temperature:    of the logistic noise, s = sigmoid((logit + noise) / temperature).
    gate_lr_scale:  gamma: a channel's logit learns at lr * gamma / (its cost / total cost).
    gate_momentum:  SGD momentum of the logits; they get no weight decay (the authors' optimizer
                    kept lr * wd unchanged for logits, which only pulls them toward 0).
    adaptive:       per-channel costs follow the current open widths of neighbouring groups.
    lam_init:       lambda the controller starts from (None: estimated from the schedule).
    controller_gain, ramp: how fast log(lambda) reacts to the gap between the current fraction
                    and the planned one, which falls linearly to `target` over the first
                    `ramp` of gated training.
    update_every:   steps between mask, cost and controller updates.
    round_to:       keep per-group channel counts at multiples of this (fast kernels), or None.
    ignore:         modules left unpruned (names from model.named_modules()).
    probe:          check each group on the real model before gating it (surgery.verify).
    latency, latency_grid: how latency tables are timed and how many widths per axis.
    seed:           seeds the initial logit noise.
    """

    cost: str = "macs"
    lam: float | None = None
    target: float | None = None
    target_metric: str | None = None
    tolerance: float = 0.03
    epochs: int = 30
    finetune_epochs: int = 0
    gate_init_prob: float = 0.995
    init_noise: float = 0.0
    temperature: float = 1.0
    gate_lr_scale: float = 0.2
    gate_momentum: float = 0.9
    adaptive: bool = True
    lam_init: float | None = None
    controller_gain: float = 1.0
    ramp: float = 0.7
    update_every: int = 1
    round_to: int | None = None
    ignore: list[str] = dataclasses.field(default_factory=list)
    probe: bool = True
    latency: LatencyConfig = dataclasses.field(default_factory=_default_latency)
    latency_grid: int = 4
    seed: int = 0

    def validate(self) -> None:
        check_choice("cost", self.cost, COSTS)
        if self.target_metric is not None:
            check_choice("target_metric", self.target_metric, COSTS)
        if (self.lam is None) == (self.target is None):
            got = "both" if self.lam is not None else "neither"
            raise ConfigError(f"give exactly one of lam (a fixed loss weight) or target (the fraction of "
                              f"{self.target_measure} to keep, e.g. 0.5); got {got}")
        if self.lam is not None:
            check_range("lam", self.lam, 0.0, math.inf)
            check_unused(self, ("target_metric", "tolerance", "lam_init", "controller_gain", "ramp"),
                         "with a fixed lam (they steer the controller that a target needs)")
        if self.target is not None:
            check_range("target", self.target, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("tolerance", self.tolerance, 0.0, 0.5, lo_open=True)
        for name in ("epochs", "finetune_epochs", "update_every", "latency_grid", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in ("update_every", "latency_grid") else 0):
                raise ConfigError(f"{name}={value!r} is invalid; use a non-negative integer"
                                  + (" >= 1" if name in ("update_every", "latency_grid") else ""))
        if self.epochs == 0:
            raise ConfigError("epochs=0: Gator learns which channels to close during its gated training, so "
                              "with none it would close channels no training ranked (by index, or by the "
                              "gates' initial noise); use epochs >= 1, or method magnitude to prune without "
                              "training")
        check_range("gate_init_prob", self.gate_init_prob, 0.5, 1.0, lo_open=True, hi_open=True)
        check_range("init_noise", self.init_noise, 0.0, 1.0, hi_open=True)
        check_range("temperature", self.temperature, 0.0, math.inf, lo_open=True)
        check_range("gate_lr_scale", self.gate_lr_scale, 0.0, math.inf, lo_open=True)
        check_range("gate_momentum", self.gate_momentum, 0.0, 1.0, hi_open=True)
        if self.lam_init is not None:
            check_range("lam_init", self.lam_init, 0.0, math.inf, lo_open=True)
        check_range("controller_gain", self.controller_gain, 0.0, math.inf, lo_open=True)
        check_range("ramp", self.ramp, 0.0, 1.0, lo_open=True)
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ConfigError(f"round_to={self.round_to!r} must be a positive integer (e.g. 8) or null")
        if not isinstance(self.ignore, (list, tuple)) or not all(isinstance(n, str) for n in self.ignore):
            raise ConfigError("ignore must be a list of module names")
        if not isinstance(self.latency, LatencyConfig):
            raise ConfigError("latency must be a LatencyConfig (or a mapping of its fields in a recipe)")

    def check_model(self, model, example_inputs=None) -> None:
        """The latency tables are timed when pruning starts, after any dense training: a device
        this machine cannot time on is refused before that. With `example_inputs`, a params or
        MACs target that even every gated channel closed cannot reach is refused too, and so is
        a model with no channel group to gate (whatever the cost, target or lam)."""
        if "latency" in (self.cost, self.target_measure):
            try:
                timing_device(self.latency)
            except ConfigError as err:
                raise ConfigError(f"latency: {err} (cost or target_metric 'latency' times layers with it)") from None
        if example_inputs is not None:
            from .pipeline import check_gateable, check_target_reachable

            if self.target is not None and self.target_measure != "latency":
                check_target_reachable(model, self, example_inputs)
            else:  # latency tables are timed later; which groups can be gated is known now
                check_gateable(model, self, example_inputs)

    @property
    def target_measure(self) -> str:
        """The cost the target is stated in."""
        return self.target_metric or self.cost

    @property
    def initial_logit(self) -> float:
        return math.log(self.gate_init_prob / (1.0 - self.gate_init_prob))
