"""`DataConfig`: which dataset to load and how to batch it.

>>> cfg = DataConfig(name="digits", batch_size=64, seed=1)
>>> cfg.val_fraction, cfg.to_dict()["batch_size"]
(0.1, 64)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..core.config import Config, check_int, check_range
from ..core.errors import ConfigError


@dataclass
class DataConfig(Config):
    """Settings of `load_data`.

    name: a registered dataset ("digits", "cifar10", "cifar100", "imagefolder").
    root: where the files are (a folder or an archive); None means the dataset's default
        (bundled data for digits, the prunekit cache folder for the CIFARs).
    val_fraction: share of the train split held out, with a seeded permutation, for
        validation. Model selection uses val; test is only ever reported.
    seed: seeds the val split, the per-epoch shuffles and the augmentation draws.
    limit_train: keep only the first N training images after the split (quick runs).
    augment: train-split augmentation, as far as the dataset allows it (DatasetSpec.crop and
        .flip): random crops from a zero padding of max(1, H // 8) pixels (4 for 32x32) and
        random horizontal flips. The CIFARs and image folders allow both; digits neither.
    device: where batches are made: "cpu", "cuda" or "cuda:<index>".
    num_workers: decoding processes, used only when a large image folder is streamed from disk.
    image_size: imagefolder only: resize every image to image_size x image_size.
    """

    name: str
    root: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True
    device: str = "cpu"
    num_workers: int = 0
    limit_train: int | None = None
    image_size: int | None = None

    def validate(self) -> None:
        from .registry import DATASETS  # here, not at import: the registry module imports us

        DATASETS.get(self.name)  # raises ConfigError listing the available datasets
        if isinstance(self.root, os.PathLike):
            self.root = os.fspath(self.root)  # keep the config plain data (YAML/JSON-able)
        if self.root is not None and not isinstance(self.root, str):
            raise ConfigError(f"root={self.root!r} must be a path (string) or None")
        if self.root is not None and "\0" in self.root:
            raise ConfigError(f"root={self.root!r} holds a NUL character (\\0), which no path can; remove it")
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        check_int("seed", self.seed, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("num_workers", self.num_workers, 0)
        if self.limit_train is not None:
            check_int("limit_train", self.limit_train, 1)
        if self.image_size is not None:
            check_int("image_size", self.image_size, 1)
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r} is not allowed; use 'cpu', 'cuda' or 'cuda:<index>'")


