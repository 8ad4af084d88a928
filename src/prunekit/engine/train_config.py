"""`TrainConfig`: what one `train` call does (optimizer, schedule, precision, layout, logging)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.config import Config, check_choice, check_int, check_range
from ..core.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class TrainConfig(Config):
    """How to train. `momentum`/`nesterov` apply to SGD only; `weight_decay` to all parameters.

    `schedule` is per step: "cosine" (to 0), "onecycle" (lr/25 -> lr -> lr/2.5e5, cosine both
    ways; its rise lasts `warmup_epochs`, or 30% of training when that is 0; momentum is not
    cycled) or "constant". `warmup_epochs` (may be fractional) is a linear ramp for "cosine" and
    "constant". `bf16` autocasts on CUDA and is ignored with a note on CPU. `channels_last`
    trains in NHWC layout (its 4-D tensors; 5-D ones stay as they are); None (the default) means
    on for CPU, off elsewhere: on CPU it was measured 1.4-1.5x faster for a CIFAR ResNet-20 at
    one thread (docs/train_throughput.md), and it computes the same function (results agree to
    float rounding); a strided, unpadded 1x1 conv of fewer than 16 input channels runs with a
    row-major input and weight on the CPU (`core.layout.onednn_safe`: oneDNN's channels-last kernel computes
    its weight gradient wrongly). When the default turned it on, the model is handed back in the
    layout it came in (contiguous, or channels-last when the caller made it so). `log_every` writes a
    JSONL "step" record every that many steps (0: never) with the loss of this process's batch
    (rank 0's shard under torchrun).

    >>> TrainConfig(epochs=3, schedule="onecycle", label_smoothing=0.1).schedule
    'onecycle'
    """

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    bf16: bool = False
    channels_last: bool | None = None
    compile: bool = False
    seed: int = 0
    grad_clip: float | None = None
    log_every: int = 50

    def validate(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_range("lr", self.lr, 0.0, math.inf, lo_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_range("warmup_epochs", self.warmup_epochs, 0.0, self.epochs)
        if self.schedule != "constant" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} leaves no epoch for the "
                              f"{self.schedule} decay; use warmup_epochs < epochs={self.epochs}")
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        check_int("seed", self.seed, 0)
        if self.grad_clip is not None:
            check_range("grad_clip", self.grad_clip, 0.0, math.inf, lo_open=True)
        check_int("log_every", self.log_every, 0)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("nesterov=true needs optimizer='sgd' with momentum > 0; "
                              "set nesterov=false or give SGD a momentum")
