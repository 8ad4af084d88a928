"""The shared CIFAR-10 JPEG tarball loads through the imagefolder path.

The first load decodes 60,000 JPEGs (~10-25 s on 2 busy cores) and writes the decoded-array
cache under $PRUNEKIT_CACHE or ~/.cache/prunekit; later loads read the cache in about a second.
It uses the real cache on purpose, so that only the first run on a machine pays the decode.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prunekit.data import DataConfig, load_data
from prunekit.data.cache import cache_dir, cache_key, source_state
from prunekit.data.imagefolder import load_imagefolder

_ROOT = Path(__file__).resolve().parents[2]  # the checkout; ../shared beside it, or shared/ inside it
TARBALL = next((p for p in (_ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz",
                            _ROOT / "shared" / "data" / "cifar10-jpg.tar.gz") if p.is_file()),
               _ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz")
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
    assert (cache_dir() / f"{cache_key(TARBALL, source_state(TARBALL), {'image_size': None})}.npz").is_file()
    # independent reference: 300 JPEG members decoded here with PIL must each be a row of their split
    # and class (pixel for pixel, channels in RGB order)
    rows = {(split, c): {a.tobytes() for a in xs[ys == c]} for split, xs, ys in
            (("train", arrays.train_x, arrays.train_y), ("test", arrays.test_x, arrays.test_y)) for c in range(10)}
    checked = 0
    with tarfile.open(TARBALL) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or not member.name.endswith((".jpg", ".jpeg", ".JPEG")) or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            img = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
            assert img.transpose(2, 0, 1).tobytes() in rows[(split, CLASSES.index(cls))], member.name
            checked += 1
            if checked == 300:
                break
    assert checked == 300

    bundle = load_data(cfg)  # second load: from the cache
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (45000, 5000, 10000)
    assert len(bundle.train) == 90 and len(bundle.test) == 10
    # Stats of the 45,000-image train part stay within a few thousandths of the full split's.
    assert np.allclose(bundle.mean, README_MEAN, atol=3e-3) and np.allclose(bundle.std, README_STD, atol=3e-3)
    x, y = next(iter(bundle.train))
    assert x.shape == (500, 3, 32, 32) and y.shape == (500,)
