"""`PRDartsConfig`: the supernet, the three phases and the architect of a PR-DARTS search.

Defaults follow the authors' code where it is clear (99% sparsity, per-layer top-k, scaled score
init, unrolled architect with Adam 3e-4 / betas (0.5, 0.999) / wd 1e-3, weight SGD lr 0.025 and
wd 1e-3, score SGD lr 0.1, grad clip 5, train portion 0.5) and take the clean choice where it
contradicts itself, each switchable:
- `alpha_in_weight_optimizer` (default false): their alphas are nn.Parameters inside
  `model.parameters()`, so the weight SGD steps them too on the train split. Here only the
  architect steps them, on the validation split, as DARTS's bilevel problem says.
- `smooth_beta` (default 0): their trainer computes loss + 6 * KL(noisy || clean) and then
  overwrites it with the plain loss, so the term never acts. 0 reproduces what their code
  optimises; > 0 turns the randomized-smoothing term on for real (noise `smooth_noise_std`).
- `arch_during_scores` (default false): their default trainer skips the architect while the
  scores train; true steps alpha in all three phases.
`momentum` defaults to DARTS's 0.9; the authors' SGD has none (torch's default 0).

>>> PRDartsConfig(layers=5, channels=8, density=0.1).edges_per_cell
14
"""
from __future__ import annotations

import dataclasses
import math

from ...core.config import Config, check_range
from ...core.errors import ConfigError


def _int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {lo}")


@dataclasses.dataclass
class PRDartsConfig(Config):
    # supernet
    channels: int = 16
    layers: int = 8
    steps: int = 4
    multiplier: int = 4
    density: float = 0.01  # kept share of every sparse layer after pretraining (0.01 = 99% sparsity)
    # phases: dense pretrain -> score training (weights frozen) -> finetune (scores frozen)
    pretrain_epochs: int = 100
    score_epochs: int = 50
    finetune_epochs: int = 100
    lr: float = 0.025
    score_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    grad_clip: float = 5.0
    score_init: str = "scaled"
    # architect
    unrolled: bool = True
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-3
    arch_beta1: float = 0.5
    hvp_r: float = 1e-2
    arch_during_scores: bool = False
    alpha_in_weight_optimizer: bool = False
    smooth_beta: float = 0.0
    smooth_noise_std: float = 0.25
    seed: int = 0

    @property
    def edges_per_cell(self) -> int:
        return sum(2 + i for i in range(self.steps))

    def validate(self) -> None:
        for name in ("channels", "layers", "steps", "multiplier"):
            _int(name, getattr(self, name), 1)
        if self.multiplier > self.steps:
            raise ConfigError(f"multiplier={self.multiplier} concatenates more nodes than steps={self.steps}; "
                              "use multiplier <= steps")
        if self.layers < 3:
            raise ConfigError(f"layers={self.layers}: DARTS places reductions at layers//3 and 2*layers//3, "
                              "so use at least 3 cells")
        check_range("density", self.density, 0.0, 1.0, lo_open=True)
        for name in ("pretrain_epochs", "score_epochs", "finetune_epochs", "seed"):
            _int(name, getattr(self, name), 0)
        if self.density == 1 and self.score_epochs > 0:
            raise ConfigError(f"density=1 keeps every weight, so the {self.score_epochs} score epochs have no "
                              "scores to train; set score_epochs=0 (a dense search) or a density below 1")
        if self.pretrain_epochs + self.score_epochs + self.finetune_epochs == 0:
            raise ConfigError("all three phases have 0 epochs; give at least one phase some epochs")
        for name in ("lr", "score_lr", "arch_lr", "hvp_r", "grad_clip", "smooth_noise_std"):
            check_range(name, getattr(self, name), 0.0, math.inf, lo_open=True)
        for name in ("weight_decay", "arch_weight_decay", "smooth_beta"):
            check_range(name, getattr(self, name), 0.0, math.inf)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("arch_beta1", self.arch_beta1, 0.0, 1.0, hi_open=True)
        if self.score_init not in ("scaled", "kaiming"):
            raise ConfigError(f"score_init={self.score_init!r}; use 'scaled' (HYDRA) or 'kaiming'")
