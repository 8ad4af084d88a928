"""The "digits" dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

Real data that needs no download, small enough for tests and the `prunekit run` demo. Pixel
values 0..16 are rescaled to 0..255 (round(v * 255 / 16)) so that every dataset enters the
loaders as uint8. The data has no official test split: round(0.2 * count) images of every
class (359 in all) are held out as test with a fixed seed, so the test images are the same
whatever DataConfig.seed is.

>>> arrays = load_digits_arrays(DataConfig(name="digits"))
>>> arrays.train_x.shape, arrays.test_x.shape, arrays.train_x.dtype
((1438, 1, 8, 8), (359, 1, 8, 8), dtype('uint8'))
"""
from __future__ import annotations

import numpy as np

from ..core.errors import ConfigError
from .config import DataConfig
from .registry import DATASETS, DatasetSpec
from .sources import TEST_SPLIT_SEED, ImageArrays, stratified_carve

TEST_FRACTION = 0.2
MAX_PIXEL = 16  # load_digits pixel values are counts 0..16 of a 4x4 block of a 32x32 bitmap


def load_digits_arrays(cfg: DataConfig) -> ImageArrays:
    """Load digits as uint8 (N, 1, 8, 8) arrays with a fixed stratified 80/20 train/test split."""
    if cfg.root is not None or cfg.image_size is not None:
        raise ConfigError("dataset 'digits' ships with scikit-learn: leave root and image_size unset")
    from sklearn.datasets import load_digits  # imported here: sklearn takes ~1 s to import

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / MAX_PIXEL)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    kept, held = stratified_carve(labels, TEST_FRACTION, TEST_SPLIT_SEED)
    names = [str(int(n)) for n in bunch.target_names]
    return ImageArrays(images[kept], labels[kept], images[held], labels[held], names)


# No augmentation: the digits are centred and size-normalised by construction, a 1-pixel shift
# of an 8x8 image is a large distortion (it cost the demo CNN several points of val accuracy),
# and a mirrored digit can look like another one.
DATASETS.register(
    "digits", DatasetSpec(load_digits_arrays, "scikit-learn 8x8 digits, 1,797 images, 10 classes", crop=False, flip=False)
)
