"""The CPU reproduction protocol for CIFAR-10: one model, data, schedule and budget for every method.

Chosen from measured training throughput (docs/train_throughput.md, benchmarks/protocol_throughput.py):
ResNet-20 in channels-last layout is the cheapest network in the model zoo that reaches 85%
on the JPEG copy of CIFAR-10 with a short one-cycle schedule. Every number a method benchmark
or a compare recipe uses comes from here, so the protocol is stated once:

- data: the JPEG CIFAR-10 image folder, all 45,000 training images left after a seeded 10%
  validation hold-out (data seed 0), batch 256, crop + flip augmentation; test = the 10,000
  test images, reported only.
- dense: 30 epochs, SGD (momentum 0.9, Nesterov, weight decay 5e-4), one-cycle to lr 0.3,
  label smoothing 0.1, seed 0; trained once (benchmarks/protocol_dense.py), cached under
  local/ with its sha256 recorded.
- every arm: 15 epochs after the dense model, method training included (one-cycle to lr 0.05
  for fine-tuning; methods that train use `METHOD_TRAIN`, cosine from lr 0.05), seeds 0, 1, 2.

>>> from prunekit.protocol import PROTOCOL
>>> PROTOCOL.model, PROTOCOL.budget_epochs, PROTOCOL.dense_train.epochs
('resnet20', 15, 30)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data.config import DataConfig
from .engine.train import TrainConfig

# The repository reaches the shared data folder as ../shared/data from its root.
DEFAULT_DATA = "../shared/data/cifar10-jpg.tar.gz"
DEFAULT_DENSE = "local/protocol_dense_resnet20.safetensors"


@dataclass(frozen=True)
class Protocol:
    """One CIFAR-10 setting; `data_config`, `dense_train`, `finetune` and `method_train` are the
    typed configs built from it."""

    model: str = "resnet20"
    limit_train: int | None = None  # all 45,000 images after the validation hold-out
    val_fraction: float = 0.1
    batch_size: int = 256
    data_seed: int = 0
    dense_epochs: int = 30
    dense_lr: float = 0.3
    budget_epochs: int = 15
    finetune_lr: float = 0.05
    method_lr: float = 0.05
    label_smoothing: float = 0.1
    weight_decay: float = 5e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    channels_last: bool | None = None  # the engine's default: NHWC on CPU (measured faster), not on CUDA
    target_dense_acc: float = 0.85
    dense_path: str = DEFAULT_DENSE
    data_root: str = DEFAULT_DATA
    notes: tuple[str, ...] = field(default=())

    def data_config(self, device: str = "cpu", root: str | Path | None = None) -> DataConfig:
        return DataConfig(name="imagefolder", root=str(root or self.data_root), batch_size=self.batch_size,
                          val_fraction=self.val_fraction, seed=self.data_seed, augment=True,
                          limit_train=self.limit_train, device=device, eval_batch_size=512)

    @property
    def dense_train(self) -> TrainConfig:
        return TrainConfig(epochs=self.dense_epochs, lr=self.dense_lr, momentum=0.9, nesterov=True,
                           weight_decay=self.weight_decay, schedule="onecycle",
                           label_smoothing=self.label_smoothing, channels_last=self.channels_last,
                           seed=self.data_seed, log_every=0)

    @property
    def finetune(self) -> TrainConfig:
        return self.dense_train.replace(epochs=self.budget_epochs, lr=self.finetune_lr)

    @property
    def method_train(self) -> TrainConfig:
        return self.dense_train.replace(epochs=self.budget_epochs, lr=self.method_lr, schedule="cosine")

    def compare_sections(self, device: str = "auto") -> dict:
        """The shared sections of a compare recipe (model, data, dense, budgets) as plain data."""
        def plain(cfg):
            d = cfg.to_dict()
            d.pop("version", None)
            return d

        data = plain(self.data_config())
        data.pop("device", None)
        return {"seeds": list(self.seeds), "device": device, "model": {"name": self.model}, "data": data,
                "dense": {"weights": self.dense_path, "train": plain(self.dense_train)},
                "finetune": plain(self.finetune), "method_train": plain(self.method_train)}


PROTOCOL = Protocol()
# Compare recipes name their protocol (`protocol: cifar10_resnet20`) to take its sections.
PROTOCOLS = {"cifar10_resnet20": PROTOCOL}
