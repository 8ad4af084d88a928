"""The dataset registry and `load_data`, which turns a DataConfig into train/val/test loaders.

Validation is carved out of the train split with a permutation seeded by DataConfig.seed; the
test split is kept apart and must only be reported, never used to pick a model, epoch or
pruning ratio (use val for that). Normalisation statistics come from the train part of the
split, so neither val nor test leaks into them.

>>> bundle = load_data(DataConfig(name="digits", batch_size=64))
>>> x, y = next(iter(bundle.train))
>>> tuple(x.shape), y.dtype, bundle.num_classes, len(bundle.train)
((64, 1, 8, 8), torch.int64, 10, 20)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

from ..core.errors import ConfigError
from ..core.registry import Registry
from .augment import crop_padding
from .config import DataConfig
from .device_loader import DeviceLoader
from .errors import DataError
from .sources import ImageArrays, ImageFiles, carve, channel_stats, seeded_rng
from .stream_loader import StreamLoader

Loader = Union[DeviceLoader, StreamLoader]
# Stream ids of the loaders' per-epoch draws (see sources.STREAM_* for the splits').
_TRAIN_STREAM, _VAL_STREAM, _TEST_STREAM = 11, 12, 13
# Mean/std of a streamed folder are estimated from this many train images.
_STATS_SAMPLE = 2000


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset, and which augmentations preserve its labels.

    crop: random crops with zero padding (max(1, H // 8) pixels) suit it; flip: so do
    horizontal flips. DataConfig.augment turns on only what the dataset allows.
    """

    loader: Callable[[DataConfig], Union[ImageArrays, ImageFiles]]
    description: str
    crop: bool
    flip: bool


DATASETS: Registry[DatasetSpec] = Registry("dataset")


@dataclass
class DataBundle:
    """Loaders for the three splits plus what a model and a report need to know.

    Every loader yields (x float32 (B, C, H, W) normalised, y int64 (B,)) on cfg.device, has
    len() = batches per pass, `num_samples`, and `set_epoch(epoch)`. The train loader shuffles,
    augments if asked, and drops a last partial batch (unless it is the only one); val and test
    keep their order and every sample. `val` is empty when val_fraction is 0.
    """

    train: Loader
    val: Loader
    test: Loader
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_data(cfg: DataConfig) -> DataBundle:
    """Load cfg.name, split off validation, and build the three loaders on cfg.device."""
    spec = DATASETS.get(cfg.name)
    _check_device(cfg.device)
    source = spec.loader(cfg)
    train_idx, val_idx = carve(len(source.train_y), cfg.val_fraction, cfg.seed)
    if len(source.test_y) == 0:
        raise DataError(f"dataset {cfg.name!r} has no test images; add a test/ folder, or more images (an image "
                        "folder without test/ sets aside 20% of each class, rounded)")
    if len(train_idx) == 0:
        raise DataError(f"dataset {cfg.name!r} leaves no training images once val_fraction={cfg.val_fraction} "
                        f"of its {len(source.train_y)} are set aside; lower val_fraction or add images")
    stats_idx = train_idx  # before limit_train: a quick run normalises like the full one
    if cfg.limit_train is not None:
        train_idx = train_idx[: cfg.limit_train]
    if isinstance(source, ImageArrays):
        mean, std = channel_stats(source.train_x[np.sort(stats_idx)])
        make = _array_loader_factory(source, cfg, mean, std)
    else:
        mean, std = _sampled_stats(source, stats_idx, cfg.seed)
        make = _file_loader_factory(source, cfg, mean, std)
    crop_pad = crop_padding(source.image_shape[1]) if cfg.augment and spec.crop else 0
    drop_last = len(train_idx) >= cfg.batch_size
    return DataBundle(
        train=make("train", train_idx, cfg.batch_size, _TRAIN_STREAM, shuffle=True, drop_last=drop_last,
                   crop_pad=crop_pad, flip=cfg.augment and spec.flip),
        val=make("train", val_idx, cfg.eval_batch_size, _VAL_STREAM),
        test=make("test", None, cfg.eval_batch_size, _TEST_STREAM),
        num_classes=len(source.class_names),
        input_shape=source.image_shape,
        class_names=list(source.class_names),
        mean=mean,
        std=std,
    )


def _array_loader_factory(source: ImageArrays, cfg: DataConfig, mean, std):
    def make(split: str, index, batch_size: int, stream: int, **kw) -> DeviceLoader:
        x, y = (source.train_x, source.train_y) if split == "train" else (source.test_x, source.test_y)
        if index is not None:
            x, y = x[index], y[index]
        return DeviceLoader(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y)),
                            batch_size, mean, std, cfg.seed, device=cfg.device, stream=stream, **kw)

    return make


def _file_loader_factory(source: ImageFiles, cfg: DataConfig, mean, std):
    def make(split: str, index, batch_size: int, stream: int, **kw) -> StreamLoader:
        files, y = (source.train_files, source.train_y) if split == "train" else (source.test_files, source.test_y)
        if index is not None:
            files, y = [files[i] for i in index], y[index]
        return StreamLoader(files, y, source.image_shape, source.resize, batch_size, mean, std, cfg.seed,
                            device=cfg.device, num_workers=cfg.num_workers, stream=stream, **kw)

    return make


def _sampled_stats(source: ImageFiles, train_idx: np.ndarray, seed: int):
    # Decoding a whole large folder just for 2 x C numbers would cost minutes; a seeded
    # sample of 2,000 images pins the mean and std to about 3 decimals.
    pick = seeded_rng(seed, 99).permutation(train_idx)[:_STATS_SAMPLE]
    # mean 0 and std 1/255 make this loader yield the raw 0..255 pixel values as floats.
    sample = StreamLoader([source.train_files[i] for i in pick], source.train_y[pick], source.image_shape,
                          source.resize, batch_size=256, mean=(0.0,) * source.image_shape[0],
                          std=(1 / 255,) * source.image_shape[0], seed=seed)
    images = torch.cat([x for x, _ in sample]).round().to(torch.uint8).numpy()
    return channel_stats(images)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device='cpu'")
