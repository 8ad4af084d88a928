"""A loader for image folders too large to decode into memory: a standard torch DataLoader.

Worker processes decode the files of each batch; the uint8 batch then goes to the device
where the same batched augmentation and normalisation as `DeviceLoader` run. The shuffle and
augmentation draws come from the same (seed, stream, epoch) generator, so for equal data both
loaders yield identical batches; `set_epoch` works the same way.

>>> loader = StreamLoader(files, labels, (3, 32, 32), resize=False, batch_size=64,
...                       mean=(0.5,) * 3, std=(0.25,) * 3, seed=0)  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import crop_flip, normalizer, pad_images
from .decode import PILLOW_ERRORS, decode_image
from .device_loader import EpochState
from .errors import DataError


class ImageFileDataset(Dataset):
    """Item i: (uint8 (C, H, W) tensor decoded from files[i], int64 label)."""

    def __init__(self, files: list[str], labels: np.ndarray, image_shape: tuple[int, int, int], resize: bool):
        self.files = files
        self.labels = labels
        self.mode = "L" if image_shape[0] == 1 else "RGB"
        self.size = image_shape[1:] if resize else None
        self.image_shape = image_shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            array = decode_image(Path(self.files[i]).read_bytes(), self.mode, self.size)
        except PILLOW_ERRORS as err:  # unreadable, damaged or removed since the folder was listed
            raise DataError(f"cannot decode {self.files[i]} ({type(err).__name__}: {err}); "
                            "remove or replace the file") from None
        if array.shape != self.image_shape:
            raise DataError(
                f"{self.files[i]} decodes to {array.shape}, the folder's other images to "
                f"{self.image_shape}; set image_size to resize them all"
            )
        return torch.from_numpy(np.ascontiguousarray(array)), int(self.labels[i])


class StreamLoader(EpochState):
    """Batches (x float32 (B, C, H, W) normalised, y int64 (B,)) decoded from files per batch."""

    def __init__(self, files: list[str], labels: np.ndarray, image_shape: tuple[int, int, int], resize: bool,
                 batch_size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int, *,
                 shuffle: bool = False, drop_last: bool = False, crop_pad: int = 0, flip: bool = False,
                 device: str | torch.device = "cpu", num_workers: int = 0, stream: int = 0):
        super().__init__(len(files), batch_size, shuffle, drop_last, crop_pad, flip, image_shape, seed, stream)
        self.dataset = ImageFileDataset(files, labels, image_shape, resize)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.normalize = normalizer(mean, std, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._next_epoch_draws()
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order.tolist(),  # this epoch's order; DataLoader keeps it as given
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        try:
            for part, (x, y) in zip(self._batches(), loader):
                x = x.to(self.device, non_blocking=True)
                if offsets is not None:
                    x = crop_flip(pad_images(x, self.pad), offsets[part], flips[part], self.image_shape[1:])
                yield self.normalize(x), y.to(self.device, torch.int64, non_blocking=True)
        except DataError as err:
            raise DataError(_without_worker_traceback(str(err))) from None


def _without_worker_traceback(message: str) -> str:
    """The message of a DataError raised in a DataLoader worker, without the worker's traceback
    that torch wraps around it when it raises it again here."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    return message.rsplit(marker, 1)[-1].strip() if marker in message else message
