"""The shared CIFAR-10 JPEG tarball loads through the imagefolder path.

The first load decodes 60,000 JPEGs (~10-25 s on 2 busy cores) and writes the decoded-array
cache under $PRUNEKIT_CACHE or ~/.cache/prunekit; later loads read the cache in about a second.
It uses the real cache on purpose, so that only the first run on a machine pays the decode.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prunekit.data import DataConfig, load_data
from prunekit.data.cache import cache_dir
from prunekit.data.imagefolder import load_imagefolder

TARBALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel train statistics stated in shared/data/README.md (all 50,000 train images).
README_MEAN = (0.4913, 0.4821, 0.4465)
README_STD = (0.2452, 0.2428, 0.2606)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TARBALL.is_file(), reason=f"shared CIFAR-10 tarball not found at {TARBALL}"),
]


def test_shared_cifar10_tarball_loads_with_the_documented_contents():
    cfg = DataConfig(name="imagefolder", root=str(TARBALL), batch_size=500, eval_batch_size=1000)
    arrays = load_imagefolder(cfg)
    assert arrays.train_x.shape == (50000, 3, 32, 32) and arrays.test_x.shape == (10000, 3, 32, 32)
    assert arrays.class_names == CLASSES
    assert np.bincount(arrays.train_y).tolist() == [5000] * 10
    assert np.bincount(arrays.test_y).tolist() == [1000] * 10
    full = arrays.train_x
    means = [full[:, c].mean(dtype=np.float64) / 255 for c in range(3)]
    assert np.allclose(means, README_MEAN, atol=6e-5)
    assert any(p.name.startswith("imagefolder-") for p in cache_dir().glob("*.npz"))

    bundle = load_data(cfg)  # second load: from the cache
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (45000, 5000, 10000)
    assert len(bundle.train) == 90 and len(bundle.test) == 10
    # Stats of the 45,000-image train part stay within a few thousandths of the full split's.
    assert np.allclose(bundle.mean, README_MEAN, atol=3e-3) and np.allclose(bundle.std, README_STD, atol=3e-3)
    x, y = next(iter(bundle.train))
    assert x.shape == (500, 3, 32, 32) and y.shape == (500,)
